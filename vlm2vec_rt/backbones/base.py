"""What every backbone module provides, and the steps they share.

A backbone module (`backbones/<name>.py`) holds everything specific to one architecture:

    Preprocessor subclass   placeholder, image preprocessing, token count   (models/preprocessors.py)
    Backbone subclass       torch steps: vision features, packing, positions, vision graph, LoRA parts
                                                                              (models/backbones.py)
    Host subclass           the same steps in numpy for engines (below)
    recipe(profile)         what each profile does on this backbone (vlm2vec_rt.profiles)
    TinySpec                how `make_tiny_model` writes a small model of it (models/tiny.py)

and ends with one `Entry` the registry (`backbones/__init__.py`) lists. The shared steps below are plain
array functions, so the eager path and the engine compute them with the same code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngineError

EMBED_TOKENS = "embed_tokens.npy"
# views per vision-graph call of the backbones that stack views (LLaVA-NeXT, Phi-3.5-V): bounds activation
# memory at high resolution, and is the views axis of a TensorRT plan's profile
MAX_VIEWS_PER_CALL = 32


# ---- shared steps ----------------------------------------------------------------------------------------
def sequential_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """1-D positions [B, S]: each real token's index among its row's real tokens (padding gets 0).

    With left padding the first real token gets position 0, as it would unpadded. Works on numpy arrays
    and torch tensors alike (cumsum and clip).
    """
    return (attention_mask.cumsum(-1) - 1).clip(min=0)


def vision_position_ids(grid_thw, merge: int) -> np.ndarray:
    """(row, col) of every patch of one image, in the merge-block order of Qwen2-VL's patches: [t*h*w, 2]."""
    t, h, w = (int(v) for v in grid_thw)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int64)


def mrope_position_ids(
    input_ids: np.ndarray, attention_mask: np.ndarray, grids: list, image_token_id: int, merge: int
) -> np.ndarray:
    """Qwen2-VL's 3-D rotary positions [3, B, S] (what its get_rope_index computes); padding gets 0.

    Text tokens count up on all three axes; an image's tokens get (t, row, col) offset by the position
    reached so far, and the text after it resumes at that offset + max(rows, cols).
    """
    out = np.zeros((3, *input_ids.shape), dtype=np.int64)
    images = iter(grids)
    for b in range(input_ids.shape[0]):
        real = np.flatnonzero(attention_mask[b])
        is_image = input_ids[b, real] == image_token_id
        # runs of text / image tokens: [start, end) over the real tokens
        edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
        bounds = np.concatenate([[0], edges, [len(real)]])
        pieces, pos = [], 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            if not is_image[start]:
                pieces.append(np.broadcast_to(pos + np.arange(end - start), (3, end - start)))
                pos += end - start
                continue
            t, h, w = next(images)
            gt, gh, gw = int(t), int(h) // merge, int(w) // merge
            if gt * gh * gw != end - start:
                raise EngineError(
                    f"row {b}: an image's {end - start} tokens do not match its grid {(t, h, w)}"
                )
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos)
            pos += max(gh, gw)
        if pieces:
            out[:, b, real] = np.concatenate(pieces, axis=1)
    return out


def load_npy(path: Path) -> np.ndarray:
    """An engine's .npy asset, memory-mapped (a 7B model's table is hundreds of MB; few rows are read)."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read {os.fspath(path)!r}: {e}") from None


# ---- the engine side -------------------------------------------------------------------------------------
class Host:
    """What an engine runs around and between its two graphs, in numpy, without the torch model.

    Embedding lookup and image-slot scatter are common; subclasses add the backbone's vision feeds, pack and
    positions, each tested against the eager `Backbone` method it replaces.
    """

    ASSETS: tuple[str, ...] = (EMBED_TOKENS,)  # the engine files this side reads (hash-checked at load)

    def __init__(self, pre: Any, engine_dir: str | os.PathLike):
        self.pre = pre
        self.image_token_id = pre.image_token_id
        self.embed_tokens = load_npy(Path(engine_dir) / EMBED_TOKENS)  # [vocab, H]

    @property
    def hidden_size(self) -> int:
        return int(self.embed_tokens.shape[1])

    def inputs_embeds(self, input_ids: np.ndarray, image_features: list[np.ndarray]) -> np.ndarray:
        """Token embeddings [B, S, H] float32 with the image tokens' slots filled by the image features in order."""
        if int(input_ids.max(initial=0)) >= self.embed_tokens.shape[0] or int(input_ids.min(initial=0)) < 0:
            raise EngineError(
                f"token id out of the embedding table's range [0, {self.embed_tokens.shape[0]})"
            )
        embeds = self.embed_tokens[input_ids].astype(np.float32, copy=False)  # fancy indexing copies
        if image_features:
            feats = np.concatenate(image_features).astype(np.float32, copy=False)
            slots = input_ids == self.image_token_id
            if int(slots.sum()) != feats.shape[0]:
                raise EngineError(
                    f"{int(slots.sum())} image tokens in the batch but {feats.shape[0]} image features "
                    "(the preprocessor and the engine disagree on the token count)"
                )
            embeds[slots] = feats  # row-major, the order torch's masked_scatter fills
        return embeds

    def vision_feeds(self, batch: Any) -> list[dict[str, np.ndarray]]:
        """The vision graph's input feeds for a batch's images (one or more calls)."""
        raise NotImplementedError

    def pack(self, outputs: list[np.ndarray], batch: Any) -> list[np.ndarray]:
        """Vision graph outputs (one per feed) -> per-image token features [num_tokens_i, H]."""
        raise NotImplementedError

    def position_ids(self, batch: Any) -> np.ndarray:
        """The decoder's position ids for a batch: [B, S], or [3, B, S] for M-RoPE decoders."""
        raise NotImplementedError


# ---- the registry's entry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinySpec:
    """How `make_tiny_model` writes a small model of a backbone (models/tiny.py holds the common part).

    specials: the tokenizer's special tokens in id order; tokens: the tokenizer's named special tokens
    (a bos_token is prepended to every text, Llama-style); image_defaults: the default image size keywords;
    check(opts): InputError for sizes the architecture cannot take; build(tokenizer, opts) -> (model,
    image_processor); presets: `size=` names -> the real checkpoints' shapes (size keywords).
    """

    specials: tuple[str, ...]
    tokens: dict[str, Any]
    image_defaults: dict[str, Any]
    check: Callable[[dict], None]
    build: Callable[[Any, dict], tuple[Any, Any]]
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One backbone as the registry lists it: its `model_type` name and its parts."""

    name: str
    preprocessor: type
    model: type
    host: type
    tiny: TinySpec
