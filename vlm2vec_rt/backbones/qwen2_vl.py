"""Qwen2-VL: a native-resolution ViT with 2x2 token merging, M-RoPE decoder.

image --smart resize to 28-pixel multiples, 14-pixel patches (C++ tiling)--> ViT (attention within
      the image) + merger: one token per 2x2 patch block, t*h*w/4 of them, in row-major order
`<|image_pad|>` repeated once per token; positions by profile:
  vlm2vec, vlm2vec-v2: a bare `<|image_pad|>` run (the official VLM2Vec code's inputs), every token the
                       1-D position of its index, alike in the three M-RoPE sections
  native:              `<|vision_start|>...<|vision_end|>`, image tokens at (t, row, col) M-RoPE positions
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import profiles
from ..errors import InputError
from ..models.backbones import Backbone, Batch
from ..models.preprocessors import ImageInputs, NumpyBatch, Preprocessor
from ..models.tiny import decoder_sizes, vision_intermediate_size
from .base import Entry, Host, TinySpec, mrope_position_ids, sequential_position_ids, vision_position_ids

# The Qwen-VL vision tower of the real checkpoints (the Qwen2.5-VL one has its own MLP width).
QWEN_VISION = dict(
    vision_hidden_size=1280,
    vision_layers=32,
    vision_heads=16,
    vision_intermediate_size=5120,
    image_size=3584,
    patch_size=14,
    initializer_range=0.02,
)

# The official V2 code's recipe: its pixel limits through `size`, images with a side under 28 px squashed to
# 56x56 first, the V2 text style (vlm2vec_rt.profiles).
V2_RECIPE = profiles.Recipe(
    "vlm2vec-v2",
    pixel_limits=profiles.V2_QWEN_PIXELS,
    small_image=profiles.V2_SMALL_IMAGE,
    text_style="v2",
)


class Qwen2VLPreprocessor(Preprocessor):
    """Qwen2-VL: placeholder a bare `<|image_pad|>` run (the official VLM2Vec code's) or, under the native
    profile, wrapped in `<|vision_start|>`/`<|vision_end|>`; native resolution, 2x2 merge."""

    name = "qwen2_vl"
    image_processor_class = "Qwen2VLImageProcessorPil"

    @property
    def placeholder(self) -> str:  # type: ignore[override]
        if self.recipe.vision_markers:
            return f"<|vision_start|>{self.image_token}<|vision_end|>"
        return self.image_token

    @classmethod
    def recipe_of(cls, profile: str) -> profiles.Recipe:
        if profile == "native":
            return profiles.Recipe(profile, vision_markers=True, mrope=True)
        if profile == "vlm2vec-v2":
            return V2_RECIPE
        return profiles.Recipe(profile)

    def cpp_options(self) -> dict[str, Any]:
        from ..preprocess import tiling

        options = tiling.qwen2vl_options(self.image_processor)
        if self.recipe.pixel_limits is not None:
            options.update(zip(("min_pixels", "max_pixels"), self.recipe.pixel_limits))
        return options

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def preprocess_with_transformers(self, image: np.ndarray) -> ImageInputs:
        # the profile's pixel limits win over the checkpoint's (given per call: what is saved stays the checkpoint's)
        limits = self.recipe.pixel_limits
        size = {} if limits is None else {"size": {"shortest_edge": limits[0], "longest_edge": limits[1]}}
        try:
            out = self.image_processor(image, return_tensors="np", input_data_format="channels_last", **size)
        except ValueError as e:  # e.g. an aspect ratio over 200
            raise InputError(f"image {image.shape[1]}x{image.shape[0]}: {e}") from None
        grid = tuple(int(v) for v in out["image_grid_thw"][0])
        pixel_values = np.asarray(out["pixel_values"], dtype=np.float32)
        return ImageInputs(pixel_values, grid, int(np.prod(grid)) // self.merge_size**2)

    def preprocess_with_cpp(self, image: np.ndarray) -> ImageInputs:
        from ..preprocess import tiling

        pixel_values, grid = tiling.qwen2vl(
            image, max_image_pixels=self.max_image_pixels, **self.tiling_options
        )
        return ImageInputs(pixel_values, grid, int(np.prod(grid)) // self.merge_size**2)

    def preprocess_batch_with_cpp(self, images: Sequence[np.ndarray]) -> list[ImageInputs]:
        from ..preprocess import tiling

        out = tiling.qwen2vl_batch(images, max_image_pixels=self.max_image_pixels, **self.tiling_options)
        return [ImageInputs(pv, grid, int(np.prod(grid)) // self.merge_size**2) for pv, grid in out]


class Qwen2VL(Backbone):
    """Qwen2-VL: native-resolution ViT with 2x2 token merging, M-RoPE decoder."""

    name = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    preprocessor_class = Qwen2VLPreprocessor
    vision_prefixes = ("model.visual.",)
    position_rank = 3

    def encode_views(self, pixel_values: torch.Tensor, image_meta: torch.Tensor) -> torch.Tensor:
        # pixel_values [patches, 3*T*P*P], image_meta = grid_thw [N, 3] -> merged tokens [patches / merge^2, H]
        return self.inner.visual(pixel_values, grid_thw=image_meta, return_dict=True).pooler_output

    def pack(
        self, view_features: torch.Tensor, image_meta: torch.Tensor, views_per_image: list[int]
    ) -> list[torch.Tensor]:
        sizes = (image_meta.prod(-1) // self.pre.merge_size**2).tolist()
        return list(torch.split(view_features, sizes, dim=0))

    def position_ids(self, batch: Batch) -> torch.Tensor:
        if not self.pre.recipe.mrope:
            # The official VLM2Vec inputs: without <|vision_start|> its get_rope_index counts no image, so
            # every token, image tokens too, gets the same 1-D position in all three M-RoPE sections.
            return sequential_position_ids(batch.attention_mask).expand(3, -1, -1)
        # M-RoPE: image tokens get (t, h, w) positions; padding is excluded through the attention mask.
        mm_types = (batch.input_ids == self.image_token_id).int()
        positions, _ = self.inner.get_rope_index(
            batch.input_ids, mm_types, image_grid_thw=batch.image_meta, attention_mask=batch.attention_mask
        )
        return positions

    def vision_graph(self) -> Any:
        from ..engine.export import GraphSpec

        vcfg = self.config.vision_config
        patch_dim = vcfg.in_channels * vcfg.temporal_patch_size * vcfg.patch_size**2
        grid = (1, 6, 10)
        return GraphSpec(
            "vision",
            self.vision_graph_module(),
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

    def vision_graph_module(self) -> nn.Module:
        return Qwen2VLVisionGraph(self).eval()


class Qwen2VLVisionGraph(nn.Module):
    """Qwen2-VL's vision transformer + merger over the patches of one image."""

    def __init__(self, backbone: Qwen2VL):
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


class Qwen2VLHost(Host):
    """Qwen2-VL: one vision call per image (its attention runs within an image), M-RoPE positions."""

    def __init__(self, pre: Preprocessor, engine_dir: str | os.PathLike):
        super().__init__(pre, engine_dir)
        self.merge = int(pre.config.vision_config.spatial_merge_size)

    def vision_feeds(self, batch: NumpyBatch) -> list[dict[str, np.ndarray]]:
        feeds, start = [], 0
        for grid in batch.image_meta.tolist():
            n = int(np.prod(grid))
            feeds.append(
                {
                    "pixel_values": batch.pixel_values[start : start + n],
                    "position_ids": vision_position_ids(grid, self.merge),
                }
            )
            start += n
        return feeds

    def pack(self, outputs: list[np.ndarray], batch: NumpyBatch) -> list[np.ndarray]:
        return outputs  # one call per image, already [tokens_i, H]

    def position_ids(self, batch: NumpyBatch) -> np.ndarray:
        if not self.pre.recipe.mrope:  # the profile's 1-D positions, the same in all three sections
            positions = sequential_position_ids(batch.attention_mask)
            return np.ascontiguousarray(np.broadcast_to(positions, (3, *positions.shape)))
        grids = [] if batch.image_meta is None else batch.image_meta.tolist()
        return mrope_position_ids(
            batch.input_ids, batch.attention_mask, grids, self.image_token_id, self.merge
        )


def build_tiny(tokenizer, o: dict):
    import transformers

    vision = dict(
        depth=o["vision_layers"],
        embed_dim=o["vision_hidden_size"],
        hidden_size=o["hidden_size"],
        num_heads=o["vision_heads"],
        mlp_ratio=vision_intermediate_size(o) // o["vision_hidden_size"],  # an int in the config
    )
    return build_tiny_qwen(
        tokenizer, o, transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration, vision
    )


def build_tiny_qwen(tokenizer, o: dict, config_class: type, model_class: type, vision: dict):
    """A tiny Qwen-VL model of `config_class` (its vision_config's own keywords in `vision`) and its image
    processor: the M-RoPE decoder, token ids, patching and pixel limits the Qwen-VL generations share."""
    from transformers import Qwen2VLImageProcessorPil

    head_dim = o["hidden_size"] // o["num_heads"]
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    ids = tokenizer.convert_tokens_to_ids
    config = config_class(
        text_config=dict(
            **decoder_sizes(o),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [t, h, half - t - h],
            },
            bos_token_id=None,
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            **vision,
            patch_size=o["patch_size"],
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=o["initializer_range"],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=o["tie_word_embeddings"],
    )
    model = model_class(config)
    side = o["image_size"]
    processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56,
        max_pixels=side * side,
        patch_size=o["patch_size"],
        merge_size=2,
        temporal_patch_size=2,
    )
    return model, processor


def check_tiny(o: dict) -> None:
    if o["image_size"] < 56:
        raise InputError("image_size must be at least 56 for Qwen-VL models (their smallest image is 56x56)")


def _check_tiny(o: dict) -> None:
    check_tiny(o)
    if vision_intermediate_size(o) % o["vision_hidden_size"]:
        raise InputError("Qwen2-VL's vision MLP width must be a multiple of vision_hidden_size (mlp_ratio)")


ENTRY = Entry(
    name="qwen2_vl",
    preprocessor=Qwen2VLPreprocessor,
    model=Qwen2VL,
    host=Qwen2VLHost,
    tiny=TinySpec(
        specials=(
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ),
        tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        # 14-pixel patches, images capped at image_size^2 pixels
        image_defaults=dict(image_size=224, patch_size=14, max_grid=None),
        presets={
            # Qwen/Qwen2-VL-2B-Instruct and -7B-Instruct: a 675M ViT (1280 wide, 32 blocks), pixels up to 3584^2
            "qwen2-vl-2b": dict(
                hidden_size=1536,
                num_layers=28,
                num_heads=12,
                num_key_value_heads=2,
                intermediate_size=8960,
                vocab_size=151936,
                tie_word_embeddings=True,
                **QWEN_VISION,
            ),
            "qwen2-vl-7b": dict(
                hidden_size=3584,
                num_layers=28,
                num_heads=28,
                num_key_value_heads=4,
                intermediate_size=18944,
                vocab_size=152064,
                **QWEN_VISION,
            ),
        },
        check=_check_tiny,
        build=build_tiny,
    ),
)
