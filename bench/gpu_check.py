"""The one prepared device run: everything GPU-side measured in one command, each step timed and guarded.

bench/gpu_check.sh runs this on a lent GPU (an H200: the whole run inside 9 minutes) and, on tiny sizes, on
any CPU machine (CI), so the script cannot rot between leases. Steps, in order:

  deps             the pinned transformers from the wheels in .whl/ (bench/prepare_gpu_wheels.sh), installed
                   into the script's private site folder when this Python's transformers is another version;
                   nothing comes from the network
  build_ext        the C++ extension vlm2vec_rt._C for this Python (setup.py, compiled in parallel), when the
                   tree holds no build for it
  env              card, versions, CUDA; the machine record every figure is read against
  kernels_infonce  the fused InfoNCE against torch in fp32/fp16/bf16, then forward+backward vs eager
                   (B = 1024..8192) with peak memory and the roofline floor (bench_kernels.py's GPU check)
  kernels_topk     the fused top-k against torch.topk, then vs torch.mm + torch.topk at Q=1024, N=1M, D=1536
                   fp16 with the roofline floor
  model            a ~0.5B LLaVA-NeXT of real widths (make_tiny_model, random weights), made here
  embedder         Embedder on the device in fp16 and bf16 vs the in-order transformers pipeline
                   (bench_engine.EagerInOrder): parity to eager fp32, batch-1 p50/p99, batch-32 throughput
  preprocess       C++ tiling of 1344x1344 images into pinned host buffers and onto the device vs
                   transformers' processor (outputs checked equal first)
  end_to_end       1344x1344 image+text items through the model: preprocessing rate, model rate, encode()
                   rate: which one bounds the pipeline
  aoti_fp16        AOTInductor engine built here: parity, batch-1 p50/p99 and batch-32 throughput vs eager
  aoti_bf16        the same in bf16 (skipped, with the reason, while build_engine has no bf16 precision)
  onnxruntime_gpu  onnxruntime's CUDA provider engine (skipped, with the reason, where it is not installed)
  tensorrt         TensorRT engine (skipped, with the reason, where the package is not importable)

Each step after build_ext runs in a forked child (its own process group, killed at its time cap), so a
crash, a hang or a poisoned CUDA context costs that step only; the parent imports torch and the libraries
once (never touching CUDA) so children start in milliseconds. Every step ends as ok (with its figures),
skipped (with the reason) or failed (with the error and what it measured before); the JSON is rewritten
after each step, so a run killed at its limit still leaves what it measured.

    python bench/gpu_check.py --out DIR --site DIR [--tiny] [--only STEP,...] [--model '{"num_layers": 8}']
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# The ~0.5B model: Qwen1.5-0.5B's decoder shape (hidden 1024, 24 layers, 16 heads, MLP 2816, vocab 151936:
# 0.46B) under a ViT-B vision tower (768 wide, 12 layers, 0.09B) at LLaVA-NeXT's 336-pixel views.
# patch_size 24 (not CLIP's 14) keeps a 1344x1344 image's 17 views at 3.4k decoder tokens, under the tiny
# tokenizer's 4096-token limit (patch 14 would give 9.9k); std 0.02 as real checkpoints are initialised.
MODEL_SIZE: dict[str, Any] = dict(
    hidden_size=1024,
    num_layers=24,
    num_heads=16,
    intermediate_size=2816,
    vocab_size=151936,
    vision_hidden_size=768,
    vision_layers=12,
    vision_heads=12,
    image_size=336,
    patch_size=24,
    initializer_range=0.02,
)
BACKBONE = "llava_next"
HIGH_RES = (1344, 1344)

# Planned seconds per step on the H200 (each also its time cap there). The shell's setup and the parent's
# imports take about 30 s; the sum of what the steps are expected to take (left) stays near 7 minutes and
# the caps are kept by the deadline: no step starts past TOTAL_S_GPU, and each gets at most what is left
# after the reserve of the steps behind it.
#                    (cap on the GPU, expected there, cap on a CPU machine in tiny mode)
PLAN: dict[str, tuple[int, int, int]] = {
    "deps": (60, 10, 60),
    "build_ext": (120, 40, 300),
    "env": (30, 5, 60),
    "kernels_infonce": (75, 45, 120),
    "kernels_topk": (150, 100, 120),
    "model": (60, 30, 60),
    "embedder": (75, 45, 120),
    "preprocess": (40, 20, 60),
    "end_to_end": (45, 25, 60),
    "aoti_fp16": (240, 170, 240),
    "aoti_bf16": (30, 1, 60),
    "onnxruntime_gpu": (30, 1, 60),
    "tensorrt": (30, 1, 60),
}
TOTAL_S_GPU = 525  # of the shell's 9 minutes; the rest is its own start and the final write
TOTAL_S_CPU = 900
RESERVE_S = 3  # the least a later step is left (a skipped one takes under a second)


class Skip(Exception):
    """A step that cannot run here: its reason goes into the JSON."""


# ---- the step record ------------------------------------------------------------------------------------
class Recorder:
    """A step's figures, rewritten to its result file on every update: a child killed at its time cap
    leaves what it had measured."""

    def __init__(self, path: Path):
        self.path = path
        self.figures: dict[str, Any] = {}

    def update(self, **figures: Any) -> None:
        self.figures.update(figures)
        self.write("running")

    def write(self, status: str, **extra: Any) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"status": status, **extra, **self.figures}, default=_jsonable))
        os.replace(tmp, self.path)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):  # numpy scalars and arrays
        return x.tolist()
    return str(x)


class Context:
    """What a step sees: sizes, device, the shared work folder and the results of the steps before it."""

    def __init__(self, args: argparse.Namespace, work: Path, results: dict[str, Any]):
        self.args = args
        self.tiny: bool = args.tiny
        self.device = "cpu"
        self.work = work
        self.results = results
        self.site = Path(args.site) if args.site else None
        self.deadline = 0.0  # this step's, time.monotonic()
        self.model_size: dict[str, Any] = (
            {} if args.tiny else {**MODEL_SIZE, **json.loads(args.model or "{}")}
        )

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def model_dir(self) -> Path:
        model = self.results.get("model", {})
        if model.get("status") != "ok":
            raise Skip("no model: the model step did not succeed")
        return Path(model["path"])


# ---- setup steps (run in the parent, before torch is imported) ------------------------------------------
def _run(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess:
    # `python -c` puts its working directory first on sys.path: from the repository root it would import
    # the tree's vlm2vec_rt (no extension built for this Python) instead of the site copy
    kw.setdefault("cwd", tempfile.gettempdir())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _tail(text: str, n: int = 2000) -> str:
    return text[-n:] if text else ""


def _pinned_transformers() -> str:
    """The transformers version pyproject.toml pins."""
    match = re.search(r'"transformers==([^"]+)"', (ROOT / "pyproject.toml").read_text())
    return match.group(1) if match else "?"


_VERSION_OF = (
    "import importlib.metadata as m, sys\n"
    "try: print(m.version(sys.argv[1]))\n"
    "except m.PackageNotFoundError: print('none')"
)
# transformers' own requirements against what this Python has, once the wheels are on the path
_UNMET = """
import importlib.metadata as m, json
from packaging.requirements import Requirement
from packaging.version import Version
unmet = []
for text in m.requires("transformers") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = m.version(req.name)
    except m.PackageNotFoundError:
        unmet.append(f"{req}: not installed")
        continue
    if req.specifier and Version(have) not in req.specifier:
        unmet.append(f"{req}: have {have}")
import transformers
print(json.dumps({"transformers": transformers.__version__, "from": transformers.__file__, "unmet": unmet}))
"""


def step_deps(ctx: Context, rec: Recorder) -> dict[str, Any]:
    """The pinned transformers from .whl/ into <site>/deps (first on the path), unless already here."""
    pin = _pinned_transformers()
    have = _run([sys.executable, "-c", _VERSION_OF, "transformers"], 60).stdout.strip()
    rec.update(pinned=pin, found=have)
    if have == pin:
        raise Skip(f"transformers {have} (the pinned version) is already installed")
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if not wheels:
        raise RuntimeError(
            f"transformers is {have}, not the pinned {pin}, and .whl/ holds no wheels "
            "(run bench/prepare_gpu_wheels.sh before the device call and carry .whl)"
        )
    if ctx.site is None:
        raise RuntimeError("no --site folder to install the wheels into")
    target = ctx.site / "deps"
    # the device README's install line: no index, no dependency resolution, no byte-compiling
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)]
    t0 = time.perf_counter()
    res = _run(cmd, max(5.0, ctx.deadline - time.monotonic()))
    rec.update(wheels=[w.name for w in wheels], install_seconds=round(time.perf_counter() - t0, 1))
    if res.returncode:
        raise RuntimeError(f"pip install from .whl/ failed (exit {res.returncode}): {_tail(res.stderr)}")
    sys.path.insert(0, str(target))  # before site-packages: the forked steps inherit it
    os.environ["PYTHONPATH"] = os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    check = _run([sys.executable, "-c", _UNMET], 120)
    if check.returncode:
        raise RuntimeError(f"transformers does not import after the install: {_tail(check.stderr)}")
    found = json.loads(check.stdout.strip().splitlines()[-1])
    if found["transformers"] != pin:
        raise RuntimeError(f"transformers {found['transformers']} imports from {found['from']}, not {pin}")
    rec.update(imports_from=found["from"], unmet_requirements=found["unmet"])
    if found["unmet"]:
        raise RuntimeError(f"transformers {pin}'s requirements are not met here: {found['unmet']}")
    return {"transformers": found["transformers"]}


# pybind11's ParallelCompile spreads setup.py's sources over the cores (setuptools compiles them one by one)
_BUILD = """
import runpy, sys
from pybind11.setup_helpers import ParallelCompile
ParallelCompile(default=0).install()
sys.argv = ["setup.py", "build_ext", "--build-lib", sys.argv[1], "--build-temp", sys.argv[2]]
runpy.run_path("setup.py", run_name="__main__")
"""
_IMPORT_C = "import vlm2vec_rt._C as c, sys; print(c.__file__)"


def step_build_ext(ctx: Context, rec: Recorder) -> dict[str, Any]:
    """vlm2vec_rt._C for this Python: setup.py's build into the site folder (no install, no network); if
    setup.py itself cannot run here (an older setuptools reading pyproject.toml, say), the same sources and
    flags straight through the C++ compiler."""
    probe = _run([sys.executable, "-c", _IMPORT_C], 60)
    if probe.returncode == 0 and not ctx.args.build_ext:
        raise Skip(f"the extension is already built for this Python ({probe.stdout.strip()})")
    if ctx.site is None:
        raise RuntimeError("no --site folder to build into")
    rec.update(not_importable=_tail(probe.stderr, 300) if probe.returncode else None)
    build_tmp = ctx.site / ".build"
    attempts = []
    t0 = time.perf_counter()
    res = _run([sys.executable, "-c", _BUILD, str(ctx.site), str(build_tmp)], _left(ctx), cwd=ROOT)
    attempts.append({"how": "setup.py build_ext", "exit": res.returncode, "seconds": _since(t0)})
    if res.returncode:
        attempts[-1]["error"] = _tail(res.stderr)
        print(res.stdout[-3000:], res.stderr[-3000:], sep="\n")
        t1 = time.perf_counter()
        try:
            _compile_directly(ctx.site, build_tmp, _left(ctx))
            attempts.append({"how": "c++ directly", "exit": 0, "seconds": _since(t1)})
        except Exception as e:
            attempts.append({"how": "c++ directly", "error": _tail(str(e)), "seconds": _since(t1)})
    rec.update(attempts=attempts, seconds_compiling=_since(t0))
    probe = _run([sys.executable, "-c", _IMPORT_C], 60)
    if probe.returncode:
        raise RuntimeError(f"vlm2vec_rt._C does not import after the build: {_tail(probe.stderr, 1000)}")
    return {"built": probe.stdout.strip(), "cores": os.cpu_count()}


def _compile_directly(site: Path, tmp: Path, timeout: float) -> None:
    """setup.py's extension by hand: each source compiled in parallel with its flags, then linked."""
    import sysconfig
    from concurrent.futures import ThreadPoolExecutor

    import pybind11

    cxx = os.environ.get("CXX") or next(c for c in ("c++", "g++", "clang++") if _which(c))
    include = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    flags = ["-std=c++17", "-O3", "-ffp-contract=off", "-fPIC", "-fvisibility=hidden", "-pthread"]
    tmp.mkdir(parents=True, exist_ok=True)
    sources = sorted((ROOT / "csrc").glob("*.cpp"))
    deadline = time.monotonic() + timeout

    def compile_one(src: Path) -> Path:
        obj = tmp / (src.stem + ".o")
        cmd = [cxx, *flags, *include, "-c", str(src), "-o", str(obj)]
        res = _run(cmd, max(1.0, deadline - time.monotonic()))
        if res.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {_tail(res.stderr)}")
        return obj

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        objs = list(pool.map(compile_one, sources))
    so = site / "vlm2vec_rt" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    res = _run(
        [cxx, "-shared", "-pthread", *map(str, objs), "-o", str(so)], max(1.0, deadline - time.monotonic())
    )
    if res.returncode:
        raise RuntimeError(f"link: {_tail(res.stderr)}")


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def _left(ctx: Context) -> float:
    return max(1.0, ctx.deadline - time.monotonic())


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


# ---- measured steps (forked children) -------------------------------------------------------------------
def step_env(ctx: Context, rec: Recorder) -> dict[str, Any]:
    import torch
    import transformers
    from common import machine

    info: dict[str, Any] = {"machine": machine(), "cuda_available": torch.cuda.is_available()}
    info["transformers_from"] = transformers.__file__
    try:
        import vlm2vec_rt._C as native

        info["extension"] = native.__file__
    except ImportError as e:  # the build step's record says why; the kernels and models still run
        info["extension"] = f"not importable: {e}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["card"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "torch_cuda": torch.version.cuda,
        }
        with contextlib.suppress(Exception):
            smi = _run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                    "--format=csv",
                ],
                20,
            )
            info["nvidia_smi"] = smi.stdout.strip().splitlines()
    try:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError as e:
        info["onnxruntime_providers"] = f"not importable: {e}"
    return info


def _kernel_device(ctx: Context) -> str:
    if not ctx.cuda:
        from vlm2vec_rt.kernels.interpreter import use_interpreter

        use_interpreter()  # CPU tensors reach the Triton kernels only under the interpreter
    return ctx.device


def _ceilings(ctx: Context) -> dict[str, float] | None:
    """The card's fp16 matmul rate and copy bandwidth, measured in this run (the roofline's ceilings)."""
    import bench_kernels

    return bench_kernels._ceilings(ctx.device) if ctx.cuda else None


def step_kernels_infonce(ctx: Context, rec: Recorder) -> dict[str, Any]:
    import bench_kernels

    device = _kernel_device(ctx)
    checks = bench_kernels.gpu_check_info_nce(device, ctx.tiny)
    rec.update(checks=checks, all_correct=all(c["ok"] for c in checks))
    ceilings = _ceilings(ctx)
    rec.update(ceilings=ceilings)
    # the timed sizes stop where the step's time runs short (the rows say "skipped: time budget")
    rows = bench_kernels.gpu_infonce_timings(device, ctx.tiny, ctx.deadline - 10)
    for row in rows:
        if "median_ms" not in row:
            continue
        b, n, d = row["b"], row["b"] + row["m"], row["d"]
        elem = 2 if "16" in row["dtype"] else 4
        # the least any implementation does: the logits (2BND) and both gradients (4BND), reading q, t and
        # writing dq, dt once; the fused kernel recomputes the logits in its backward pass, eager does not
        flops, min_bytes = 6 * b * n * d, 2 * (b + n) * d * elem
        row["flops"], row["min_bytes"] = flops, min_bytes
        if ceilings:
            floor_ms = 1e3 * max(
                flops / (ceilings["fp16_matmul_tflops"] * 1e12), min_bytes / (ceilings["copy_gb_s"] * 1e9)
            )
            row["roofline_floor_ms"] = floor_ms
            row["fraction_of_floor"] = {k: floor_ms / v for k, v in row["median_ms"].items()}
        peak = row["peak_extra_mb"].get("fused")
        row["fused_peak_extra_per_bd_input"] = None if peak is None else peak / (b * d * elem / 2**20)
    timed = [r for r in rows if "median_ms" in r]
    largest = [r for r in timed if r["b"] == max(x["b"] for x in timed)] if timed else []
    mem = [r["fused_peak_extra_per_bd_input"] for r in timed]
    targets = {
        "all correct": all(c["ok"] for c in checks),
        "fused >= 2x eager bf16 at the largest B": all(r["speedup_vs_eager_bf16"] >= 2 for r in largest)
        if ctx.cuda and largest
        else None,
        # O(B*D): the fused step's extra memory stays within a few B x D inputs (never a B x B matrix)
        "fused peak extra <= 8 B x D inputs": all(m <= 8 for m in mem) if mem and None not in mem else None,
    }
    return {"checks": checks, "ceilings": ceilings, "timings": rows, "targets": targets}


def step_kernels_topk(ctx: Context, rec: Recorder) -> dict[str, Any]:
    """fp16 (the timed dtype) checked, then timed, then the other dtypes checked: each new dtype and
    variant compiles the sorting networks anew, so a step cut short at its cap still holds the target."""
    import bench_kernels
    import torch

    device = _kernel_device(ctx)
    ceilings = _ceilings(ctx)
    rec.update(ceilings=ceilings)
    checks = bench_kernels.gpu_check_topk(device, ctx.tiny, dtypes=[torch.float16])
    rec.update(checks=checks)
    # the optional tile variants stop a minute before the cap: the timed runs and the other dtypes' checks
    timing = bench_kernels.gpu_topk_timings(device, ctx.tiny, ctx.deadline - 60, ceilings)
    rec.update(timing=timing)
    others = [dt for dt in bench_kernels._dtypes(device) if dt != torch.float16]
    checks += bench_kernels.gpu_check_topk(device, ctx.tiny, dtypes=others)
    targets = {
        "all correct": all(c["ok"] for c in checks),
        "fused >= 1.5x torch.mm+topk": timing["speedup_vs_torch_mm_topk"] >= 1.5 if ctx.cuda else None,
    }
    return {"ceilings": ceilings, "checks": checks, "timing": timing, "targets": targets}


def step_model(ctx: Context, rec: Recorder) -> dict[str, Any]:
    from safetensors import safe_open

    from vlm2vec_rt import make_tiny_model

    t0 = time.perf_counter()
    path = make_tiny_model(ctx.work / "model", BACKBONE, **ctx.model_size)
    params = lm_head = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                n = 1
                for s in st.get_slice(key).get_shape():
                    n *= s
                params += n
                lm_head += n if "lm_head" in key else 0
    return {
        "path": str(path),
        "backbone": BACKBONE,
        "size": ctx.model_size or "make_tiny_model's defaults",
        "parameters": params,
        # what embeddings run through: the Embedder and the engines drop the LM head
        "parameters_without_lm_head": params - lm_head,
        "seconds": _since(t0),
    }


def _workloads(ctx: Context) -> dict[str, list[list]]:
    """bench_engine's text and image+text input sets: the same items for every encoder of a step."""
    import numpy as np
    from bench_engine import THROUGHPUT_BATCH, image_text_items, text_items

    rng = np.random.default_rng(0)
    # tiny: one small set each (a CPU runs fp16/bf16 image models slowly), for CI's sake
    n_sets, size, images = (1, 8, 4) if ctx.tiny else (2, THROUGHPUT_BATCH, THROUGHPUT_BATCH)
    return {
        "text": [text_items(rng, size) for _ in range(n_sets)],
        "image+text": [image_text_items(rng, images) for _ in range(n_sets)],
    }


def _timings(ctx: Context, encoders: dict[str, Any], workloads: dict[str, list[list]]) -> dict[str, Any]:
    """bench_engine's batch-1 latency (p50/p99, encoders alternating item by item) and batch-32 throughput
    (input sets A B A B) for each workload."""
    from bench_engine import latency, throughput

    lat_items, rounds, repeats = (2, 1, 1) if ctx.tiny else (16, 2, 2)
    out: dict[str, Any] = {"latency_batch1": {}, "throughput_batch32": {}}
    for wl, sets in workloads.items():
        out["latency_batch1"][wl] = latency(encoders, sets[0][:lat_items], rounds=rounds)
        out["throughput_batch32"][wl] = throughput(encoders, sets, repeats=repeats)
    return out


def _vs_eager(timings: dict[str, Any], name: str) -> dict[str, Any]:
    """`name` against the in-order pipeline ("eager", the targets' baseline) per workload."""
    out = {}
    for wl in timings["latency_batch1"]:
        lat, tp = timings["latency_batch1"][wl], timings["throughput_batch32"][wl]
        out[wl] = {
            "latency_p50_ratio": lat[name]["median_ms"] / lat["eager"]["median_ms"],
            "latency_p99_ratio": lat[name]["p99_ms"] / lat["eager"]["p99_ms"],
            "throughput_ratio": tp[name]["median_items_per_s"] / tp["eager"]["median_items_per_s"],
        }
    return out


def _free(ctx: Context) -> None:
    import gc

    gc.collect()
    if ctx.cuda:
        import torch

        torch.cuda.empty_cache()


def _reference(ctx: Context, model: Path, workloads: dict[str, list[list]]) -> dict[str, Any]:
    """Eager fp32 embeddings of every workload item, on the step's device: what parity is measured against."""
    from bench_engine import THROUGHPUT_BATCH

    from vlm2vec_rt import Embedder

    emb = Embedder.from_pretrained(model, device=ctx.device, dtype="float32")
    ref = {
        wl: emb.encode([x for s in sets for x in s], batch_size=THROUGHPUT_BATCH)
        for wl, sets in workloads.items()
    }
    del emb
    _free(ctx)
    return ref


def step_embedder(ctx: Context, rec: Recorder) -> dict[str, Any]:
    from bench_engine import THROUGHPUT_BATCH, EagerInOrder, min_cosine

    from vlm2vec_rt import Embedder
    from vlm2vec_rt.engine.manifest import PARITY_THRESHOLDS

    model = ctx.model_dir()
    workloads = _workloads(ctx)
    ref = _reference(ctx, model, workloads)
    out: dict[str, Any] = {}
    for dtype in ("float16", "bfloat16"):
        t0 = time.perf_counter()
        emb = Embedder.from_pretrained(model, device=ctx.device, dtype=dtype)
        load_s = _since(t0)
        cos = {
            wl: min_cosine(emb.encode([x for s in sets for x in s], batch_size=THROUGHPUT_BATCH), ref[wl])
            for wl, sets in workloads.items()
        }
        encoders = {"eager": EagerInOrder(emb), "eager-by-length": emb}
        timings = _timings(ctx, encoders, workloads)
        # fp16 has the engines' fp16 gate; bf16 (7 mantissa bits) has no gate of its own: reported only
        gate = PARITY_THRESHOLDS["fp16"] if dtype == "float16" else None
        out[dtype] = {
            "load_seconds": load_s,
            "min_cosine_vs_eager_fp32": cos,
            "parity_gate": gate,
            "parity_ok": None if gate is None else all(c >= gate for c in cos.values()),
            **timings,
            "by_length_vs_in_order": _vs_eager(timings, "eager-by-length"),
        }
        if ctx.cuda:
            import torch

            out[dtype]["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rec.update(**out)
        del emb, encoders
        _free(ctx)
    return out


def _engine_step(ctx: Context, rec: Recorder, backend: str, precision: str) -> dict[str, Any]:
    """Build a `backend` engine of `precision` here, check it, then time it against eager in that dtype."""
    from bench_engine import THROUGHPUT_BATCH, EagerInOrder, min_cosine

    from vlm2vec_rt import Embedder, Engine, build_engine
    from vlm2vec_rt.engine import backends, manifest

    device = "cuda" if backend != "aoti" else ctx.device
    if backend != "aoti" and not ctx.cuda:
        raise Skip(f"{backend} engines for cuda need a CUDA device; none here")
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise Skip("the tensorrt package is not importable here (not installed on this machine)")
    module = backends.backend_module(backend)
    if precision not in module.PRECISIONS or precision not in manifest.PRECISIONS:
        raise Skip(
            f"build_engine does not build {precision} {backend} engines: the backend builds "
            f"{', '.join(module.PRECISIONS)} and the engine format knows {', '.join(manifest.PRECISIONS)} "
            f"(a {precision} engine needs a '{precision}' precision with a parity threshold, {precision} "
            "source weights in the build and host assets in that dtype)"
        )
    reason = module.unavailable_reason(device)
    if reason is not None:
        raise Skip(f"the {backend} backend is unavailable on {device}: {reason}")
    if backend == "onnxruntime":
        import onnxruntime

        providers = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            raise Skip(
                f"onnxruntime {onnxruntime.__version__} has no CUDA provider ({', '.join(providers)}): "
                "onnxruntime-gpu is not installed"
            )
    if backend == "aoti" and ctx.tiny and not ctx.cuda:
        # CI's CPU run checks that the build works, not how fast the code is: unvectorised kernels and an
        # unoptimised wrapper halve the C++ compile time of the tiny model's two graphs
        import torch._inductor.config as inductor

        inductor.aot_inductor.compile_wrapper_opt_level = "O0"
        inductor.cpp.vec_isa_ok = False
        rec.update(inductor_config="tiny CPU run: wrapper -O0, kernels unvectorised")

    model = ctx.model_dir()
    dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[precision]
    name = f"{backend}-{precision}"
    t0 = time.perf_counter()
    rec.update(phase="build (export, compile, parity gate against eager fp32)")
    path = build_engine(model, ctx.work / name, precision=precision, backend=backend, device=device)
    engine = Engine.load(path, device=device)
    rec.update(build_seconds=_since(t0), build_parity=engine.manifest.get("parity"))

    rec.update(phase="parity and timings")
    workloads = _workloads(ctx)
    emb = Embedder.from_pretrained(model, device=device, dtype=dtype)
    gate = manifest.PARITY_THRESHOLDS[precision]
    cos = {}
    for wl, sets in workloads.items():
        items = [x for s in sets for x in s]
        cos[wl] = min_cosine(
            engine.encode(items, batch_size=THROUGHPUT_BATCH), emb.encode(items, batch_size=THROUGHPUT_BATCH)
        )
    rec.update(min_cosine_vs_eager_same_dtype=cos, parity_gate=gate)
    if min(cos.values()) < gate:
        raise RuntimeError(f"engine vs eager {dtype}: cosine {min(cos.values()):.6f} < {gate}: not timed")
    encoders = {"eager": EagerInOrder(emb), "eager-by-length": emb, name: engine}
    timings = _timings(ctx, encoders, workloads)
    vs = _vs_eager(timings, name)
    targets = {
        "parity gates hold": True,
        "batch-1 latency <= 1/3 eager (every workload)": all(
            v["latency_p50_ratio"] <= 1 / 3 for v in vs.values()
        )
        if ctx.cuda
        else None,
        "batch-32 throughput >= 1.5x eager (every workload)": all(
            v["throughput_ratio"] >= 1.5 for v in vs.values()
        )
        if ctx.cuda
        else None,
    }
    engine.close()
    return {"device": device, **timings, "vs_eager": vs, "targets": targets}


def step_aoti_fp16(ctx: Context, rec: Recorder) -> dict[str, Any]:
    return _engine_step(ctx, rec, "aoti", "fp16")


def step_aoti_bf16(ctx: Context, rec: Recorder) -> dict[str, Any]:
    return _engine_step(ctx, rec, "aoti", "bf16")


def step_onnxruntime_gpu(ctx: Context, rec: Recorder) -> dict[str, Any]:
    return _engine_step(ctx, rec, "onnxruntime", "fp16")


def step_tensorrt(ctx: Context, rec: Recorder) -> dict[str, Any]:
    return _engine_step(ctx, rec, "tensorrt", "fp16")


def step_preprocess(ctx: Context, rec: Recorder) -> dict[str, Any]:
    """1344x1344 images: the C++ tiling (fp16, all cores) into pinned host memory and onto the device,
    against transformers' processor (fp32, one core: what the eager pipeline would feed) on a few of them.
    The C++ variants alternate (A B C A B C); every output is checked equal to the processor's first."""
    import numpy as np
    import torch
    from bench_tiling import PINPOINTS, check_llava, make_images
    from common import ab_times, stats
    from transformers import LlavaNextImageProcessorPil

    from vlm2vec_rt import tiling

    n = 4 if ctx.tiny else 32
    threads = os.cpu_count() or 1
    images = make_images(*HIGH_RES, n, seed=13)
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS
    )
    check = check_llava(images[: min(n, 4)], processor)
    rec.update(check=check)
    if not (check["exact_fp32"] and check["exact_fp16"]):
        raise RuntimeError(f"the C++ tiling differs from transformers' processor: {check}")
    views = check["views"]
    shape = (n * views, 3, 336, 336)
    pinned = torch.empty(shape, dtype=torch.float16, pin_memory=ctx.cuda)
    on_device = torch.empty(shape, dtype=torch.float16, device=ctx.device)

    def cpp() -> list:
        return tiling.anyres_batch(images, grid_pinpoints=PINPOINTS, dtype="float16", num_threads=threads)

    def cpp_pinned_to_device() -> None:
        # the tiling returns fresh arrays: one host copy into the pinned staging buffer, then an async DMA
        for i, views_of in enumerate(cpp()):
            pinned[i * views : (i + 1) * views].copy_(torch.from_numpy(views_of))
        on_device.copy_(pinned, non_blocking=True)
        ctx.sync()

    def cpp_pageable_to_device() -> None:
        for i, views_of in enumerate(cpp()):
            on_device[i * views : (i + 1) * views].copy_(torch.from_numpy(views_of))
        ctx.sync()

    def dma_only() -> None:
        on_device.copy_(pinned, non_blocking=True)
        ctx.sync()

    fns = {
        "cpp_fp16": cpp,
        "cpp_fp16_pinned_to_device": cpp_pinned_to_device,
        "cpp_fp16_pageable_to_device": cpp_pageable_to_device,
        "pinned_copy_to_device_only": dma_only,
    }
    times = ab_times(fns, repeats=2 if ctx.tiny else 5, warmup=1)
    med = {k: stats(v)["median_ms"] for k, v in times.items()}
    per_s = {k: n / (ms / 1e3) for k, ms in med.items() if k != "pinned_copy_to_device_only"}
    rec.update(median_ms=med, images_per_s=per_s)

    # transformers' processor takes about 0.3 s an image at this size on one core: a few images, twice
    few = images[: min(n, 8)]
    few_shape = (len(few) * views, 3, 336, 336)
    few_on_device = torch.empty(few_shape, dtype=torch.float32, device=ctx.device)

    def transformers_to_device() -> None:
        pv = processor(few, return_tensors="np", input_data_format="channels_last")["pixel_values"]
        few_on_device.copy_(torch.from_numpy(np.ascontiguousarray(pv.reshape(few_shape))))
        ctx.sync()

    slow = ab_times({"transformers_fp32_to_device": transformers_to_device}, repeats=2, warmup=0)
    med["transformers_fp32_to_device"] = stats(slow["transformers_fp32_to_device"])["median_ms"]
    per_s["transformers_fp32_to_device"] = len(few) / (med["transformers_fp32_to_device"] / 1e3)
    nbytes = pinned.numel() * 2
    return {
        "images": n,
        "size": f"{HIGH_RES[1]}x{HIGH_RES[0]}",
        "views_per_image": views,
        "threads": threads,
        "pinned": ctx.cuda,
        "device": ctx.device,
        "median_ms": med,
        "images_per_s": per_s,
        "pinned_copy_gb_s": nbytes / (med["pinned_copy_to_device_only"] / 1e3) / 1e9,
        "speedup_cpp_pinned_vs_transformers": per_s["cpp_fp16_pinned_to_device"]
        / per_s["transformers_fp32_to_device"],
        "note": "cpp_* = vlm2vec_rt.tiling.anyres_batch (fp16, all cores); transformers = "
        "LlavaNextImageProcessorPil (fp32), each through to a device tensor",
    }


def step_end_to_end(ctx: Context, rec: Recorder) -> dict[str, Any]:
    """1344x1344 image+text items through the Embedder (resolution "high"): preprocessing alone (C++, and
    transformers' processor on a few items), the model alone on prepared batches, and encode() with its
    preprocessing on a worker thread: the slower of the first two bounds the third."""
    import torch
    from bench_tiling import make_images

    from vlm2vec_rt import Embedder, Item
    from vlm2vec_rt.models.preprocessors import load_preprocessor

    model = ctx.model_dir()
    n, batch = (4, 2) if ctx.tiny else (32, 8)
    dtype = "float16" if ctx.cuda else "float32"
    images = make_images(*HIGH_RES, n, seed=29)
    items = [
        Item(
            image=im,
            text="What is in the image?",
            instruction="Represent the given image with the following question: ",
        )
        for im in images
    ]
    emb = Embedder.from_pretrained(model, device=ctx.device, dtype=dtype, image_resolution="high")
    pre = emb.pre

    def prepare() -> list:
        return pre.prepare_many(items)

    t0 = time.perf_counter()
    prepared = prepare()
    tokens = [len(ids) for ids, _ in prepared]
    batches = [pre.collate(prepared[i : i + batch]) for i in range(0, n, batch)]

    def model_only() -> None:
        with torch.inference_mode():
            for b in batches:
                emb.backbone.forward(emb.backbone.to_device(b)).cpu()
        ctx.sync()

    def encode() -> None:
        emb.encode(items, batch_size=batch)

    model_only()  # warm-up (allocator, kernels) before timing
    encode()
    rec.update(warmup_seconds=_since(t0), decoder_tokens_per_item=max(tokens))
    reps = 1 if ctx.tiny else 3
    timed: dict[str, list[float]] = {"preprocess_cpp": [], "model": [], "encode": []}
    for _ in range(reps):  # A B C A B C
        for name, fn in (("preprocess_cpp", prepare), ("model", model_only), ("encode", encode)):
            t = time.perf_counter()
            fn()
            timed[name].append(time.perf_counter() - t)
    rate = {k: n / sorted(v)[len(v) // 2] for k, v in timed.items()}
    # transformers' processor on a few items only: at 1344x1344 it takes a good part of a second each
    few = items[: min(n, 4)]
    slow = load_preprocessor(model, image_resolution="high", tiling="transformers")
    t = time.perf_counter()
    slow.prepare_many(few)
    rate["preprocess_transformers"] = len(few) / (time.perf_counter() - t)
    bound = "preprocessing" if rate["preprocess_cpp"] < rate["model"] else "model"
    return {
        "items": n,
        "batch": batch,
        "dtype": dtype,
        "device": ctx.device,
        "decoder_tokens_per_item": max(tokens),
        "items_per_s": rate,
        "bottleneck": bound,
        # 1.0: encode() runs at the slower stage's rate (preprocessing fully hidden behind the model)
        "encode_vs_slower_stage": rate["encode"] / min(rate["preprocess_cpp"], rate["model"]),
        "bottleneck_with_transformers_processor": "preprocessing"
        if rate["preprocess_transformers"] < rate["model"]
        else "model",
    }


STEPS: dict[str, Callable[[Context, Recorder], dict[str, Any]]] = {
    "env": step_env,
    "kernels_infonce": step_kernels_infonce,
    "kernels_topk": step_kernels_topk,
    "model": step_model,
    "embedder": step_embedder,
    "preprocess": step_preprocess,
    "end_to_end": step_end_to_end,
    "aoti_fp16": step_aoti_fp16,
    "aoti_bf16": step_aoti_bf16,
    "onnxruntime_gpu": step_onnxruntime_gpu,
    "tensorrt": step_tensorrt,
}
MODEL_STEPS = {"embedder", "end_to_end", "aoti_fp16", "aoti_bf16", "onnxruntime_gpu", "tensorrt"}
SETUP: dict[str, Callable[[Context, Recorder], dict[str, Any]]] = {
    "deps": step_deps,
    "build_ext": step_build_ext,
}
ALL_STEPS = [*SETUP, *STEPS]
assert set(ALL_STEPS) == set(PLAN)


# ---- running the steps ----------------------------------------------------------------------------------
def _finish(rec: Recorder, fn: Callable, ctx: Context) -> None:
    """Run a step and write its final record (ok / skipped / failed)."""
    t0 = time.perf_counter()
    try:
        figures = fn(ctx, rec) or {}
        rec.figures.update(figures)
        rec.write("ok", seconds=_since(t0))
    except Skip as e:
        rec.write("skipped", reason=str(e), seconds=_since(t0))
    except BaseException as e:  # noqa: BLE001 - every failure is the step's record, never the run's end
        traceback.print_exc()
        rec.write(
            "failed", error=f"{type(e).__name__}: {e}"[:4000], traceback=_tail(traceback.format_exc(), 3000),
            seconds=_since(t0),
        )  # fmt: skip


def _in_parent(name: str, ctx: Context, result: Path) -> dict[str, Any]:
    _finish(Recorder(result), SETUP[name], ctx)
    return json.loads(result.read_text())


def _forked(name: str, ctx: Context, result: Path, timeout: float) -> dict[str, Any]:
    """The step in a forked child of its own process group, killed (with whatever it started: compiler
    workers, g++) when its time is up; its record is what it wrote, or what it had written when it died."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        code = 0
        try:
            os.setpgid(0, 0)
            _finish(Recorder(result), STEPS[name], ctx)
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also here: no race with the child's own call
    end = time.monotonic() + timeout
    status = None
    while status is None:
        done, status_code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = status_code
        elif time.monotonic() > end:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return _died(result, f"timed out: killed at its cap of {timeout:.0f} s")
        else:
            time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # what the step left running (compile workers)
    if os.WIFSIGNALED(status):
        return _died(result, f"died with signal {signal.Signals(os.WTERMSIG(status)).name}")
    try:
        record = json.loads(result.read_text())
    except (OSError, ValueError):
        return _died(result, f"exited {os.waitstatus_to_exitcode(status)} without a record")
    if record.get("status") == "running":
        return _died(result, f"exited {os.waitstatus_to_exitcode(status)} mid-step")
    return record


def _died(result: Path, error: str) -> dict[str, Any]:
    try:
        partial = json.loads(result.read_text())
    except (OSError, ValueError):
        partial = {}
    partial.pop("status", None)
    return {"status": "failed", "error": error, **partial}


def _cuda_usable() -> bool:
    """Whether torch sees a GPU, asked in a throwaway child: the parent must never initialise CUDA, or its
    forked steps could not use it."""
    pid = os.fork()
    if pid == 0:
        try:
            import torch

            os._exit(0 if torch.cuda.is_available() else 1)
        except BaseException:  # noqa: BLE001
            os._exit(2)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def _preimport() -> None:
    """The libraries every step uses, imported once in the parent so forked steps start at once. Nothing
    here touches CUDA."""
    import numpy  # noqa: F401
    import torch  # noqa: F401

    with contextlib.suppress(Exception):  # an import that fails here fails in its steps, with their record
        import bench_engine  # noqa: F401
        import bench_kernels  # noqa: F401
        import transformers

        from vlm2vec_rt import Embedder, Engine, build_engine  # noqa: F401

        transformers.LlavaNextForConditionalGeneration  # noqa: B018 - resolves the lazy module now


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Status per step, and the targets the steps report, flattened."""
    status = {name: r.get("status") for name, r in results["steps"].items()}
    targets = {}
    for name, r in results["steps"].items():
        for key, value in (r.get("targets") or {}).items():
            targets[f"{name}: {key}"] = value
    return {"status": status, "targets": targets}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json")
    ap.add_argument("--site", default=None, help="the script's private site folder (wheels, extension)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (automatic without a GPU)")
    ap.add_argument("--only", default=None, help="comma-separated steps (setup steps always run)")
    ap.add_argument("--model", default=None, help="JSON of make_tiny_model size keywords over the 0.5B ones")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for the whole run")
    ap.add_argument("--build-ext", action="store_true", help="build the extension even where one imports")
    args = ap.parse_args(argv)

    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= set(STEPS):
        ap.error(f"--only takes steps of {', '.join(STEPS)}")
    if only is not None:
        only.add("env")  # the machine record every figure is read against
        if only & MODEL_STEPS:
            only.add("model")
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    results: dict[str, Any] = {"benchmark": "gpu_check", "complete": False, "steps": {}}
    ctx = Context(args, work, results["steps"])
    plan = {name: PLAN[name] for name in ALL_STEPS}

    def write() -> None:
        results["wall_s"] = round(time.monotonic() - start, 1)
        results.update(summarise(results))
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(results, indent=1, default=_jsonable))
        os.replace(tmp, out / "gpu_check.json")

    def run(name: str, runner: Callable[[float], dict[str, Any]]) -> None:
        # the setup steps run before torch says whether there is a GPU: nvidia-smi says it for them
        gpu = ctx.cuda or (name in SETUP and _which("nvidia-smi"))
        cap = plan[name][0 if gpu else 2]
        later = ALL_STEPS[ALL_STEPS.index(name) + 1 :]
        left = total - (time.monotonic() - start) - RESERVE_S * len(later)
        if only is not None and name in STEPS and name not in only:
            record = {"status": "skipped", "reason": "not in --only"}
        elif left < 1:
            record = {"status": "skipped", "reason": f"time budget: {total:.0f} s spent before this step"}
        else:
            timeout = min(cap, left)
            ctx.deadline = time.monotonic() + timeout
            print(f"\n==== {name} (cap {timeout:.0f} s, {time.monotonic() - start:.0f} s in)", flush=True)
            t0 = time.perf_counter()
            record = runner(timeout)
            record["wall_s"] = _since(t0)
            record["cap_s"] = round(timeout)
        ctx.results[name] = record
        brief = record.get("reason") or record.get("error") or ""
        print(f"==== {name}: {record['status']} {brief[:300]}", flush=True)
        write()

    # the setup steps decide what the rest imports: run before torch is; the GPU's plan applies to them
    total = TOTAL_S_GPU
    results["plan_s"] = {
        name: {"cap_gpu": p[0], "expected_gpu": p[1], "cap_cpu_tiny": p[2]} for name, p in plan.items()
    }
    for name in SETUP:
        run(name, lambda _t, name=name: _in_parent(name, ctx, work / f"{name}.json"))

    import torch  # noqa: F401 - once, before the probe forks: the children then start with it imported

    ctx.device = "cuda" if _cuda_usable() else "cpu"
    if not ctx.cuda:
        ctx.tiny = True  # no GPU: the whole sequence on tiny sizes
        ctx.model_size = {}
    total = args.budget_s or (TOTAL_S_GPU if ctx.cuda else TOTAL_S_CPU)
    results.update(device=ctx.device, tiny=ctx.tiny, budget_s=total)
    _preimport()
    for name in STEPS:
        run(name, lambda timeout, name=name: _forked(name, ctx, work / f"{name}.json", timeout))
    results["complete"] = True
    write()
    print(f"\n== gpu_check on {ctx.device} (tiny={ctx.tiny}), {results['wall_s']:.0f} s ==")
    for name, r in results["steps"].items():
        detail = r.get("reason") or r.get("error") or ""
        print(f"  {name:16s} {r['status']:8s} {r.get('wall_s', 0):6.1f} s  {detail[:150]}")
    for key, value in results["targets"].items():
        print(f"  target {key}: {value}")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
