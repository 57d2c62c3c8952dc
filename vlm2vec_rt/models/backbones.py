"""Model side of a backbone: a transformers vision-language model plus its `Preprocessor`.

`Backbone` holds what every architecture shares; each backbone module (vlm2vec_rt/backbones/) subclasses it
with its vision features, packing, positions, vision graph and LoRA parts.

The seams of the data flow (ARCHITECTURE.md), shared by the Embedder, the trainer and the engine export:

    NumpyBatch --to_device--> Batch
    pixel values --encode_views (vision tower + projector)--> view features       [vision graph]
    view features --pack (anyres unpad + newline / Qwen2-VL split)--> per-image   [stays in Python]
    ids + per-image features --inputs_embeds--> inputs_embeds; mask --position_ids--> positions
    inputs_embeds, mask, positions --EmbeddingHead--> L2-normalised last-token state  [decoder graph]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import check_device
from ..errors import InputError
from .preprocessors import NumpyBatch, Preprocessor, quiet_transformers, read_model_type

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'float16' | 'bfloat16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise InputError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


@dataclass
class Batch:
    """A collated batch on the model's device."""

    input_ids: torch.Tensor  # [B, S] int64
    attention_mask: torch.Tensor  # [B, S] int64
    pixel_values: torch.Tensor | None  # all images' views/patches concatenated, in the model's dtype
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


class Backbone:
    """A loaded model and its preprocessor. Subclasses implement the image-specific model steps."""

    name: str = ""
    model_class: str = ""  # transformers class name
    preprocessor_class: type[Preprocessor] = Preprocessor

    def __init__(self, model: nn.Module, pre: Preprocessor, path: Path):
        self.model = model  # the transformers *ForConditionalGeneration
        self.pre = pre
        self.path = path
        self.config = model.config
        self.image_token_id = pre.image_token_id
        self.head = EmbeddingHead(self.inner.language_model)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        keep_lm_head: bool = False,
        **preprocessor_kwargs: Any,
    ) -> Backbone:
        """Load weights and preprocessor from a model directory.

        The LM head is dropped unless keep_lm_head (embeddings never use it; a 7B model's head is 0.5 GB);
        keep it when the model is saved again as a complete checkpoint (merging adapters).
        """
        import transformers

        path = Path(path)
        dtype = torch_dtype(dtype)
        check_device(device)
        pre = cls.preprocessor_class.load(path, **preprocessor_kwargs)
        try:
            with quiet_transformers():
                model = getattr(transformers, cls.model_class).from_pretrained(path, dtype=dtype)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise InputError(f"cannot load {cls.name} weights from {os.fspath(path)!r}: {e}") from None
        if not keep_lm_head:
            model.lm_head = None
        model.to(device).eval()
        return cls(model, pre, path)

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

    # ---- per backbone --------------------------------------------------------------------------------
    # module-name prefixes (relative to the *ForConditionalGeneration) of the language model and of the
    # vision tower and projector: what LoRA adapts and full fine-tuning trains
    language_prefix: str = "model.language_model."
    vision_prefixes: tuple[str, ...] = ()
    position_rank: int = 2  # the decoder's position_ids: [B, S] (2) or M-RoPE's [3, B, S] (3)

    def vision_graph(self) -> Any:
        """The engine's vision graph: a GraphSpec (engine/export.py) with example inputs of odd sizes."""
        raise NotImplementedError

    def host_assets(self) -> dict[str, torch.Tensor]:
        """Weights the engine's host side needs beyond the embedding table (file name -> tensor)."""
        return {}

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

    # ---- forward -------------------------------------------------------------------------------------
    def to_device(self, batch: NumpyBatch) -> Batch:
        """A preprocessor's numpy batch as tensors on the model's device (pixels in the model's dtype)."""
        device = self.device
        pixel_values = image_meta = None
        if batch.pixel_values is not None:
            pixel_values = torch.from_numpy(batch.pixel_values).to(device, self.dtype)
            image_meta = torch.from_numpy(batch.image_meta).to(device)
        return Batch(
            input_ids=torch.from_numpy(batch.input_ids).to(device),
            attention_mask=torch.from_numpy(batch.attention_mask).to(device),
            pixel_values=pixel_values,
            image_meta=image_meta,
            views_per_image=list(batch.views_per_image),
        )

    def inputs_embeds(self, batch: Batch) -> torch.Tensor:
        """Token embeddings with every image token replaced by its image feature."""
        embeds = self.inner.get_input_embeddings()(batch.input_ids)
        if batch.pixel_values is not None:
            views = self.encode_views(batch.pixel_values, batch.image_meta)
            feats = torch.cat(self.pack(views, batch.image_meta, batch.views_per_image), dim=0).to(
                embeds.dtype
            )
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


def load_backbone(path: str | os.PathLike, **kwargs: Any) -> Backbone:
    """Load the backbone of the model directory at `path` (a real checkpoint or a `make_tiny_model` one).

    Keywords: device, dtype, keep_lm_head, and the preprocessor's (image_resolution, max_image_pixels,
    tiling, profile).
    """
    from ..backbones import entry

    return entry(read_model_type(path)).model.load(path, **kwargs)
