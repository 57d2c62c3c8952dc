"""The two graphs of an engine as torch modules, and their export (ONNX through torch.onnx's dynamo exporter).

    vision:  the backbone's own (its module's `vision_graph`), e.g.
             LLaVA-NeXT  pixel_values [views, 3, crop, crop]            -> features [views, side*side, H]
             Qwen2-VL    pixel_values [patches, 3*T*P*P], position_ids [patches, 2] -> features [patches/4, H]
    decoder: inputs_embeds [B, S, H], attention_mask [B, S], position_ids [B, S] | [3, B, S]
             -> embedding [B, H] (last-token state, L2-normalised in fp32)

Inputs and outputs are float32 whatever the engine's precision: a graph casts to its weights' dtype on
entry and back on exit, so fp16 engines keep the eager model's mixed-precision rules (transformers' norms
compute in fp32, the EmbeddingHead pools and normalises in fp32) inside the graph.

A vision graph whose attention runs within each image (Qwen2-VL's segments come from grid_thw, which is
data-dependent) takes one image per call with what depends on the grid passed in, so nothing in the graph
depends on the grid's values.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models.backbones import Backbone


class DecoderGraph(nn.Module):
    """Decoder + last-token pooling + L2 (the backbone's EmbeddingHead) on float32 inputs_embeds."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.head = backbone.head
        self.dtype = backbone.dtype

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.head(inputs_embeds.to(self.dtype), attention_mask, position_ids)


@dataclass
class GraphSpec:
    """One graph to export: the module, example inputs and which input axes are dynamic (by axis name)."""

    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_name: str
    dynamic_axes: dict[str, dict[int, str]]
    axis_min: dict[str, int] = field(default_factory=dict)  # default 1
    axis_multiple: dict[str, tuple[str, int]] = field(default_factory=dict)  # axis = factor x another axis

    def dynamic_shapes(self) -> dict[str, dict[int, torch.export.Dim]]:
        """torch.export dims, one object per axis name so equal names are one symbol."""
        names = {axis for axes in self.dynamic_axes.values() for axis in axes.values()}
        dims = {}
        for axis in names:
            if axis in self.axis_multiple:
                base, factor = self.axis_multiple[axis]
                dims[axis] = factor * torch.export.Dim(base, min=self.axis_min.get(base, 1))
            else:
                dims[axis] = torch.export.Dim(axis, min=self.axis_min.get(axis, 1))
        return {name: {i: dims[a] for i, a in axes.items()} for name, axes in self.dynamic_axes.items()}

    def describe(self) -> dict:
        """Input names with shapes (dynamic axes by name), for the manifest."""
        shapes = {}
        for name, tensor in zip(self.input_names, self.example):
            axes = self.dynamic_axes.get(name, {})
            shapes[name] = {
                "shape": [axes.get(i, int(n)) for i, n in enumerate(tensor.shape)],
                "dtype": str(tensor.dtype).removeprefix("torch."),
            }
        return {"inputs": shapes, "output": self.output_name}


def graph_specs(backbone: Backbone) -> dict[str, GraphSpec]:
    """The vision graph (the backbone's own) and the decoder graph of a loaded backbone, with example
    inputs of odd sizes (never 0 or 1, which torch.export would specialise)."""
    hidden = backbone.hidden_size
    batch, seq = 2, 7
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, :3] = 0  # left padding in the example, as at run time
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    position_axes = {0: "batch", 1: "seq"}
    if backbone.position_rank == 3:  # M-RoPE: [3, B, S]
        positions = positions[None].expand(3, -1, -1).contiguous()
        position_axes = {1: "batch", 2: "seq"}
    decoder = GraphSpec(
        "decoder",
        DecoderGraph(backbone).eval(),
        (torch.randn(batch, seq, hidden), mask, positions),
        ["inputs_embeds", "attention_mask", "position_ids"],
        "embedding",
        {
            "inputs_embeds": {0: "batch", 1: "seq"},
            "attention_mask": {0: "batch", 1: "seq"},
            "position_ids": position_axes,
        },
    )
    return {"vision": backbone.vision_graph(), "decoder": decoder}


def release_modules(specs: dict[str, GraphSpec]) -> None:
    """Drop the specs' torch modules once exported, so the model's weights can be freed before compiling
    (the build holds no other reference to them); the specs' descriptions stay usable."""
    import gc

    for spec in specs.values():
        spec.module = None
    gc.collect()


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """The exporters' chatter (missing torchvision ops, deprecations, axis renames) is not the user's concern."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# Protobuf files stop at 2 GB: larger graphs keep their weights in `<file>.data` beside the file.
EXTERNAL_DATA_BYTES = 1 << 30


def export_onnx(spec: GraphSpec, path: str | os.PathLike) -> Path:
    """Export one graph to ONNX (dynamo exporter, onnxscript-optimised); big weights go to `path`.data."""
    path = Path(path)
    weight_bytes = sum(p.numel() * p.element_size() for p in spec.module.parameters())
    with quiet_export(), torch.no_grad():
        torch.onnx.export(
            spec.module,
            spec.example,
            path,
            dynamo=True,
            dynamic_shapes=spec.dynamic_shapes(),
            input_names=spec.input_names,
            output_names=[spec.output_name],
            optimize=True,
            external_data=weight_bytes > EXTERNAL_DATA_BYTES,
            verbose=False,
        )
    return path


def export_program(spec: GraphSpec) -> torch.export.ExportedProgram:
    """torch.export of one graph with its dynamic axes (for AOTInductor)."""
    with quiet_export(), torch.no_grad():
        return torch.export.export(spec.module, spec.example, dynamic_shapes=spec.dynamic_shapes())
