"""`vlm2vec-rt eval`: evaluate a model or engine on MMEB-eval data (default: the bundled benchmark), or
compare two finished runs. Under `torchrun` every rank encodes a share; rank 0 scores and reports.

    vlm2vec-rt eval --model DIR [--data DIR] [--datasets A,B] --out DIR
    torchrun --nproc_per_node 2 $(which vlm2vec-rt) eval --engine DIR --data MMEB-eval --out DIR
    vlm2vec-rt eval --compare RUN_A RUN_B --out DIR
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import distributed
from .bundled import write_bundled
from .evaluation import run_evaluation
from .report import format_comparison, format_results, write_comparison, write_reports

log = logging.getLogger("vlm2vec_rt")


def run_eval(args: argparse.Namespace, load_encoder: Callable[[argparse.Namespace], Any]) -> int:
    """The eval command: args from the CLI's eval parser; load_encoder(args) gives an Embedder or Engine."""
    if args.compare:
        a, b = args.compare
        cmp = write_comparison(a, b, args.out)
        print(format_comparison(cmp))
        print(f"\nwritten to {os.path.join(args.out, 'comparison.{json,md,png}')}")
        return 0

    with distributed.joined(args.device) as args.device:
        comm = distributed.current()
        data_dir = args.data
        if data_dir is None:
            # Rank 0 writes the bundled benchmark (once, cached); the others then find it complete.
            distributed.on_main(comm, write_bundled)
            data_dir = write_bundled().eval_dir
            if comm.is_main:
                log.info("no --data: evaluating the bundled benchmark in %s", data_dir)
        encoder = distributed.on_every_rank(comm, lambda: load_encoder(args))
        run = run_evaluation(
            encoder,
            data_dir,
            datasets=args.datasets,
            image_root=args.image_root,
            batch_size=args.batch_size,
            skip_missing=args.skip_missing,
            cache_dir=args.cache if args.cache else Path(args.out) / "cache",
            ties=args.ties,
            progress=True,
            label=args.engine or args.model,
            comm=comm,
        )

        def report() -> None:
            results = write_reports(run, args.out)
            print(format_results(results))
            print(f"\nwritten to {os.path.join(args.out, 'results.{json,md,png}')}")

        distributed.on_main(comm, report)
    return 0
