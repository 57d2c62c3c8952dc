"""`vlm2vec-rt`: one thin entry point. It parses arguments and calls the package; nothing else lives here.

Bad input exits non-zero with one clear line (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from .devices import check_device
from .errors import EngineError, InputError

log = logging.getLogger("vlm2vec_rt")


# ---- commands ------------------------------------------------------------------------------------------
def cmd_tiny(args: argparse.Namespace) -> int:
    from .models.tiny import SIZE_KEYWORDS, make_tiny_model

    size = {k: v for k, v in vars(args).items() if k in SIZE_KEYWORDS and v is not None}
    if args.size:
        size["size"] = args.size
    path = make_tiny_model(args.out, args.backbone, seed=args.seed, **size)
    print(f"wrote a tiny {args.backbone} model to {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from . import profiles
    from .training.trainer import train

    check_device(args.device, "--device")
    out = train(
        model_dir=args.model,
        data_dir=args.data,
        out_dir=args.out,
        resume=args.resume,
        progress=True,
        datasets=args.datasets.split(",") if args.datasets else None,
        split=args.split,
        image_root=args.image_root,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        dora=args.dora,
        full_finetune=args.full_finetune,
        train_vision=args.train_vision,
        batch_size=args.batch_size,
        gc_chunk=args.gc_chunk,
        steps=args.steps,
        temperature=args.temperature,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        device=args.device,
        image_resolution=args.image_resolution,
        max_image_pixels=args.max_image_pixels,
        profile=profiles.resolve(args.profile, args.model),
    )
    print(f"{'model' if args.full_finetune else 'adapter'} written to {out}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .training.lora import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.out, profile=args.profile)
    print(f"merged model written to {out}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .engine.build import build_engine

    if args.device is not None:
        check_device(args.device, "--device")
    out = build_engine(
        args.model,
        args.out,
        precision=args.engine,
        backend=args.backend,
        device=args.device,
        overwrite=args.overwrite,
        profile=args.profile,
    )
    print(f"engine written to {out}")
    return 0


def check_output_file(path: str, flag: str = "--out") -> None:
    """InputError before any work when `path` cannot become a file: empty, a directory, or in a folder that
    is a file or not writable (the output itself is written only at the end, atomically)."""
    if not path:
        raise InputError(f"{flag} is empty: give a file name")
    out = Path(path)
    if out.is_dir():
        raise InputError(f"{flag} {path!r} is a directory: give a file name")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:  # the nearest folder that exists
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag} {path!r}: {os.fspath(parent)!r} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path!r}: cannot write in {os.fspath(parent)!r} (permission denied)")


def load_encoder(args: argparse.Namespace):
    """An Embedder (--model) or an Engine (--engine), from the shared --model/--engine/--device flags."""
    from .preprocess.images import DEFAULT_MAX_PIXELS

    check_device(args.device, "--device")
    max_image_pixels = getattr(args, "max_image_pixels", DEFAULT_MAX_PIXELS)
    if getattr(args, "engine", None):
        from .engine.runtime import Engine

        return Engine.load(
            args.engine,
            device=args.device,
            image_resolution=args.image_resolution,
            max_image_pixels=max_image_pixels,
            profile=args.profile,
        )
    from .models.embedder import Embedder

    return Embedder.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        image_resolution=args.image_resolution,
        max_image_pixels=max_image_pixels,
        profile=args.profile,
    )


def cmd_embed(args: argparse.Namespace) -> int:
    from . import atomic
    from .preprocess.items import Item, check_unicode, read_jsonl_items

    check_output_file(args.out)  # before the encode, not after it
    for flag in ("text", "instruction", "image"):
        if getattr(args, flag) is not None:
            check_unicode(getattr(args, flag), f"--{flag}")  # bytes the locale cannot decode
    if args.input:
        if args.text is not None or args.image is not None:
            raise InputError("--input cannot be combined with --text or --image")
        items = read_jsonl_items(args.input, instruction=args.instruction)
    else:
        if args.text is None and args.image is None:
            raise InputError("give --text, --image (or both), or --input FILE.jsonl")
        image = None
        if args.image is not None:
            if not Path(args.image).is_file():
                raise InputError(f"image file {args.image!r} does not exist")
            image = args.image
        items = [Item(text=args.text, image=image, instruction=args.instruction)]
    encoder = load_encoder(args)
    vectors = encoder.encode(items, batch_size=args.batch_size, progress=len(items) > 1)
    atomic.save_npy(args.out, vectors)
    print(f"wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.run import run_eval

    return run_eval(args, load_encoder)


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks import run_benchmarks

    return run_benchmarks(args.which, out_dir=args.out)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    return run_quickstart(args.out, backbone=args.backbone)


# ---- parser --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2, as every other bad input (--help shows the usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see {self.prog} --help)\n")


def _add_profile_flag(p: argparse.ArgumentParser, default_help: str) -> None:
    from .profiles import PROFILES

    p.add_argument(
        "--profile",
        choices=PROFILES,
        default=None,
        help=f"input recipe: vlm2vec = the official VLM2Vec code's inputs, vlm2vec-v2, native = the "
        f"backbone's own image format (docs/fidelity.md); default: {default_help}",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_max_pixels_flag(p: argparse.ArgumentParser) -> None:
    from .preprocess.images import DEFAULT_MAX_PIXELS

    p.add_argument(
        "--max-image-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse images of more pixels (a decompression-bomb guard; default {DEFAULT_MAX_PIXELS})",
    )


def _add_encoder_flags(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """--model | --engine (returned, so a command can add a third choice), device, dtype, batch size."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="a model directory (eager PyTorch)")
    src.add_argument("--engine", metavar="DIR", help="an engine directory built by `vlm2vec-rt build`")
    p.add_argument(
        "--device", default="cpu", help="cpu or cuda (default: cpu; cuda:<local rank> under torchrun)"
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="eager dtype"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--image-resolution",
        choices=["high"],
        default=None,
        help="high: resize images to 1344x1344 first (VLM2Vec's high-resolution setting)",
    )
    _add_max_pixels_flag(p)
    _add_profile_flag(p, "an engine's own; a model's recorded one, else vlm2vec")
    return src


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (API.md's command line)."""
    # --debug goes before or after the command. The subcommand's copy has no default: argparse would
    # otherwise write its False over a --debug given before the command.
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs"
    )

    parser = _Parser(
        prog="vlm2vec-rt",
        description="Universal multimodal embeddings (VLM2Vec): train, build engines, embed, evaluate, benchmark.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("tiny", parents=[common], help="write a tiny model of a real architecture")
    from .backbones import NAMES as BACKBONE_NAMES

    p.add_argument("--backbone", choices=BACKBONE_NAMES, default="llava_next")
    p.add_argument("--size", help="a preset of a real checkpoint's shapes (random weights), e.g. qwen2-vl-2b")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    from .models.tiny import SIZE_KEYWORDS

    for name in SIZE_KEYWORDS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, dest=name)
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("train", parents=[common], help="contrastive LoRA training with GradCache")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--data", required=True, metavar="DIR", help="MMEB-train layout")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--datasets", help="comma-separated dataset folders (default: every one in --data)")
    p.add_argument("--split", default="original", help="parquet files <split>-*.parquet (default: original)")
    p.add_argument("--image-root", metavar="DIR", help="images root (default: DATA/train_images or DATA)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 4 x rank")
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--dora", action="store_true", help="DoRA (weight-decomposed LoRA)")
    p.add_argument("--full-finetune", action="store_true", help="train the language model, no adapter")
    p.add_argument("--train-vision", action="store_true", help="also adapt the vision tower and projector")
    p.add_argument("--batch-size", type=int, default=64, help="global batch over all ranks")
    p.add_argument("--gc-chunk", type=int, default=4, help="GradCache chunk size")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N")
    p.add_argument("--keep-checkpoints", type=int, default=2, metavar="K")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:<local rank> under torchrun)")
    p.add_argument("--image-resolution", choices=["high"], default=None, help="resize images to 1344x1344")
    _add_max_pixels_flag(p)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    _add_profile_flag(p, "the model's recorded one, else vlm2vec")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", parents=[common], help="merge a LoRA adapter into one HF-format model")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--adapter", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    _add_profile_flag(p, "the adapter's recorded one, else the model's, else vlm2vec")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("build", parents=[common], help="export and compile an engine")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--engine", required=True, choices=["fp16", "fp32", "int8"], help="precision")
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt", "aoti"])
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--device", choices=["cpu", "cuda"], help="engine device (default: cuda if present)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing engine at --out")
    _add_profile_flag(p, "the model's recorded one, else vlm2vec")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("embed", parents=[common], help="embed text, an image, or a JSONL file of items")
    _add_encoder_flags(p)
    p.add_argument("--text")
    p.add_argument("--image", metavar="PATH")
    p.add_argument(
        "--input", metavar="FILE.jsonl", help='one item per line: {"text", "image", "instruction"}'
    )
    p.add_argument("--instruction")
    p.add_argument("--out", required=True, metavar="FILE.npy")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "eval", parents=[common], help="MMEB evaluation (Precision@1), or --compare two evaluation runs"
    )
    src = _add_encoder_flags(p)
    src.add_argument(  # a third choice: no encoder needed
        "--compare",
        nargs=2,
        metavar=("RUN_A", "RUN_B"),
        help="two eval --out directories side by side (B - A)",
    )
    p.add_argument("--data", metavar="DIR", help="MMEB-eval layout (default: the bundled benchmark)")
    p.add_argument("--datasets", help="comma-separated dataset names (default: every folder in --data)")
    p.add_argument("--image-root", metavar="DIR", help="images root (default: DATA/eval_images)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--skip-missing",
        action="store_true",
        help="skip and report rows with missing images or empty candidate lists, and datasets without a "
        "readable parquet file, instead of stopping",
    )
    p.add_argument(
        "--cache", metavar="DIR", help="embedding cache (default: OUT/cache); reruns resume from it"
    )
    p.add_argument(
        "--ties",
        choices=["official", "strict", "first"],
        default="official",
        help="official (default): the official evaluation's argmax, a tie goes to the positive; strict: the "
        "positive must beat every other candidate; first: the old name of official",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", parents=[common], help="benchmarks against eager PyTorch (JSON + PNG)")
    p.add_argument(
        "which",
        nargs="?",
        default="all",
        choices=["tiling", "engine", "kernels", "train", "eval", "all", "summary"],
        help="one benchmark, all, or summary (only rewrite SUMMARY.md from the results in --out)",
    )
    p.add_argument("--out", metavar="DIR", default="bench/results")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("quickstart", parents=[common], help="the whole product end to end on a tiny model")
    p.add_argument("--out", metavar="DIR", default="quickstart")
    p.add_argument("--backbone", choices=BACKBONE_NAMES, default="llava_next")
    p.set_defaults(func=cmd_quickstart)

    from .serve.cli import add_serve_parser

    add_serve_parser(sub, [common])
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run `vlm2vec-rt ARGS`; returns the exit status (0 ok, 2 bad input, 1 internal error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (
        InputError,
        EngineError,
        FileExistsError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    ) as e:
        if args.debug:
            traceback.print_exc()
        print(f"vlm2vec-rt {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlm2vec-rt {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: say so in one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        print(
            f"vlm2vec-rt {args.command}: internal error: {type(e).__name__}: {_one_line(e)} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
