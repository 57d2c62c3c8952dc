"""`evaluate`: MMEB Precision@1 of any encoder over datasets in the official MMEB-eval layout.

Per dataset: read and check the rows (reader), embed each distinct query and candidate once
(encoding, cached per model fingerprint so an interrupted run resumes), rank each query's positive
among its own candidates by cosine (scoring). Under torchrun every rank encodes a share of the
chunks; rank 0 gathers them, scores and writes the reports, and every rank returns the same scores.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed
from ..errors import InputError
from .aggregate import aggregate
from .cache import EmbeddingCache
from .encoding import SideStats, encode_side, encoder_fingerprint
from .reader import EvalData, Skip, list_datasets, read_dataset
from .registry import known_datasets
from .report import write_reports
from .results import RESULTS_FORMAT
from .scoring import check_ties, metrics, positive_ranks

log = logging.getLogger("vlm2vec_rt")

DEFAULT_CHUNK_SIZE = 512


@dataclass
class DatasetResult:
    """One dataset's scores and the work it took."""

    name: str
    metrics: dict[str, float]  # precision_at_1, hit_at_5, mrr (fractions)
    num_queries: int
    candidates_per_query: tuple[int, int]
    queries: SideStats
    candidates: SideStats
    skipped_rows: list[Skip] = field(default_factory=list)

    @property
    def precision_at_1(self) -> float:
        return self.metrics["precision_at_1"]

    def as_dict(self) -> dict[str, Any]:
        info = known_datasets().get(self.name)
        return {
            "meta_task": info.meta_task if info else None,
            "split": info.split if info else None,
            **self.metrics,
            "queries": self.num_queries,
            "candidates_per_query": list(self.candidates_per_query),
            "unique_queries": self.queries.items,
            "unique_candidates": self.candidates.items,
            "encoded": self.queries.encoded + self.candidates.encoded,
            "from_cache": self.queries.cached + self.candidates.cached,
            "seconds": round(self.queries.seconds + self.candidates.seconds, 3),
            "skipped_rows": len(self.skipped_rows),
        }


@dataclass
class EvalRun:
    """Everything one evaluation produced: per-dataset results, skips, and what was evaluated how."""

    label: str
    fingerprint: str | None
    data_dir: str
    image_root: str
    ties: str
    profile: str | None  # the encoder's input recipe (vlm2vec_rt.profiles); None for an encoder without one
    results: dict[str, DatasetResult]
    skipped_datasets: list[Skip]
    seconds: float

    def scores(self) -> dict[str, float]:
        """dataset -> Precision@1."""
        return {name: r.precision_at_1 for name, r in self.results.items()}

    def aggregates(self) -> dict[str, float | None]:
        """MMEB aggregates of Precision@1 over the datasets the registry knows (others are listed apart)."""
        known = known_datasets()
        return aggregate({n: s for n, s in self.scores().items() if n in known})

    def as_dict(self) -> dict[str, Any]:
        import torch

        known = known_datasets()
        skipped = [s.as_dict() for s in self.skipped_datasets]
        for r in self.results.values():
            skipped += [s.as_dict() for s in r.skipped_rows]
        encoded = sum(r.queries.encoded + r.candidates.encoded for r in self.results.values())
        return {
            "format": RESULTS_FORMAT,
            "version": 1,
            "label": self.label,
            "fingerprint": self.fingerprint,
            "data_dir": self.data_dir,
            "image_root": self.image_root,
            "metric": "precision_at_1",
            "ties": self.ties,
            "profile": self.profile,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": {
                "platform": platform.platform(),
                "processor": platform.processor(),
                "cpus": os.cpu_count(),
            },
            "versions": {
                "python": platform.python_version(),
                "numpy": np.__version__,
                "torch": torch.__version__,
            },
            "datasets": {name: r.as_dict() for name, r in self.results.items()},
            "aggregate": self.aggregates(),
            "not_aggregated": [n for n in self.results if n not in known],
            "skipped": skipped,
            "timing": {"seconds": round(self.seconds, 3), "items_encoded": encoded},
        }


def evaluate(
    encoder: Any,
    data_dir: str | os.PathLike,
    *,
    datasets: Sequence[str] | str | None = None,
    image_root: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    cache_dir: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, float]:
    """Precision@1 in [0, 1] per dataset of the official MMEB-eval layout.

    encoder: anything with .encode(items) -> [N, D] (Embedder, Engine, or your own object).
    data_dir/<Dataset>/test-*.parquet; images at image_root/<path>, default data_dir/eval_images.
    datasets: names (or "A,B"); None means every dataset folder present in data_dir.
    out_dir: where results.json, results.md and results.png are written, and embeddings cached
    (out_dir/cache, unless cache_dir is given). Without out_dir or cache_dir nothing is cached.
    Caching needs the encoder's `.fingerprint` (or the cache_key option): an encoder without one is
    encoded afresh on every run.
    options (those of run_evaluation):
      skip_missing=False: skip (and report) rows with missing images or empty candidate lists and
        datasets whose parquet file or columns are missing, instead of raising InputError;
      ties="official": the official evaluation's argmax (a tie goes to the positive, candidate 0);
        "strict": the positive must beat every distinct candidate (see vlm2vec_rt.eval.scoring);
      chunk_size=512: distinct items per encode call and per cache file (the resume granularity);
      cache_key=None, progress=False, label=None.
    Under torchrun (an initialised process group) ranks share the encoding; all return the same scores.
    """
    comm = distributed.current()
    if cache_dir is None and out_dir is not None:
        cache_dir = Path(out_dir) / "cache"
    run = run_evaluation(
        encoder, data_dir, datasets=datasets, image_root=image_root, batch_size=batch_size,
        cache_dir=cache_dir, comm=comm, **options,
    )  # fmt: skip
    scores = comm.broadcast(run.scores() if comm.is_main else None)
    if out_dir is not None and comm.is_main:
        write_reports(run, out_dir)
    return scores


def run_evaluation(
    encoder: Any,
    data_dir: str | os.PathLike,
    *,
    datasets: Sequence[str] | str | None = None,
    image_root: str | os.PathLike | None = None,
    batch_size: int = 16,
    skip_missing: bool = False,
    cache_dir: str | os.PathLike | None = None,
    cache_key: str | None = None,
    ties: str = "official",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
    label: str | None = None,
    comm: distributed.SingleProcess | None = None,
) -> EvalRun:
    """The evaluation behind `evaluate`, returning everything (EvalRun) rather than the scores alone.

    On ranks other than 0 the EvalRun holds no results. comm: the collectives to use (default: the
    initialised torch.distributed job, if any).
    """
    t0 = time.perf_counter()
    if batch_size < 1 or chunk_size < 1:
        raise InputError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    ties = check_ties(ties)
    data_dir = Path(data_dir)
    image_root = Path(image_root) if image_root is not None else data_dir / "eval_images"
    comm = comm if comm is not None else distributed.current()
    names = distributed.on_main(comm, lambda: _dataset_names(data_dir, datasets))
    fingerprint = encoder_fingerprint(encoder, cache_key)
    cache = None
    if cache_dir is not None and fingerprint:
        cache = EmbeddingCache(cache_dir, fingerprint)
    elif cache_dir is not None and comm.is_main:
        log.warning(
            "%s has no .fingerprint: its embeddings are not cached (pass cache_key= to cache them)",
            type(encoder).__name__,
        )
    results: dict[str, DatasetResult] = {}
    skipped: list[Skip] = []
    for name in names:
        data = distributed.on_main(
            comm, lambda n=name: read_dataset(data_dir, n, image_root=image_root, skip_missing=skip_missing)
        )
        if isinstance(data, Skip):
            if comm.is_main:
                log.warning("skipping dataset %s: %s", name, data.reason)
            skipped.append(data)
            continue
        side_args = dict(
            batch_size=batch_size, chunk_size=chunk_size, cache=cache, comm=comm, progress=progress
        )
        q_emb, q_stats = encode_side(encoder, data, "queries", **side_args)
        c_emb, c_stats = encode_side(encoder, data, "candidates", **side_args)

        def score(data=data, q=(q_emb, q_stats), c=(c_emb, c_stats)) -> None:
            results[data.name] = _score(data, *q, *c, ties=ties)

        # On rank 0, but as a collective: if scoring fails there, no other rank waits for it in the next one.
        distributed.on_main(comm, score)
    return EvalRun(
        label=label or _default_label(encoder, fingerprint),
        fingerprint=fingerprint,
        data_dir=os.fspath(data_dir),
        image_root=os.fspath(image_root),
        ties=ties,
        profile=getattr(encoder, "profile", None),
        results=results,
        skipped_datasets=skipped,
        seconds=time.perf_counter() - t0,
    )


def _score(
    data: EvalData, q_emb: np.ndarray, q_stats: SideStats, c_emb: np.ndarray, c_stats: SideStats, *, ties: str
) -> DatasetResult:
    ranks = positive_ranks(q_emb, c_emb, data.query_index, data.candidate_index, ties=ties)
    result = DatasetResult(
        name=data.name,
        metrics=metrics(ranks),
        num_queries=data.num_queries,
        candidates_per_query=data.candidates_per_query,
        queries=q_stats,
        candidates=c_stats,
        skipped_rows=data.skipped,
    )
    log.info(
        "%s: Precision@1 %.1f (%d queries, %d-%d candidates; %d encoded, %d from cache, %.1f s)%s",
        data.name,
        100 * result.precision_at_1,
        result.num_queries,
        *result.candidates_per_query,
        q_stats.encoded + c_stats.encoded,
        q_stats.cached + c_stats.cached,
        q_stats.seconds + c_stats.seconds,
        f"; {len(data.skipped)} rows skipped" if data.skipped else "",
    )
    return result


def _dataset_names(data_dir: Path, datasets: Sequence[str] | str | None) -> list[str]:
    if datasets is None:
        names = list_datasets(data_dir)
        if not names:
            raise InputError(
                f"no dataset folders with test-*.parquet files in {os.fspath(data_dir)!r} (MMEB-eval layout)"
            )
        return names
    if isinstance(datasets, str):
        datasets = [d for d in (s.strip() for s in datasets.split(",")) if d]
    names = list(dict.fromkeys(datasets))
    if not names:
        raise InputError("no datasets named")
    return names


def _default_label(encoder: Any, fingerprint: str | None) -> str:
    name = type(encoder).__name__
    return f"{name} {fingerprint}" if fingerprint else name
