"""Qwen2.5-VL: Qwen2-VL's inputs and decoder, a vision tower with window attention.

    image --as Qwen2-VL (smart resize, 14-pixel patches, 2x2 merge)--> ViT whose blocks attend within
          windows of merged tokens (window_size pixels), a few within the whole image
          (`fullatt_block_indexes`) --> merger --> tokens in row-major order

Only the official V2 code supports Qwen2.5-VL (its Qwen2-VL input function serves both), so the default
profile `vlm2vec` follows that code's recipe: a bare `<|image_pad|>` run, 1-D positions, pixel limits
3136..1003520, images under 28 px squashed to 56x56, the V2 text style. `native` is Qwen2.5-VL's own
`<|vision_start|>...<|vision_end|>` with M-RoPE.

The engine's vision graph takes one image per call, with the window order and each patch's window passed
in: window attention becomes attention under a block mask (same maths as transformers' per-window loop),
so nothing in the graph depends on the grid's values.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import profiles
from ..models.preprocessors import NumpyBatch, Preprocessor
from ..models.tiny import vision_intermediate_size
from .base import Entry, vision_position_ids
from .qwen2_vl import ENTRY as QWEN2_VL
from .qwen2_vl import (
    QWEN_VISION,
    V2_RECIPE,
    Qwen2VL,
    Qwen2VLHost,
    Qwen2VLPreprocessor,
    build_tiny_qwen,
    check_tiny,
)

QWEN25_VISION = dict(
    QWEN_VISION, vision_intermediate_size=3420, window_size=112, full_attention_blocks=[7, 15, 23, 31]
)


class Qwen2_5VLPreprocessor(Qwen2VLPreprocessor):
    """Qwen2.5-VL's input side: Qwen2-VL's (same image processor, placeholder and token count)."""

    name = "qwen2_5_vl"

    @classmethod
    def recipe_of(cls, profile: str) -> profiles.Recipe:
        if profile == "vlm2vec":  # the official code for this backbone is the V2 code
            return dataclasses.replace(V2_RECIPE, profile=profile)
        return super().recipe_of(profile)


def window_layout(grid_thw, config: Any) -> tuple[np.ndarray, np.ndarray]:
    """One image's window attention layout: (window_index [tokens]: merged tokens in window order,
    window_ids [patches]: the window of each patch in that order), as transformers' get_vision_window_index."""
    from transformers.vision_utils import get_vision_window_index

    index, cu_seqlens = get_vision_window_index(
        torch.tensor([list(grid_thw)]),
        spatial_merge_size=config.spatial_merge_size,
        window_size=config.window_size,
        patch_size=config.patch_size,
    )
    bounds = cu_seqlens.numpy().astype(np.int64)
    window_ids = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    return index.numpy().astype(np.int64), window_ids


class Qwen2_5VL(Qwen2VL):
    """Qwen2.5-VL: the Qwen2-VL steps on transformers' Qwen2.5-VL model; its own vision graph."""

    name = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    preprocessor_class = Qwen2_5VLPreprocessor

    def vision_graph(self) -> Any:
        from ..engine.export import GraphSpec

        vcfg = self.config.vision_config
        patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
        grid = (1, 6, 10)
        window_index, window_ids = window_layout(grid, vcfg)
        return GraphSpec(
            "vision",
            Qwen2_5VLVisionGraph(self).eval(),
            (
                torch.randn(grid[1] * grid[2], patch_dim),
                torch.from_numpy(vision_position_ids(grid, vcfg.spatial_merge_size)),
                torch.from_numpy(window_index),
                torch.from_numpy(window_ids),
            ),
            ["pixel_values", "position_ids", "window_index", "window_ids"],
            "image_features",
            {
                "pixel_values": {0: "patches"},
                "position_ids": {0: "patches"},
                "window_index": {0: "tokens"},
                "window_ids": {0: "patches"},
            },
            axis_min={"tokens": 2},
            axis_multiple={"patches": ("tokens", vcfg.spatial_merge_size**2)},
        )


class Qwen2_5VLVisionGraph(nn.Module):
    """Qwen2.5-VL's vision transformer + merger over the patches of one image, windows as a block mask.

    The same steps as transformers' Qwen2_5_VisionTransformerPretrainedModel.forward: patch embedding,
    window order, rotary embedding, blocks (norm, attention, MLP), merger, original order back.
    """

    def __init__(self, backbone: Qwen2_5VL):
        super().__init__()
        self.visual = backbone.inner.visual
        self.dtype = backbone.dtype
        self.full_attention = set(backbone.config.vision_config.fullatt_block_indexes)

    def forward(
        self,
        pixel_values: torch.Tensor,
        position_ids: torch.Tensor,
        window_index: torch.Tensor,
        window_ids: torch.Tensor,
    ) -> torch.Tensor:
        # pixel_values [patches, 3*T*P*P], position_ids [patches, 2], window_index [tokens],
        # window_ids [patches] (in window order) -> [tokens, H]
        visual = self.visual
        hidden = visual.patch_embed(pixel_values.to(self.dtype))
        seq = hidden.shape[0]
        hidden = visual.permute_input_for_window_attn(hidden, window_index, seq_len=seq)
        cos, sin = visual.rotary_pos_emb(hidden, position_ids)
        cos = visual.permute_input_for_window_attn(cos, window_index, seq_len=seq)
        sin = visual.permute_input_for_window_attn(sin, window_index, seq_len=seq)
        same_window = (window_ids[:, None] == window_ids[None, :])[None, None]  # [1, 1, patches, patches]
        for i, block in enumerate(visual.blocks):
            mask = None if i in self.full_attention else same_window
            hidden = hidden + _attention(block.attn, block.norm1(hidden), cos, sin, mask)
            hidden = hidden + block.mlp(block.norm2(hidden))
        merged = visual.merger(hidden)
        return merged[torch.argsort(window_index)].float()


def _attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask) -> torch.Tensor:
    """Qwen2.5-VL's vision attention over all patches at once, restricted by `mask` (None: full)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    seq = x.shape[0]
    q, k, v = attn.qkv(x).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, seq, head_dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    return attn.proj(out.transpose(1, 2).reshape(seq, -1))


class Qwen2_5VLHost(Qwen2VLHost):
    """Qwen2.5-VL's engine side: Qwen2-VL's, each image's vision feed with its window layout."""

    def __init__(self, pre: Preprocessor, engine_dir: str | os.PathLike):
        super().__init__(pre, engine_dir)
        self.vision_config = pre.config.vision_config

    def vision_feeds(self, batch: NumpyBatch) -> list[dict[str, np.ndarray]]:
        feeds = super().vision_feeds(batch)
        for feed, grid in zip(feeds, batch.image_meta.tolist()):
            feed["window_index"], feed["window_ids"] = window_layout(grid, self.vision_config)
        return feeds


def build_tiny(tokenizer, o: dict):
    import transformers

    vision = dict(
        depth=o["vision_layers"],
        hidden_size=o["vision_hidden_size"],
        intermediate_size=vision_intermediate_size(o),
        out_hidden_size=o["hidden_size"],
        num_heads=o["vision_heads"],
        # windows of 2x2 merged tokens, and the last block attending over the whole image, so both kinds
        # of block run in a tiny model (the real one: 112-pixel windows, 4 full blocks of 32)
        window_size=o["window_size"] or 4 * o["patch_size"],
        fullatt_block_indexes=o["full_attention_blocks"] or [o["vision_layers"] - 1],
    )
    model_class = transformers.Qwen2_5_VLForConditionalGeneration
    return build_tiny_qwen(tokenizer, o, transformers.Qwen2_5_VLConfig, model_class, vision)


def _check_tiny(o: dict) -> None:
    from ..errors import InputError

    check_tiny(o)
    if o["vision_layers"] < 2:
        raise InputError(
            "Qwen2.5-VL's tiny model needs vision_layers >= 2 (window and full attention blocks)"
        )


ENTRY = Entry(
    name="qwen2_5_vl",
    preprocessor=Qwen2_5VLPreprocessor,
    model=Qwen2_5VL,
    host=Qwen2_5VLHost,
    tiny=dataclasses.replace(  # Qwen2-VL's tokenizer and image sizes
        QWEN2_VL.tiny,
        check=_check_tiny,
        build=build_tiny,
        image_defaults={**QWEN2_VL.tiny.image_defaults, "window_size": None, "full_attention_blocks": None},
        presets={
            # Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct: 112-pixel windows, 4 of 32 blocks attend fully
            "qwen2.5-vl-3b": dict(
                hidden_size=2048,
                num_layers=36,
                num_heads=16,
                num_key_value_heads=2,
                intermediate_size=11008,
                vocab_size=151936,
                tie_word_embeddings=True,
                **QWEN25_VISION,
            ),
            "qwen2.5-vl-7b": dict(
                hidden_size=3584,
                num_layers=28,
                num_heads=28,
                num_key_value_heads=4,
                intermediate_size=18944,
                vocab_size=152064,
                **QWEN25_VISION,
            ),
        },
    ),
)
