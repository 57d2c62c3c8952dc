"""onnxruntime backend: graph-optimised ONNX models in the engine; sessions with tuned threading.

fp32: the exported graphs, optimised offline for the target device. fp16: the same from an fp16 export
(norms and the final L2 stay fp32 inside the graph, see export.py). int8: the decoder's weight matmuls
dynamically quantised (int8 weights per output channel, activations quantised on the fly); the vision
graph stays fp32.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..errors import EngineError
from .export import EXTERNAL_DATA_BYTES, GraphSpec, export_onnx, release_modules

NAME = "onnxruntime"
PRECISIONS = ("fp32", "fp16", "int8")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def unavailable_reason(device: str) -> str | None:
    """Why this backend cannot run on `device` here, or None if it can."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        return f"onnxruntime is not installed ({e}): pip install onnxruntime"
    if device not in _PROVIDERS:
        return f"onnxruntime engines run on cpu or cuda, not {device!r}"
    if _PROVIDERS[device] not in ort.get_available_providers():
        return (
            f"this onnxruntime has no {_PROVIDERS[device]}: pip install 'vlm2vec-rt[gpu]' (onnxruntime-gpu)"
        )
    return None


def default_threads() -> int:
    """The cores this process may run on (affinity-aware): one intra-op thread per core, no oversubscription."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def session_options(num_threads: int | None = None, *, level: str = "all", spin: bool = True):
    """Options of one session: a thread per core, sequential execution; spin=False lets the session's
    threads sleep between runs instead of busy-waiting for the next one."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = num_threads or default_threads()
    so.inter_op_num_threads = 1  # the graphs are chains: parallel branches would only compete for the cores
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.log_severity_level = 3  # errors only
    return so


def _has_external_data(path: Path) -> bool:
    return path.with_name(path.name + ".data").exists() or path.stat().st_size > EXTERNAL_DATA_BYTES


def optimize_offline(src: Path, dst: Path, device: str) -> None:
    """Run onnxruntime's graph optimisations for `device` once and save the result (extended level: the
    fusions onnxruntime documents as safe to serialise; layout-specific ones are redone at load)."""
    import onnxruntime as ort

    so = session_options(level="extended")
    so.optimized_model_filepath = os.fspath(dst)
    if _has_external_data(src):
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", dst.name + ".data"
        )
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(os.fspath(src), so, providers=[_PROVIDERS[device]])


def quantize_matmuls(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the MatMuls with constant weights (attention's q·k and p·v stay fp32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs on the root logger: a line per tensor at INFO, and advice to pre-process first that
    # does not apply (the symbolic shape inference it means fails on dynamo-exported graphs, and the graph
    # is optimised after quantisation anyway).
    hint = _QuietQuantizer()
    logging.getLogger().addFilter(hint)
    try:
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=_has_external_data(src),
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        logging.getLogger().removeFilter(hint)


class _QuietQuantizer(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return (
            record.levelno >= logging.WARNING
            and "pre-processing before quantization" not in record.getMessage()
        )


def build(
    specs: dict[str, GraphSpec], out_dir: Path, *, precision: str, device: str, work_dir: Path
) -> dict[str, str]:
    """Export, (quantise,) optimise; returns graph name -> file name in out_dir."""
    exported = {name: export_onnx(spec, work_dir / f"{name}.onnx") for name, spec in specs.items()}
    release_modules(specs)  # the weights are in the ONNX files now: free the torch copy before compiling
    files = {}
    for name, src in exported.items():
        if precision == "int8" and name == "decoder":
            quantized = work_dir / f"{name}.int8.onnx"
            quantize_matmuls(src, quantized)
            src = quantized
        dst = out_dir / f"{name}.onnx"
        optimize_offline(src, dst, device)
        files[name] = dst.name
    return files


class Runner:
    """One onnxruntime session per graph. Session.run is thread-safe: concurrent callers share the sessions."""

    def __init__(self, engine_dir: Path, manifest: dict, device: str, num_threads: int | None = None):
        import onnxruntime as ort

        self.sessions = {}
        providers = [_PROVIDERS[device]] + (["CPUExecutionProvider"] if device != "cpu" else [])
        for name, graph in manifest["graphs"].items():
            path = os.fspath(engine_dir / graph["file"])
            try:
                # Each session has its own thread pool on the same cores. The decoder runs after the vision
                # graph, on every batch; vision threads spinning meanwhile would take the cores from it (and
                # from the image preprocessing of the next batch): measured 2x slower batch-1 image+text.
                options = session_options(num_threads, spin=name == "decoder")
                self.sessions[name] = ort.InferenceSession(path, options, providers=providers)
            except Exception as e:  # onnxruntime raises its own exception types for bad models
                raise EngineError(f"onnxruntime cannot load {path!r}: {e}") from None
        self.outputs = {name: s.get_outputs()[0].name for name, s in self.sessions.items()}

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        session = self.sessions.get(graph)
        if session is None:  # closed (from another thread) after this call's Engine read its runner
            raise EngineError("the engine is closed")
        return session.run([self.outputs[graph]], feeds)[0]

    def close(self) -> None:
        self.sessions.clear()
