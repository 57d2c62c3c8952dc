"""TensorRT backend: serialized plans built from the exported ONNX, one optimisation profile per graph.

Needs the `tensorrt` package and an NVIDIA GPU (`pip install 'vlm2vec-rt[trt]'`). The network is built
strongly typed, so the ONNX graph's own types decide the precision: an fp16 export keeps its norms and
final L2 in fp32 here too. A plan holds compiled GPU code for one TensorRT version and GPU architecture.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from ..errors import EngineError
from .export import GraphSpec, export_onnx

NAME = "tensorrt"
PRECISIONS = ("fp32", "fp16")
INSTALL = "pip install 'vlm2vec-rt[trt]' (needs an NVIDIA GPU with CUDA)"
_WORKSPACE_BYTES = 4 << 30


def unavailable_reason(device: str) -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return f"the tensorrt package is not installed: {INSTALL}"
    import torch

    if device != "cuda":
        return f"TensorRT engines run on cuda only, not {device!r}"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is visible to torch"
    return None


def axis_ranges(limits: dict[str, int]) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per dynamic axis name; opt is the shape TensorRT tunes its kernels for."""
    return {
        "batch": (1, min(8, limits["max_batch"]), limits["max_batch"]),
        "seq": (1, min(256, limits["max_seq"]), limits["max_seq"]),
        "views": (1, min(5, limits["max_views"]), limits["max_views"]),
        "patches": (8, min(1024, limits["max_patches"]), limits["max_patches"]),
    }


def profile_shapes(spec: GraphSpec, limits: dict[str, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
    ranges = axis_ranges(limits)
    shapes = {}
    for name, tensor in zip(spec.input_names, spec.example):
        axes = spec.dynamic_axes.get(name, {})
        lo, opt, hi = (
            tuple(ranges[axes[i]][k] if i in axes else int(n) for i, n in enumerate(tensor.shape))
            for k in range(3)
        )
        shapes[name] = (lo, opt, hi)
    return shapes


def build(
    specs: dict[str, GraphSpec],
    out_dir: Path,
    *,
    precision: str,
    device: str,
    work_dir: Path,
    limits: dict[str, int],
) -> dict[str, str]:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    files = {}
    for name, spec in specs.items():
        onnx_path = export_onnx(spec, work_dir / f"{name}.onnx")
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(os.fspath(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse the {name} graph: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
        profile = builder.create_optimization_profile()
        for input_name, (lo, opt, hi) in profile_shapes(spec, limits).items():
            profile.set_shape(input_name, lo, opt, hi)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineError(f"TensorRT failed to build the {name} graph (see its log above)")
        dst = out_dir / f"{name}.plan"
        dst.write_bytes(bytes(plan))
        files[name] = dst.name
    return files


class Runner:
    """Deserialized plans with one execution context each; a lock serialises calls (a context is not
    reentrant), which costs nothing on one GPU stream."""

    def __init__(self, engine_dir: Path, manifest: dict, device: str, num_threads: int | None = None):
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engines, self.contexts = {}, {}
        for name, graph in manifest["graphs"].items():
            path = engine_dir / graph["file"]
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise EngineError(
                    f"TensorRT cannot load {os.fspath(path)!r} (built by another TensorRT version or for "
                    "another GPU? rebuild the engine on this machine)"
                )
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context()
        self.dtypes = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int64: torch.int64,
            trt.int32: torch.int32,
            trt.bool: torch.bool,
        }
        self.stream = torch.cuda.Stream()
        self.lock = threading.Lock()

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        trt, torch = self.trt, self.torch
        engine, context = self.engines.get(graph), self.contexts.get(graph)
        if engine is None or context is None:  # closed (from another thread) after the Engine read its runner
            raise EngineError("the engine is closed")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        with self.lock, torch.cuda.stream(self.stream):
            keep, outputs = [], []
            for name in names:
                if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                    continue
                dtype = self.dtypes[engine.get_tensor_dtype(name)]
                t = torch.from_numpy(np.ascontiguousarray(feeds[name])).to("cuda", dtype, non_blocking=True)
                if not context.set_input_shape(name, tuple(t.shape)):
                    raise EngineError(
                        f"{graph} input {name} of shape {tuple(t.shape)} is outside the engine's profile"
                    )
                context.set_tensor_address(name, t.data_ptr())
                keep.append(t)
            for name in names:
                if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                    continue
                shape = tuple(context.get_tensor_shape(name))
                out = torch.empty(shape, dtype=self.dtypes[engine.get_tensor_dtype(name)], device="cuda")
                context.set_tensor_address(name, out.data_ptr())
                outputs.append(out)
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError(f"TensorRT failed to run the {graph} graph")
            result = outputs[0].float().cpu()  # synchronises the stream
        return result.numpy()

    def close(self) -> None:
        self.contexts.clear()
        self.engines.clear()
