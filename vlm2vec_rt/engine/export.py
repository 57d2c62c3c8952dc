"""The two graphs of an engine as torch modules, and their export (ONNX through torch.onnx's dynamo exporter).

    vision:  LLaVA-NeXT  pixel_values [views, 3, crop, crop]            -> features [views, side*side, H]
             Qwen2-VL    pixel_values [patches, 3*T*P*P], position_ids [patches, 2] -> features [patches/4, H]
    decoder: inputs_embeds [B, S, H], attention_mask [B, S], position_ids [B, S] | [3, B, S]
             -> embedding [B, H] (last-token state, L2-normalised in fp32)

Inputs and outputs are float32 whatever the engine's precision: a graph casts to its weights' dtype on
entry and back on exit, so fp16 engines keep the eager model's mixed-precision rules (transformers' norms
compute in fp32, the EmbeddingHead pools and normalises in fp32) inside the graph.

Qwen2-VL's vision attention runs within each image (segments from grid_thw, data-dependent): the vision
graph takes one image per call, its patch positions passed in (transformers' vision encoders accept the
precomputed `position_ids` / `cu_seqlens`), so nothing in the graph depends on the grid's values.
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


class LlavaNextVisionGraph(nn.Module):
    """CLIP tower + projector over a stack of views (the backbone's encode_views).

    Holds only the tower, the projector and the config, never the whole backbone: a deep copy of a graph
    (aoti.py, to compile on another device) copies exactly the weights the graph uses.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.vision_tower = backbone.inner.vision_tower  # registered so export sees the parameters
        self.multi_modal_projector = backbone.inner.multi_modal_projector
        self.config = backbone.config
        self.dtype = backbone.dtype
        self._encode_views = type(backbone).encode_views

    @property
    def inner(self) -> nn.Module:
        # encode_views reads self.inner.vision_tower / .multi_modal_projector and self.config: this
        # module has them, so the backbone's method runs on it unchanged
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._encode_views(self, pixel_values.to(self.dtype), None).float()


class Qwen2VLVisionGraph(nn.Module):
    """Qwen2-VL's vision transformer + merger over the patches of one image."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.visual = backbone.inner.visual
        self.dtype = backbone.dtype

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # one image: a single attention segment over all its patches
        cu_seqlens = torch.tensor([0, pixel_values.shape[0]], dtype=torch.int32, device=pixel_values.device)
        out = self.visual(
            pixel_values.to(self.dtype), grid_thw=None, position_ids=position_ids, cu_seqlens=cu_seqlens
        )
        return out.pooler_output.float()


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
    """The vision and decoder graphs of a loaded backbone, with example inputs of odd sizes (never 0 or 1,
    which torch.export would specialise)."""
    hidden = backbone.hidden_size
    batch, seq = 2, 7
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, :3] = 0  # left padding in the example, as at run time
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if backbone.name == "qwen2_vl":
        positions = positions[None].expand(3, -1, -1).contiguous()
        position_axes = {1: "batch", 2: "seq"}
        vcfg = backbone.config.vision_config
        patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
        grid = (1, 6, 10)
        from .host import vision_position_ids

        vision = GraphSpec(
            "vision",
            Qwen2VLVisionGraph(backbone).eval(),
            (
                torch.randn(grid[1] * grid[2], patch_dim),
                torch.from_numpy(vision_position_ids(grid, vcfg.spatial_merge_size)),
            ),
            ["pixel_values", "position_ids"],
            "image_features",
            {"pixel_values": {0: "patches"}, "position_ids": {0: "patches"}},
            # patches come in merge x merge blocks, one token each; the smallest image (56x56) has 4 tokens
            axis_min={"tokens": 2},
            axis_multiple={"patches": ("tokens", vcfg.spatial_merge_size**2)},
        )
    else:
        position_axes = {0: "batch", 1: "seq"}
        crop = int(backbone.config.vision_config.image_size)
        vision = GraphSpec(
            "vision",
            LlavaNextVisionGraph(backbone).eval(),
            (torch.randn(3, 3, crop, crop),),
            ["pixel_values"],
            "view_features",
            {"pixel_values": {0: "views"}},
        )
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
    return {"vision": vision, "decoder": decoder}


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
