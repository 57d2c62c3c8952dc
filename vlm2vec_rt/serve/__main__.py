"""`python -m vlm2vec_rt.serve ARGS`: `vlm2vec-rt serve ARGS` without the console script."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import EngineError, InputError
from .cli import add_serve_parser


def main(argv: list[str] | None = None) -> int:
    """Parse the serve flags and run; bad input exits 2 with one line, as the `vlm2vec-rt` command does."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser = argparse.ArgumentParser(prog="python -m vlm2vec_rt.serve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True), [common])
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except (InputError, EngineError) as e:
        if args.debug:
            raise
        print(f"vlm2vec-rt serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
