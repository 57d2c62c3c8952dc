"""Backbone adapters: the few things that differ between LLaVA-NeXT and Qwen2-VL.

An adapter wraps a transformers model loaded from a local directory and exposes the seams of the data flow
(ARCHITECTURE.md), which the Embedder, the trainer and the engine export all share:

    uint8 HxWx3 --preprocess_image--> ImageInputs (pixel values + size/grid + token count)   [CPU, numpy]
    text --tokenize (placeholder expanded to the image's token count)--> ids                  [CPU]
    pixel values --encode_views (vision tower + projector)--> view features                  [model]
    view features --pack (anyres unpad + newline / Qwen2-VL split)--> per-image features     [model, Python]
    ids + features --embed_inputs--> inputs_embeds; + mask --position_ids--> positions
    inputs_embeds, mask, positions --EmbeddingHead (decoder, last token, L2)--> embedding     [model]
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..preprocess import text as text_ops
from ..preprocess.items import MMEB_IMAGE_PLACEHOLDER

SUPPORTED = ("llava_next", "qwen2_vl")

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


@dataclass
class ImageInputs:
    """One preprocessed image: what the vision tower takes and how many tokens it becomes in the text."""

    pixel_values: np.ndarray  # LLaVA-NeXT: [views, 3, crop, crop]; Qwen2-VL: [patches, 3*T*P*P]
    meta: tuple[int, ...]  # LLaVA-NeXT: original (height, width); Qwen2-VL: grid (t, h, w)
    num_tokens: int


@dataclass
class Batch:
    """A collated batch, left-padded, on the model's device."""

    input_ids: torch.Tensor  # [B, S] int64
    attention_mask: torch.Tensor  # [B, S] int64
    pixel_values: torch.Tensor | None  # all images' views/patches concatenated
    image_meta: torch.Tensor | None  # [num_images, 2 | 3] int64
    views_per_image: list[int]


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden state at each row's last real token. hidden [B, S, H], attention_mask [B, S] -> [B, H].

    Works for left and right padding alike (the last position whose mask is 1), and exports to ONNX.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.to(positions.dtype) * (positions + 1)).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class EmbeddingHead(nn.Module):
    """Decoder on inputs_embeds -> last-token state -> L2-normalised (in fp32). The decoder graph of an engine."""

    def __init__(self, language_model: nn.Module):
        super().__init__()
        self.language_model = language_model

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        # inputs_embeds [B, S, H]; attention_mask [B, S]; position_ids [B, S] (LLaVA) or [3, B, S] (Qwen2-VL)
        hidden = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        pooled = last_token_pool(hidden, attention_mask)
        return F.normalize(pooled.float(), p=2.0, dim=-1)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' own progress bars (loading/saving shards) inside our calls."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def read_model_type(path: str | os.PathLike) -> str:
    """The `model_type` of a model directory's config.json; InputError if it is not a supported backbone."""
    cfg_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise InputError(f"model directory {os.fspath(path)!r} does not exist")
    if not cfg_path.is_file():
        raise InputError(f"{os.fspath(path)!r} is not a model directory: no config.json")
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e})") from None
    if model_type not in SUPPORTED:
        raise InputError(
            f"{cfg_path}: model_type {model_type!r} is not a supported backbone (supported: {', '.join(SUPPORTED)})"
        )
    return model_type


class Backbone:
    """Shared behaviour of the adapters. Subclasses set the class attributes and the image-specific methods."""

    name: str = ""
    model_class: str = ""  # transformers class name
    image_processor_class: str = ""

    def __init__(self, model: nn.Module, tokenizer, image_processor, path: Path):
        self.model = model  # the transformers *ForConditionalGeneration (its LM head is dropped)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.path = path
        self.config = model.config
        self.image_token_id = int(self.config.image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        )
        self.max_length = text_ops.model_max_length(
            tokenizer, getattr(self.config.text_config, "max_position_embeddings", None)
        )
        self.head = EmbeddingHead(self.inner.language_model)
        # The seam the C++ tiling plugs into: uint8 HxWx3 -> ImageInputs.
        self.image_preprocessor: Callable[[np.ndarray], ImageInputs] = self._preprocess_with_transformers

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype = "float32"
    ) -> Backbone:
        import transformers

        path = Path(path)
        dtype = torch_dtype(dtype)
        try:
            with quiet_transformers():
                model = getattr(transformers, cls.model_class).from_pretrained(path, dtype=dtype)
                tokenizer = transformers.AutoTokenizer.from_pretrained(path)
                image_processor = getattr(transformers, cls.image_processor_class).from_pretrained(path)
        except InputError:
            raise
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise InputError(f"cannot load {cls.name} model from {os.fspath(path)!r}: {e}") from None
        # Embeddings only: the LM head is never used (a 7B model's head is 0.5 GB).
        model.lm_head = None
        model.to(device).eval()
        return cls(model, tokenizer, image_processor, path)

    @property
    def inner(self) -> nn.Module:
        """The transformers base model (vision tower, projector, language model) without the LM head."""
        return self.model.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.inner.language_model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.config.text_config.hidden_size)

    # ---- text ----------------------------------------------------------------------------------------
    placeholder: str = ""  # what replaces MMEB's <|image_1|>

    def tokenize(self, text: str, image: ImageInputs | None, what: str = "item") -> list[int]:
        """Token ids of an MMEB-formatted text, the image placeholder expanded to the image's token count."""
        expanded = text_ops.expand_placeholder(
            text, self.placeholder, self.image_token, None if image is None else image.num_tokens
        )
        return text_ops.tokenize(
            self.tokenizer,
            expanded,
            image_token_id=self.image_token_id,
            num_image_tokens=0 if image is None else image.num_tokens,
            max_length=self.max_length,
            what=what,
        )

    # ---- images --------------------------------------------------------------------------------------
    def preprocess_image(self, image: np.ndarray) -> ImageInputs:
        return self.image_preprocessor(image)

    def _preprocess_with_transformers(self, image: np.ndarray) -> ImageInputs:
        raise NotImplementedError

    def encode_views(self, pixel_values: torch.Tensor, image_meta: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector over all views/patches of a batch."""
        raise NotImplementedError

    def pack(
        self, view_features: torch.Tensor, image_meta: torch.Tensor, views_per_image: list[int]
    ) -> list[torch.Tensor]:
        """Per-image token features [num_tokens_i, H], in the order the image tokens appear."""
        raise NotImplementedError

    def position_ids(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    # ---- batches -------------------------------------------------------------------------------------
    def collate(self, token_ids: Sequence[list[int]], images: Sequence[ImageInputs | None]) -> Batch:
        """Left-pad token ids and concatenate the images' pixel values, on the model's device."""
        ids, mask = text_ops.left_pad(token_ids, self.pad_id)
        present = [im for im in images if im is not None]
        device = self.device
        pixel_values = image_meta = None
        if present:
            pixel_values = torch.from_numpy(np.concatenate([im.pixel_values for im in present])).to(
                device, self.dtype
            )
            image_meta = torch.tensor([im.meta for im in present], dtype=torch.long, device=device)
        return Batch(
            input_ids=torch.from_numpy(ids).to(device),
            attention_mask=torch.from_numpy(mask).to(device),
            pixel_values=pixel_values,
            image_meta=image_meta,
            views_per_image=[im.pixel_values.shape[0] for im in present],
        )

    def inputs_embeds(self, batch: Batch) -> torch.Tensor:
        """Token embeddings with every image token replaced by its image feature."""
        embeds = self.inner.get_input_embeddings()(batch.input_ids)
        if batch.pixel_values is not None:
            feats = self.pack(
                self.encode_views(batch.pixel_values, batch.image_meta),
                batch.image_meta,
                batch.views_per_image,
            )
            feats = torch.cat(feats, dim=0).to(embeds.dtype)
            slots = batch.input_ids == self.image_token_id
            if int(slots.sum()) != feats.shape[0]:
                raise InputError(
                    f"{int(slots.sum())} image tokens in the batch but {feats.shape[0]} image features "
                    "(the processor and the model disagree on the token count)"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), feats)
        return embeds

    def forward(self, batch: Batch) -> torch.Tensor:
        """The whole model on a batch: L2-normalised fp32 embeddings [B, H]. Differentiable (training)."""
        return self.head(self.inputs_embeds(batch), batch.attention_mask, self.position_ids(batch))


def _default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # With left padding the first real token gets position 0, as it would unpadded.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LlavaNext(Backbone):
    """LLaVA-NeXT (LLaVA-1.6): CLIP tower, anyres tiles, Llama/Mistral decoder; placeholder `<image>`."""

    name = "llava_next"
    model_class = "LlavaNextForConditionalGeneration"
    image_processor_class = "LlavaNextImageProcessorPil"

    @property
    def placeholder(self) -> str:  # type: ignore[override]
        return self.image_token

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
        """Image tokens LLaVA-NeXT spends on an image of this size: base view + unpadded grid + one newline per row."""
        return llava_next_num_tokens(height, width, self.grid_pinpoints, self.crop_size, self.patch_size)

    def _preprocess_with_transformers(self, image: np.ndarray) -> ImageInputs:
        out = self.image_processor(image, return_tensors="np", input_data_format="channels_last")
        pixel_values = np.asarray(out["pixel_values"][0], dtype=np.float32)
        h, w = image.shape[:2]
        return ImageInputs(pixel_values, (h, w), self.num_image_tokens(h, w))

    def encode_views(self, pixel_values: torch.Tensor, image_meta: torch.Tensor) -> torch.Tensor:
        # pixel_values [V, 3, crop, crop] -> [V, patches(, minus CLS), H]
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
        return _default_position_ids(batch.attention_mask)


def llava_next_num_tokens(height: int, width: int, grid_pinpoints, crop_size: int, patch_size: int) -> int:
    """LLaVA-NeXT's image token count for an original (height, width): same arithmetic as its processor."""
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


class Qwen2VL(Backbone):
    """Qwen2-VL: native-resolution ViT with 2x2 token merging, M-RoPE decoder; placeholder
    `<|vision_start|><|image_pad|><|vision_end|>`."""

    name = "qwen2_vl"
    model_class = "Qwen2VLForConditionalGeneration"
    image_processor_class = "Qwen2VLImageProcessorPil"
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def _preprocess_with_transformers(self, image: np.ndarray) -> ImageInputs:
        try:
            out = self.image_processor(image, return_tensors="np", input_data_format="channels_last")
        except ValueError as e:  # e.g. aspect ratio over 200
            raise InputError(f"image {image.shape[1]}x{image.shape[0]}: {e}") from None
        grid = tuple(int(v) for v in out["image_grid_thw"][0])
        return ImageInputs(
            np.asarray(out["pixel_values"], dtype=np.float32), grid, int(np.prod(grid)) // self.merge_size**2
        )

    def encode_views(self, pixel_values: torch.Tensor, image_meta: torch.Tensor) -> torch.Tensor:
        # pixel_values [patches, 3*T*P*P], image_meta = grid_thw [N, 3] -> merged tokens [patches / merge^2, H]
        return self.inner.visual(pixel_values, grid_thw=image_meta, return_dict=True).pooler_output

    def pack(
        self, view_features: torch.Tensor, image_meta: torch.Tensor, views_per_image: list[int]
    ) -> list[torch.Tensor]:
        sizes = (image_meta.prod(-1) // self.merge_size**2).tolist()
        return list(torch.split(view_features, sizes, dim=0))

    def position_ids(self, batch: Batch) -> torch.Tensor:
        # M-RoPE: image tokens get (t, h, w) positions; padding is excluded through the attention mask.
        mm_types = (batch.input_ids == self.image_token_id).int()
        positions, _ = self.inner.get_rope_index(
            batch.input_ids, mm_types, image_grid_thw=batch.image_meta, attention_mask=batch.attention_mask
        )
        return positions


BACKBONES: dict[str, type[Backbone]] = {"llava_next": LlavaNext, "qwen2_vl": Qwen2VL}


def load_backbone(
    path: str | os.PathLike, *, device: str = "cpu", dtype: str | torch.dtype = "float32"
) -> Backbone:
    """Load the adapter for the model directory at `path` (a real checkpoint or a `make_tiny_model` one)."""
    return BACKBONES[read_model_type(path)].load(path, device=device, dtype=dtype)


__all__ = [
    "BACKBONES",
    "Backbone",
    "Batch",
    "EmbeddingHead",
    "ImageInputs",
    "LlavaNext",
    "MMEB_IMAGE_PLACEHOLDER",
    "Qwen2VL",
    "last_token_pool",
    "llava_next_num_tokens",
    "load_backbone",
    "read_model_type",
    "torch_dtype",
]
