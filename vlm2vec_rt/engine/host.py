"""Host-side steps of an engine: what runs around and between its two graphs, in numpy, without the torch model.

    NumpyBatch --vision_feeds--> vision graph calls --pack--> per-image features
    input_ids + per-image features --inputs_embeds (embedding table, image slots)--> decoder graph
    attention_mask (+ ids, grids) --position_ids--> decoder graph

The only weights this side needs are the token embedding table and LLaVA-NeXT's image_newline vector,
stored as .npy files in the engine; the rest is arithmetic on the model config (the Preprocessor's).
Each step is tested against the eager `Backbone` method it replaces.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import EngineError
from ..models.preprocessors import NumpyBatch, Preprocessor

EMBED_TOKENS = "embed_tokens.npy"
IMAGE_NEWLINE = "image_newline.npy"
MAX_VIEWS_PER_CALL = 32  # LLaVA-NeXT views per vision-graph call: bounds activation memory at high resolution


def write_host_assets(backbone, out_dir: str | os.PathLike, *, dtype: str = "float32") -> list[str]:
    """Save the weights the host side needs (embedding table, image_newline) as .npy; returns the file names."""
    from .. import atomic

    out_dir = Path(out_dir)
    table = backbone.inner.get_input_embeddings().weight.detach().float().cpu().numpy()
    atomic.save_npy(out_dir / EMBED_TOKENS, table.astype(dtype))
    names = [EMBED_TOKENS]
    if backbone.name == "llava_next":
        newline = backbone.inner.image_newline.detach().float().cpu().numpy()
        atomic.save_npy(out_dir / IMAGE_NEWLINE, newline.astype(dtype))
        names.append(IMAGE_NEWLINE)
    return names


def _load_npy(path: Path) -> np.ndarray:
    try:
        # memory-mapped: a 7B model's table is hundreds of MB and only the looked-up rows are read
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read {os.fspath(path)!r}: {e}") from None


class Host:
    """Embedding lookup and image-slot scatter; subclasses add the backbone's vision feeds, pack and positions."""

    ASSETS: tuple[str, ...] = (EMBED_TOKENS,)  # the engine files this side reads (hash-checked at load)

    def __init__(self, pre: Preprocessor, engine_dir: str | os.PathLike):
        self.pre = pre
        self.image_token_id = pre.image_token_id
        self.embed_tokens = _load_npy(Path(engine_dir) / EMBED_TOKENS)  # [vocab, H]

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

    def vision_feeds(self, batch: NumpyBatch) -> list[dict[str, np.ndarray]]:
        """The vision graph's input feeds for a batch's images (one or more calls)."""
        raise NotImplementedError

    def pack(self, outputs: list[np.ndarray], batch: NumpyBatch) -> list[np.ndarray]:
        """Vision graph outputs (one per feed) -> per-image token features [num_tokens_i, H]."""
        raise NotImplementedError

    def position_ids(self, batch: NumpyBatch) -> np.ndarray:
        raise NotImplementedError


class LlavaNextHost(Host):
    """LLaVA-NeXT: views in chunks, anyres unpad + image_newline, positions from the mask."""

    ASSETS = (EMBED_TOKENS, IMAGE_NEWLINE)

    def __init__(self, pre: Preprocessor, engine_dir: str | os.PathLike):
        super().__init__(pre, engine_dir)
        self.image_newline = np.asarray(_load_npy(Path(engine_dir) / IMAGE_NEWLINE), dtype=np.float32)
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


def sequential_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """1-D positions [B, S]: each real token's index among its row's real tokens (padding gets 0)."""
    return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0)


def vision_position_ids(grid_thw, merge: int) -> np.ndarray:
    """(row, col) of every patch of one image, in the 2x2-merge block order of Qwen2-VL's patches: [t*h*w, 2]."""
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


HOSTS: dict[str, type[Host]] = {"llava_next": LlavaNextHost, "qwen2_vl": Qwen2VLHost}
