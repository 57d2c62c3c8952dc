"""bench/gpu_check.sh, the prepared device run, on this machine's tiny sizes: it must not rot between leases.

The whole script runs once (no GPU here: kernels under the Triton interpreter, the default tiny model, an
AOTInductor engine on the CPU); every step must end with a status, skipped ones with their reason, and
every step that can run without a GPU must run and carry its figures. The step guard (a failing, crashing
or hanging step costs that step only) is tested on its own with stand-in steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

# steps that need a GPU or a package this machine lacks: skipped here, with the reason
GPU_ONLY = {"aoti_bf16", "onnxruntime_gpu", "tensorrt"}
SETUP = {"deps", "build_ext"}


def _figures_of(name: str, step: dict) -> None:
    """What an ok step must carry, by step."""
    if name == "env":
        assert step["machine"]["torch"] and "cuda_available" in step
    elif name == "kernels_infonce":
        assert step["checks"] and all("ok" in c for c in step["checks"])
        timed = [r for r in step["timings"] if "median_ms" in r]
        assert timed and all({"fused", "eager_bf16"} <= set(r["median_ms"]) for r in timed)
        assert step["targets"]["all correct"] is True
    elif name == "kernels_topk":
        assert {c["dtype"] for c in step["checks"]} >= {"torch.float16", "torch.float32"}
        assert {"torch_mm_topk", "fused"} <= set(step["timing"]["median_ms"])
        assert step["targets"]["all correct"] is True
    elif name == "model":
        assert step["parameters"] > 0 and Path(step["path"]).name == "model"
    elif name == "embedder":
        for dtype in ("float16", "bfloat16"):
            figures = step[dtype]
            assert set(figures["min_cosine_vs_eager_fp32"]) == {"text", "image+text"}
            for wl in ("text", "image+text"):
                for enc in ("eager", "eager-by-length"):
                    lat = figures["latency_batch1"][wl][enc]
                    assert lat["median_ms"] > 0 and lat["p99_ms"] >= lat["median_ms"]
                    assert figures["throughput_batch32"][wl][enc]["median_items_per_s"] > 0
        assert step["float16"]["parity_ok"] is True
    elif name == "preprocess":
        assert step["check"]["exact_fp32"] and step["check"]["exact_fp16"] and step["views_per_image"] == 17
        assert {"cpp_fp16_pinned_to_device", "transformers_fp32_to_device"} <= set(step["images_per_s"])
        assert step["speedup_cpp_pinned_vs_transformers"] > 0
    elif name == "end_to_end":
        assert set(step["items_per_s"]) >= {"preprocess_cpp", "model", "encode", "preprocess_transformers"}
        assert step["bottleneck"] in ("preprocessing", "model")
    elif name == "aoti_fp16":
        assert step["build_parity"]["min_cosine"] >= step["parity_gate"]
        for wl in ("text", "image+text"):
            assert step["latency_batch1"][wl]["aoti-fp16"]["p99_ms"] > 0
            assert step["throughput_batch32"][wl]["aoti-fp16"]["median_items_per_s"] > 0
            assert set(step["vs_eager"][wl]) == {"latency_p50_ratio", "latency_p99_ratio", "throughput_ratio"}


@pytest.mark.slow
def test_gpu_check_runs_every_step_on_tiny_sizes(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    # what comes back from a device call: at most 8 files, no deeper than two folders
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"gpu_check.json", "gpu_check.log"}, files
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["complete"] and report["device"] == "cpu" and report["tiny"]
    steps = report["steps"]
    assert list(steps) == list(gpu_check.PLAN), "every step, in order"
    log = res.stdout[-3000:]
    for name, step in steps.items():
        status = step["status"]
        assert status in ("ok", "skipped", "failed"), (name, step)
        if status == "skipped":
            assert step["reason"], name
        if status == "failed":
            assert step["error"], name
        if name in GPU_ONLY:
            assert status == "skipped", (name, step)
        elif name in SETUP:
            assert status in ("ok", "skipped"), (name, step.get("error"), log)
        else:
            assert status == "ok", (name, step.get("error"), step.get("traceback"), log)
            _figures_of(name, step)
    assert "bf16" in steps["aoti_bf16"]["reason"]
    assert report["status"] == {name: step["status"] for name, step in steps.items()}
    assert wall < 600, f"the CPU run took {wall:.0f} s"


# ---- the guard, with stand-in steps ------------------------------------------------------------------------
def _stand_in_ok(ctx, rec):
    rec.update(first=1)
    return {"second": 2}


def _stand_in_skip(ctx, rec):
    raise gpu_check.Skip("not here")


def _stand_in_raises(ctx, rec):
    rec.update(measured=3)
    raise ValueError("boom")


def _stand_in_hangs(ctx, rec):
    rec.update(before_hang=4)
    time.sleep(60)


def _stand_in_crashes(ctx, rec):
    import faulthandler

    rec.update(before_crash=5)
    faulthandler.disable()  # pytest's handler would print the whole stack of the planted crash
    os.kill(os.getpid(), signal.SIGSEGV)


def test_step_guard_records_each_outcome(tmp_path, monkeypatch):
    import argparse

    stand_ins = {
        "ok": _stand_in_ok,
        "skip": _stand_in_skip,
        "raises": _stand_in_raises,
        "hangs": _stand_in_hangs,
        "crashes": _stand_in_crashes,
    }
    monkeypatch.setattr(gpu_check, "STEPS", stand_ins)
    args = argparse.Namespace(tiny=True, site=None, model=None, build_ext=False)
    ctx = gpu_check.Context(args, tmp_path, {})
    got = {}
    t0 = time.monotonic()
    for name in stand_ins:
        got[name] = gpu_check._forked(name, ctx, tmp_path / f"{name}.json", timeout=3)
    assert time.monotonic() - t0 < 30
    assert got["ok"]["status"] == "ok" and got["ok"]["first"] == 1 and got["ok"]["second"] == 2
    assert got["skip"] == {**got["skip"], "status": "skipped", "reason": "not here"}
    assert got["raises"]["status"] == "failed" and "ValueError: boom" in got["raises"]["error"]
    assert got["raises"]["measured"] == 3
    assert got["hangs"]["status"] == "failed" and "timed out" in got["hangs"]["error"]
    assert got["hangs"]["before_hang"] == 4, "what it measured before it was killed is kept"
    assert got["crashes"]["status"] == "failed" and "SIGSEGV" in got["crashes"]["error"]
    assert got["crashes"]["before_crash"] == 5
