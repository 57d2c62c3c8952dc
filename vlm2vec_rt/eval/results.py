"""results.json: the one record of an evaluation, its format owned here (written, read back, checked).

The dictionary itself is built by `EvalRun.as_dict` (eval/evaluation.py); reports (eval/report.py) and
anything else that reads a finished run take it through `load_results`, never by parsing the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import atomic
from ..errors import InputError

RESULTS_FORMAT = "vlm2vec-rt/mmeb-results"
RESULTS_FILE = "results.json"


def save_results(results: dict, out_dir: str | os.PathLike) -> Path:
    """Write `results` as out_dir/results.json (atomically); returns the file's path."""
    path = Path(out_dir) / RESULTS_FILE
    atomic.write_json(path, results)
    return path


def load_results(path: str | os.PathLike) -> dict:
    """A results.json (or the run directory holding one), checked to be ours; InputError otherwise."""
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise InputError(
            f"no {RESULTS_FILE} in {os.fspath(path)!r} (run `vlm2vec-rt eval ... --out DIR` first)"
        )
    try:
        results = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{os.fspath(file)!r} is not valid JSON: {e}") from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise InputError(f"{os.fspath(file)!r} is not a vlm2vec-rt evaluation result")
    return results


def precision_at_1(results: dict) -> dict[str, float]:
    """Per-dataset Precision@1 of a results dictionary."""
    return {name: float(r["precision_at_1"]) for name, r in results["datasets"].items()}
