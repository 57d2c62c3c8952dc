"""LLaVA-NeXT (LLaVA-1.6): CLIP tower over anyres views, Llama/Mistral decoder.

    image --anyres views (base view + grid tiles, C++ tiling)--> CLIP (a chosen layer, CLS dropped) + projector
          --pack: base view, then the grid with its padding rows/columns removed and a newline per row-->
    `<image>` repeated once per feature, at 1-D positions; the decoder reads them like text tokens.

Every profile feeds LLaVA-NeXT alike (the official code's `<image>`, BOS added by the tokenizer); only the
V2 text style differs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models.backbones import Backbone, Batch
from ..models.preprocessors import ImageInputs, NumpyBatch, Preprocessor
from ..models.tiny import decoder_sizes, vision_intermediate_size
from .base import EMBED_TOKENS, MAX_VIEWS_PER_CALL, Entry, Host, TinySpec, load_npy, sequential_position_ids

IMAGE_NEWLINE = "image_newline.npy"


class LlavaNextPreprocessor(Preprocessor):
    """LLaVA-NeXT: placeholder `<image>`; anyres views; base + unpadded grid + row newlines as tokens."""

    name = "llava_next"
    image_processor_class = "LlavaNextImageProcessorPil"

    @property
    def placeholder(self) -> str:  # type: ignore[override]
        return self.image_token

    def cpp_options(self) -> dict[str, Any]:
        from ..preprocess import tiling

        return tiling.llava_next_options(self.image_processor)

    @property
    def crop_size(self) -> int:
        return int(self.config.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    @property
    def grid_pinpoints(self) -> list[list[int]]:
        return [list(p) for p in self.image_processor.image_grid_pinpoints]

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens LLaVA-NeXT spends on an image of this size."""
        return llava_next_num_tokens(height, width, self.grid_pinpoints, self.crop_size, self.patch_size)

    def preprocess_with_transformers(self, image: np.ndarray) -> ImageInputs:
        out = self.image_processor(image, return_tensors="np", input_data_format="channels_last")
        pixel_values = np.asarray(out["pixel_values"][0], dtype=np.float32)
        h, w = image.shape[:2]
        return ImageInputs(pixel_values, (h, w), self.num_image_tokens(h, w))

    def preprocess_with_cpp(self, image: np.ndarray) -> ImageInputs:
        from ..preprocess import tiling

        pixel_values = tiling.anyres(image, max_image_pixels=self.max_image_pixels, **self.tiling_options)
        h, w = image.shape[:2]
        return ImageInputs(pixel_values, (h, w), self.num_image_tokens(h, w))

    def preprocess_batch_with_cpp(self, images: Sequence[np.ndarray]) -> list[ImageInputs]:
        from ..preprocess import tiling

        views = tiling.anyres_batch(images, max_image_pixels=self.max_image_pixels, **self.tiling_options)
        return [
            ImageInputs(v, im.shape[:2], self.num_image_tokens(*im.shape[:2])) for v, im in zip(views, images)
        ]


def llava_next_num_tokens(height: int, width: int, grid_pinpoints, crop_size: int, patch_size: int) -> int:
    """LLaVA-NeXT's image token count for an original (height, width): same arithmetic as its processor.

    Base view (side^2) + the grid's features with the padding rows/columns removed + one newline per row.
    """
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution((height, width), grid_pinpoints)
    side = crop_size // patch_size
    cur_h, cur_w = side * (best_h // crop_size), side * (best_w // crop_size)
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return cur_h * cur_w + cur_h + side * side


class LlavaNext(Backbone):
    """LLaVA-NeXT (LLaVA-1.6): CLIP tower, anyres tiles, Llama/Mistral decoder."""

    name = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"
    preprocessor_class = LlavaNextPreprocessor
    vision_prefixes = ("model.vision_tower.", "model.multi_modal_projector.")

    def encode_views(self, pixel_values: torch.Tensor, image_meta: torch.Tensor) -> torch.Tensor:
        # pixel_values [V, 3, crop, crop] -> [V, patches (CLS dropped by the "default" strategy), H]
        inner = self.inner
        out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        layer = self.config.vision_feature_layer
        if isinstance(layer, int):
            selected = out.hidden_states[layer]
        else:
            selected = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        return inner.multi_modal_projector(selected)

    def pack(
        self, view_features: torch.Tensor, image_meta: torch.Tensor, views_per_image: list[int]
    ) -> list[torch.Tensor]:
        per_image = torch.split(view_features, views_per_image, dim=0)
        packed, _ = self.inner.pack_image_features(
            per_image,
            image_meta,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=self.inner.image_newline,
        )
        return list(packed)

    def position_ids(self, batch: Batch) -> torch.Tensor:
        return sequential_position_ids(batch.attention_mask)

    def vision_graph(self) -> Any:
        from ..engine.export import GraphSpec

        crop = int(self.config.vision_config.image_size)
        return GraphSpec(
            "vision",
            LlavaNextVisionGraph(self).eval(),
            (torch.randn(3, 3, crop, crop),),
            ["pixel_values"],
            "view_features",
            {"pixel_values": {0: "views"}},
        )

    def host_assets(self) -> dict[str, torch.Tensor]:
        return {IMAGE_NEWLINE: self.inner.image_newline}


class LlavaNextVisionGraph(nn.Module):
    """CLIP tower + projector over a stack of views (the backbone's encode_views).

    Holds only the tower, the projector and the config, never the whole backbone: a deep copy of a graph
    (aoti.py, to compile on another device) copies exactly the weights the graph uses.
    """

    def __init__(self, backbone: LlavaNext):
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


class LlavaNextHost(Host):
    """LLaVA-NeXT: views in chunks, anyres unpad + image_newline, positions from the mask."""

    ASSETS = (EMBED_TOKENS, IMAGE_NEWLINE)

    def __init__(self, pre: Preprocessor, engine_dir: str | os.PathLike):
        super().__init__(pre, engine_dir)
        self.image_newline = np.asarray(load_npy(Path(engine_dir) / IMAGE_NEWLINE), dtype=np.float32)
        cfg = pre.config
        self.grid_pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
        self.crop_size = int(cfg.vision_config.image_size)
        self.side = self.crop_size // int(cfg.vision_config.patch_size)  # feature grid of one view

    def vision_feeds(self, batch: NumpyBatch) -> list[dict[str, np.ndarray]]:
        pv = batch.pixel_values
        return [
            {"pixel_values": pv[i : i + MAX_VIEWS_PER_CALL]} for i in range(0, len(pv), MAX_VIEWS_PER_CALL)
        ]

    def pack(self, outputs: list[np.ndarray], batch: NumpyBatch) -> list[np.ndarray]:
        # Same layout as transformers' LlavaNextModel.pack_image_features, reusing its pure shape helpers.
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        views = np.concatenate(outputs)  # [V, side*side, H]
        packed, start = [], 0
        for (height, width), count in zip(batch.image_meta.tolist(), batch.views_per_image):
            feats = views[start : start + count]
            start += count
            if count == 1:
                packed.append(np.concatenate([feats[0], self.image_newline[None]]))
                continue
            rows, cols = get_anyres_image_grid_shape((height, width), self.grid_pinpoints, self.crop_size)
            s, hidden = self.side, feats.shape[-1]
            grid = feats[1:].reshape(rows, cols, s, s, hidden).transpose(4, 0, 2, 1, 3)
            grid = unpad_image(grid.reshape(hidden, rows * s, cols * s), (height, width))  # [H, h', w']
            newline = np.broadcast_to(self.image_newline[:, None, None], (hidden, grid.shape[1], 1))
            grid = np.concatenate([grid, newline], axis=-1).reshape(hidden, -1).T
            packed.append(np.concatenate([feats[0], grid]))
        return packed

    def position_ids(self, batch: NumpyBatch) -> np.ndarray:
        return sequential_position_ids(batch.attention_mask)


def build_tiny(tokenizer, o: dict):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
    )

    crop, grid = o["image_size"], o["max_grid"]
    pinpoints = o["grid_pinpoints"] or [
        [crop * a, crop * b] for a in range(1, grid + 1) for b in range(1, grid + 1) if a * b > 1
    ]
    text = LlamaConfig(
        **decoder_sizes(o),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=o["vision_hidden_size"],
        intermediate_size=vision_intermediate_size(o),
        num_hidden_layers=o["vision_layers"],
        num_attention_heads=o["vision_heads"],
        image_size=crop,
        patch_size=o["patch_size"],
        projection_dim=o["vision_hidden_size"],
        initializer_range=o["initializer_range"],
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=(crop // o["patch_size"]) ** 2,
        tie_word_embeddings=o["tie_word_embeddings"],
    )
    model = LlavaNextForConditionalGeneration(config)
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=pinpoints,
    )
    return model, processor


def check_tiny(o: dict) -> None:
    from ..errors import InputError

    if o["image_size"] % o["patch_size"]:
        raise InputError("image_size must be a multiple of patch_size")
    if o["vision_layers"] < 2:
        raise InputError("LLaVA-NeXT reads the second-to-last vision layer: vision_layers must be >= 2")


ENTRY = Entry(
    name="llava_next",
    preprocessor=LlavaNextPreprocessor,
    model=LlavaNext,
    host=LlavaNextHost,
    tiny=TinySpec(
        specials=("<unk>", "<s>", "</s>", "<pad>", "<image>"),
        tokens=dict(
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            extra_special_tokens={"image_token": "<image>"},
        ),
        # CLIP views of image_size pixels cut into patch_size patches, anyres grid up to max_grid x max_grid
        # views (1344x1344 at the real 336 crop)
        image_defaults=dict(image_size=336, patch_size=56, max_grid=4, grid_pinpoints=None),
        presets={
            # llava-hf/llava-v1.6-mistral-7b-hf: CLIP ViT-L/14-336, Mistral-7B (grouped-query attention)
            "llava-next-7b": dict(
                hidden_size=4096,
                num_layers=32,
                num_heads=32,
                num_key_value_heads=8,
                intermediate_size=14336,
                vocab_size=32064,
                vision_hidden_size=1024,
                vision_layers=24,
                vision_heads=16,
                vision_intermediate_size=4096,
                image_size=336,
                patch_size=14,
                grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
                initializer_range=0.02,
            ),
        },
        check=check_tiny,
        build=build_tiny,
    ),
)
