"""`Embedder`: eager PyTorch embeddings from a model directory, the reference every engine is checked against."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import profiles
from ..errors import InputError
from ..preprocess.batching import call_cost_tokens, encode_by_length
from ..preprocess.images import DEFAULT_MAX_PIXELS
from ..preprocess.items import Item, as_items
from .backbones import Backbone, load_backbone
from .preprocessors import Prepared, quiet_transformers


class Embedder:
    """VLM2Vec embeddings in eager PyTorch: the last token's final hidden state, L2-normalised.

    >>> emb = Embedder.from_pretrained("path/to/model")
    >>> vecs = emb.encode([Item(text="a dog", instruction="Find me an everyday image that matches the given caption: ")])
    """

    def __init__(self, backbone: Backbone, *, adapter: str | os.PathLike | None = None):
        self.backbone = backbone
        self.pre = backbone.pre
        self.adapter = None if adapter is None else os.fspath(adapter)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        adapter: str | os.PathLike | None = None,
        image_resolution: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        tiling: str = "cpp",
        profile: str | None = None,
    ) -> Embedder:
        """Load a LLaVA-NeXT or Qwen2-VL model directory (optionally with a peft adapter directory applied).

        profile: the input recipe, "vlm2vec" | "vlm2vec-v2" | "native" (vlm2vec_rt.profiles); None takes the
        one the adapter or model directory records (`vlm2vec-rt train` and `merge` write it), else "vlm2vec",
        the official VLM2Vec code's inputs.

        image_resolution="high" resizes every image to 1344x1344 first, as VLM2Vec's high-resolution runs do;
        images over max_image_pixels are refused (decompression-bomb guard). tiling="cpp" preprocesses images
        with the C++ tiling (same values as transformers' processor, several times faster); "transformers"
        uses the processor itself.
        """
        backbone = load_backbone(
            path,
            device=device,
            dtype=dtype,
            image_resolution=image_resolution,
            max_image_pixels=max_image_pixels,
            tiling=tiling,
            profile=profiles.resolve(profile, adapter, path),
        )
        if adapter is not None:
            apply_adapter(backbone, adapter)
        return cls(backbone, adapter=adapter)

    @property
    def dim(self) -> int:
        """Embedding dimension (the decoder's hidden size)."""
        return self.backbone.hidden_size

    @property
    def profile(self) -> str:
        """The input recipe these embeddings follow (vlm2vec_rt.profiles)."""
        return self.pre.profile

    @property
    def fingerprint(self) -> str:
        """Identifies what produces these embeddings (model files, adapter, dtype, resolution, profile): cache keys."""
        parts = [self.backbone.name, str(self.backbone.dtype), str(self.pre.image_resolution), self.profile]
        for folder in (self.backbone.path, self.adapter):
            if folder is not None:
                parts.append(directory_signature(folder))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def prepare(self, item: Item, what: str = "item") -> Prepared:
        """Token ids and preprocessed image of one item (see Preprocessor.prepare)."""
        return self.pre.prepare(item, what)

    @torch.inference_mode()
    def encode(
        self,
        items: Sequence[Item | str | Any],
        *,
        batch_size: int = 16,
        progress: bool = False,
        max_tokens: int | None = None,
    ) -> np.ndarray:
        """Embed items (Item, str for text, PIL.Image for an image) -> float32 [N, dim], unit-norm rows.

        Items are taken batch_size at a time, and each group is split by length into smaller batches
        where that saves more padding than a model call costs (at most max_tokens padded tokens a call,
        when given); the next group is preprocessed on a worker thread while the model runs.
        """
        backbone = self.backbone
        return encode_by_length(
            self.pre,
            as_items(items),
            lambda batch: backbone.forward(backbone.to_device(batch)).cpu().numpy(),
            dim=self.dim,
            batch_size=batch_size,
            max_tokens=max_tokens,
            call_cost=call_cost_tokens(backbone.device.type, max_tokens),
            progress=progress,
            # one batch of prepared items at a time, as before it batched by length: 1344x1344 images hold
            # 23 MB of pixels each (LLaVA-NeXT, 17 views), and the engines' wider windows would hold 4x that
            window_batches=1,
        )


def apply_adapter(backbone: Backbone, adapter: str | os.PathLike) -> None:
    """Apply a peft (LoRA/DoRA) adapter directory to the backbone and merge it into the weights."""
    from peft import PeftModel

    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise InputError(f"adapter directory {os.fspath(adapter)!r} has no adapter_config.json")
    device = backbone.device
    try:
        with quiet_transformers():
            peft_model = PeftModel.from_pretrained(backbone.model, os.fspath(adapter))
    except (RuntimeError, ValueError, KeyError, OSError) as e:
        # e.g. a size mismatch: an adapter trained on another model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"adapter {os.fspath(adapter)!r} does not fit the model at {os.fspath(backbone.path)!r}: {first}"
        ) from None
    backbone.model = peft_model.merge_and_unload().to(device).eval()


def directory_signature(folder: str | os.PathLike) -> str:
    """Cheap identity of a model directory: config files by content, weight files by name, size and mtime."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if not f.is_file():
            continue
        st = f.stat()
        h.update(f"{f.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if f.suffix == ".json" and st.st_size < 1 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()
