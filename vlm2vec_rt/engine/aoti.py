"""AOTInductor backend: torch.export + AOTInductor into one `.pt2` package per graph (CPU or CUDA).

A .pt2 package holds compiled native code: load engines of this backend only from builds you trust (the
manifest's hashes are checked before loading, as for every engine).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import EngineError
from .export import GraphSpec, export_program, quiet_export

NAME = "aoti"
PRECISIONS = ("fp32", "fp16")


def unavailable_reason(device: str) -> str | None:
    if device == "cuda":
        if not torch.cuda.is_available():
            return "AOTInductor engines for cuda need a CUDA GPU and a CUDA build of torch"
        return None
    if device != "cpu":
        return f"AOTInductor engines run on cpu or cuda, not {device!r}"
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "AOTInductor on CPU compiles C++: install a C++ compiler (g++ or clang++)"
    return None


def module_on(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """`module` with its weights on `device`, never moving the caller's module: a graph's weights may be
    the build's eager fp32 reference, which must stay whole on its device for the parity gate."""
    target = torch.device(device)
    if all(t.device == target for t in [*module.parameters(), *module.buffers()]):
        return module  # nothing would move (a CPU build): no copy
    return copy.deepcopy(module).to(target)  # a copy of this graph's weights only (export.py)


def build(
    specs: dict[str, GraphSpec], out_dir: Path, *, precision: str, device: str, work_dir: Path
) -> dict[str, str]:
    files = {}
    for name, spec in specs.items():
        on_device = dataclasses.replace(
            spec, module=module_on(spec.module, device), example=tuple(t.to(device) for t in spec.example)
        )
        dst = out_dir / f"{name}.pt2"
        program = export_program(on_device)
        with quiet_export():
            torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(dst))
        files[name] = dst.name
    return files


class Runner:
    """The loaded packages; AOTInductor's model container serialises concurrent calls itself."""

    def __init__(self, engine_dir: Path, manifest: dict, device: str, num_threads: int | None = None):
        self.device = torch.device(device)
        self.models = {}
        self.inputs = {}
        for name, graph in manifest["graphs"].items():
            path = os.fspath(engine_dir / graph["file"])
            try:
                self.models[name] = torch._inductor.aoti_load_package(path)
            except Exception as e:  # compiled-package loader errors are RuntimeErrors of many kinds
                raise EngineError(f"AOTInductor cannot load {path!r}: {e}") from None
            self.inputs[name] = list(graph["inputs"])

    @torch.inference_mode()
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        model = self.models.get(graph)
        if model is None:  # closed (from another thread) after this call's Engine read its runner
            raise EngineError("the engine is closed")
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.inputs[graph]]
        out = model(*args)
        if isinstance(out, (list, tuple)):
            out = out[0]
        return out.float().cpu().numpy()

    def close(self) -> None:
        self.models.clear()
