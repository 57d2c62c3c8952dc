"""What every benchmark shares: machine description, A/B timing, percentiles, results JSON + PNG.

BENCH.md: the baseline is measured in the same run on the same machine, alternating A B A B so drift hits
both; figures are medians and ratios, never one absolute time.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """The machine and package versions a figure was measured with."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    for pkg in ("transformers", "onnxruntime", "triton", "numpy", "faiss", "PIL"):
        # absent or versionless packages are just not listed
        with contextlib.suppress(Exception):
            info[pkg] = __import__(pkg).__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def stats(times_s: list[float]) -> dict[str, float]:
    """Median, p90, p99 and mean of per-call times, in milliseconds."""
    t = np.asarray(times_s, dtype=np.float64) * 1e3
    return {
        "median_ms": float(np.median(t)),
        "p90_ms": float(np.percentile(t, 90)),
        "p99_ms": float(np.percentile(t, 99)),
        "mean_ms": float(t.mean()),
        "n": int(t.size),
    }


def ab_times(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int = 10,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Time each function `repeats` times, interleaved (A B A B ...), after `warmup` untimed calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - t0)
    return times


def write_results(name: str, results: dict[str, Any], out_dir: str | os.PathLike | None = None) -> Path:
    """Write <out_dir>/<name>.json (with the machine added) atomically; returns its path."""
    from vlm2vec_rt import atomic

    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    path = out / f"{name}.json"
    atomic.write_json(path, {"benchmark": name, "machine": machine(), **results})
    return path


def save_plot(fig: Any, name: str, out_dir: str | os.PathLike | None = None) -> Path:
    """Save a matplotlib figure as <out_dir>/<name>.png atomically."""
    from vlm2vec_rt import atomic

    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    path = out / f"{name}.png"
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
