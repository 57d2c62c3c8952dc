"""`vlm2vec-rt bench`: runs the scripts of bench/ (one per comparison, BENCH.md) and writes a summary.

Each script stays runnable alone (`python bench/bench_tiling.py`); here they are imported from the
source checkout and their `main(out_dir)` is called in turn. Every script writes <name>.json and
<name>.png; this module adds SUMMARY.md with the machine, the versions and each script's headline
figures (its `summary(results)` lines).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import atomic
from .errors import InputError

# In the order `all` runs them: the quick, independent ones first.
BENCHMARKS = ("tiling", "kernels", "eval", "engine", "train")


def bench_dir() -> Path:
    """The bench/ folder of the source checkout this package is installed from."""
    folder = Path(__file__).resolve().parents[1] / "bench"
    if not (folder / "common.py").is_file():
        raise InputError(
            "`vlm2vec-rt bench` runs the benchmark scripts of a source checkout (bench/ beside the package); "
            "clone the repository and install it with `pip install -e .`"
        )
    return folder


def load(name: str) -> Any:
    """The module bench/bench_<name>.py."""
    return _import_from_bench(f"bench_{name}")


def _import_from_bench(module: str) -> Any:
    folder = os.fspath(bench_dir())
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the scripts import their shared `common` module as a sibling
    return importlib.import_module(module)


def run_benchmarks(which: str = "all", out_dir: str | os.PathLike = "bench/results") -> int:
    """Run one benchmark or all of them, then rewrite SUMMARY.md; returns 0 when every check passed, else 1.

    SUMMARY.md covers every benchmark with results in out_dir: the ones run now, and (marked as such, with
    their date) those of an earlier run that this one did not repeat, so rerunning one benchmark refreshes
    its section without losing the others'. which="summary" runs nothing and only rewrites SUMMARY.md (after
    scripts were run on their own).
    """
    names = () if which == "summary" else BENCHMARKS if which == "all" else (which,)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise InputError(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)} or all")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections: dict[str, list[str]] = {}
    failed = []
    for name in names:
        module = load(name)
        print(f"== bench {name} (bench/bench_{name}.py) ==", flush=True)
        t0 = time.perf_counter()
        try:
            results = module.main(out)
        except Exception as e:  # a broken benchmark must not hide the others' results
            traceback.print_exc()
            failed.append(name)
            sections[name] = [f"## {name}", "", f"FAILED: {type(e).__name__}: {e}", ""]
            continue
        if (results or {}).get("failures"):
            failed.append(name)
        sections[name] = _section(name, module, results, f"{time.perf_counter() - t0:.0f} s")
    for name in BENCHMARKS:
        earlier = out / f"{name}.json"
        if name not in sections and earlier.is_file():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(earlier.stat().st_mtime))
            try:
                results = json.loads(earlier.read_text())
                sections[name] = _section(name, load(name), results, f"earlier run, {when}")
            except Exception as e:  # an unreadable old file is reported, not fatal
                sections[name] = [
                    f"## {name}",
                    "",
                    f"earlier results unreadable: {type(e).__name__}: {e}",
                    "",
                ]
    summary_path = out / "SUMMARY.md"
    lines = _header() + [line for name in BENCHMARKS if name in sections for line in sections[name]]
    atomic.write_bytes(summary_path, "\n".join(lines).encode())
    print(f"wrote {summary_path}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _section(name: str, module: Any, results: dict, when: str) -> list[str]:
    """A benchmark's part of SUMMARY.md: its headline lines and every failed check."""
    problems = (results or {}).get("failures") or []
    lines = module.summary(results) if hasattr(module, "summary") else []
    return (
        [f"## {name} ({when}; `python bench/bench_{name}.py`)", ""]
        + [f"- {line}" for line in lines]
        + [f"- FAILED CHECK: {p}" for p in problems]
        + [f"- results: `{name}.json`, plot: `{name}.png`", ""]
    )


def _header() -> list[str]:
    machine = _import_from_bench("common").machine()
    return [
        "# Benchmark summary",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"),
        "Versions: "
        + ", ".join(
            f"{k} {machine[k]}" for k in ("python", "torch", "transformers", "onnxruntime") if k in machine
        ),
        f"Load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
    ]
