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


# An over-long text is tokenized from a prefix: max_length + PREFIX_MARGIN_TOKENS tokens' worth of characters
# at PREFIX_CHARS_PER_TOKEN characters a token (English runs ~4), past the image tokens. The tokens of a
# prefix differ from the whole text's only next to the cut; with the margin those are dropped by the
# truncation anyway. A prefix that yields too few tokens (very long tokens) is grown 4x at a time.
PREFIX_CHARS_PER_TOKEN = 8
PREFIX_MARGIN_TOKENS = 64


def tokenize(
    tokenizer,
    text: str,
    *,
    image_token_id: int,
    num_image_tokens: int,
    max_length: int,
    what: str = "item",
) -> list[int]:
    """Token ids of `text`; over-long texts lose text tokens from the end, never image tokens.

    A text far over max_length is tokenized from a prefix, with the same result: a 1M-character text costs
    what its first tokens cost, not a tokenization of the whole text that truncation throws away."""
    ids, whole = _tokenize_prefix(tokenizer, text, image_token_id, num_image_tokens, max_length)
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
    if whole:
        log.warning("%s: %d tokens truncated to the model's maximum of %d", what, len(ids), max_length)
    else:
        log.warning(
            "%s: a text of %d characters truncated to the model's maximum of %d tokens",
            what,
            len(text),
            max_length,
        )
    return [t for t, k in zip(ids, keep) if k]


def _tokenize_prefix(
    tokenizer, text: str, image_token_id: int, num_image_tokens: int, max_length: int
) -> tuple[list[int], bool]:
    """(ids, True): the tokenizer's ids of `text`; or (ids, False) for a text far longer than max_length
    tokens: those of a prefix of it that holds every image token and at least max_length +
    PREFIX_MARGIN_TOKENS tokens (the truncation keeps max_length of them, all the image tokens among them)."""
    need = max_length + PREFIX_MARGIN_TOKENS
    image_end = 0
    if len(text) <= need * PREFIX_CHARS_PER_TOKEN:
        return _ids(tokenizer, text), True
    try:
        image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    except (IndexError, OverflowError, TypeError, ValueError, KeyError):  # an id outside the vocabulary
        image_token = None
    # only when the text holds exactly the image tokens expected (none, for an id no text tokenizes to):
    # otherwise the whole text is tokenized, and the caller's count check reports the problem
    held = text.count(image_token) if isinstance(image_token, str) else 0
    if held != num_image_tokens:
        return _ids(tokenizer, text), True
    if num_image_tokens:
        image_end = text.rfind(image_token) + len(image_token)
    cut = image_end + need * PREFIX_CHARS_PER_TOKEN
    while cut < len(text):
        ids = _ids(tokenizer, text[:cut])
        if len(ids) >= need + num_image_tokens:
            return ids, False
        cut *= 4
    return _ids(tokenizer, text), True


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


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
