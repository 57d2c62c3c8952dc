"""The engine backends by name, their availability on this machine, and what `backend="auto"` picks."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import EngineError

BACKENDS = {"onnxruntime": ".ort", "tensorrt": ".trt", "aoti": ".aoti"}
CHOICES = ("auto", *BACKENDS)


def backend_module(name: str) -> ModuleType:
    """The module implementing backend `name` (unavailable_reason, build, Runner, PRECISIONS)."""
    if name not in BACKENDS:
        raise EngineError(f"unknown engine backend {name!r}; choose one of {', '.join(CHOICES)}")
    return importlib.import_module(BACKENDS[name], __package__)


def require(name: str, device: str, precision: str | None = None) -> ModuleType:
    """The backend's module, or EngineError saying why it cannot run `precision` on `device` here."""
    module = backend_module(name)
    if precision is not None and precision not in module.PRECISIONS:
        raise EngineError(
            f"the {name} backend builds {', '.join(module.PRECISIONS)} engines, not {precision} "
            "(int8 engines are built with --backend onnxruntime)"
        )
    reason = module.unavailable_reason(device)
    if reason is not None:
        raise EngineError(f"the {name} backend is not available on {device}: {reason}")
    return module


def pick_auto(precision: str, device: str) -> str:
    """The fastest backend available here for `precision` on `device`.

    CPU: onnxruntime. bench/bench_engine.py on a 27M-parameter LLaVA-NeXT (2 shared cores, end to end)
    measured onnxruntime fp32 at 2.6x / 2.9x eager throughput at batch 32 (text / image+text) against
    1.1x / 1.2x for AOTInductor fp32, and 39 ms against 528 ms text latency at batch 1; a decoder-only
    run on a quieter machine kept the order (batch 32: 231 ms vs 1104 ms). onnxruntime is the only
    backend with int8 (bench/results/engine.json).
    CUDA: TensorRT when installed (not measured in this project: no lent GPU had TensorRT), else
    onnxruntime's CUDA provider when onnxruntime-gpu is installed, else AOTInductor.
    """
    if precision == "int8":
        order = ["onnxruntime"]
    elif device == "cuda":
        order = ["tensorrt", "onnxruntime", "aoti"]
    else:
        order = ["onnxruntime", "aoti"]
    reasons = []
    for name in order:
        reason = backend_module(name).unavailable_reason(device)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise EngineError(f"no engine backend can build {precision} for {device} here ({'; '.join(reasons)})")
