"""Tokenisation with image placeholders expanded, truncation that never cuts image tokens, left padding."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from .items import MMEB_IMAGE_PLACEHOLDER

log = logging.getLogger("vlm2vec_rt")

# A tokenizer's "unbounded" model_max_length sentinel is ~1e30; anything above this is not a real limit.
_NO_LIMIT = 10**9


def model_max_length(tokenizer, max_position_embeddings: int | None) -> int:
    """The longest sequence the model takes: the tighter of the tokenizer's and the position table's limits."""
    limits = [n for n in (getattr(tokenizer, "model_max_length", None), max_position_embeddings) if n]
    limits = [int(n) for n in limits if n < _NO_LIMIT]
    return min(limits) if limits else 4096


def expand_placeholder(text: str, placeholder: str, image_token: str, num_image_tokens: int | None) -> str:
    """Swap MMEB's ``<|image_1|>`` for the backbone's placeholder, its image token repeated per feature."""
    count = text.count(MMEB_IMAGE_PLACEHOLDER)
    if num_image_tokens is None:
        if count:
            raise InputError(f"text contains {MMEB_IMAGE_PLACEHOLDER} but the item has no image")
        return text
    if count != 1:
        raise InputError(
            f"an item with one image needs exactly one {MMEB_IMAGE_PLACEHOLDER} in its text, found {count}"
        )
    expanded = placeholder.replace(image_token, image_token * num_image_tokens)
    return text.replace(MMEB_IMAGE_PLACEHOLDER, expanded)


def tokenize(
    tokenizer, text: str, *, image_token_id: int, num_image_tokens: int, max_length: int, what: str = "item"
) -> list[int]:
    """Token ids of `text`; over-long texts lose text tokens from the end, never image tokens."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    got = sum(1 for t in ids if t == image_token_id)
    if got != num_image_tokens:
        raise InputError(
            f"{what}: the tokenizer produced {got} image tokens where {num_image_tokens} were expected "
            "(does the text contain the image token itself?)"
        )
    if len(ids) <= max_length:
        return ids
    if num_image_tokens >= max_length:
        raise InputError(
            f"{what}: the image alone needs {num_image_tokens} tokens, more than the model's maximum "
            f"of {max_length}; use a smaller image resolution"
        )
    overflow = len(ids) - max_length
    keep = np.ones(len(ids), dtype=bool)
    # Drop text tokens from the end (last token first), skipping image tokens.
    for pos in range(len(ids) - 1, -1, -1):
        if overflow == 0:
            break
        if ids[pos] != image_token_id:
            keep[pos] = False
            overflow -= 1
    log.warning("%s: %d tokens truncated to the model's maximum of %d", what, len(ids), max_length)
    return [t for t, k in zip(ids, keep) if k]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token id lists into (input_ids, attention_mask) int64 arrays [B, S].

    Left padding puts every sequence's last real token at position S-1, where pooling reads it.
    """
    if not sequences:
        raise InputError("no sequences to pad")
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s) :] = s
            mask[i, width - len(s) :] = 1
    return ids, mask
