"""On-disk embedding cache, per model fingerprint, dataset and side, written chunk by chunk.

    root/<fingerprint>/<dataset>/<side>-<digest>/chunk-<size>-<index>.npy   while encoding
    root/<fingerprint>/<dataset>/<side>-<digest>/embeddings.npy             once the side is complete

<digest> hashes the side's keys in encoding order together with each image file's size and mtime,
so changed data or images never reuse stale vectors. Every file is written atomically as .npy with
allow_pickle=False; a file that does not load as a float32 [n, D] array of finite values is ignored
and encoded again. An interrupted run therefore resumes at the first chunk it had not finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path

import numpy as np

from .. import atomic

log = logging.getLogger("vlm2vec_rt")

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def keys_digest(keys: list[tuple[str, str]], image_root: str | os.PathLike) -> str:
    """Identity of a list of (text, image path) keys and of the image files they point to."""
    h = hashlib.sha256()
    for text, path in keys:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
        h.update(path.encode("utf-8", "surrogatepass"))
        if path:
            try:
                st = os.stat(os.path.join(image_root, path))
                h.update(f"\x00{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"\x00missing")
        h.update(b"\x01")
    return h.hexdigest()[:20]


class SideCache:
    """The cache of one side (queries or candidates) of one dataset for one model."""

    def __init__(self, folder: Path, num_items: int, chunk_size: int):
        self.folder = folder
        self.num_items = num_items
        self.chunk_size = chunk_size

    @property
    def complete_path(self) -> Path:
        return self.folder / "embeddings.npy"

    def chunk_path(self, index: int) -> Path:
        return self.folder / f"chunk-{self.chunk_size}-{index:06d}.npy"

    def chunk_rows(self, index: int) -> int:
        return min(self.chunk_size, self.num_items - index * self.chunk_size)

    def load_complete(self) -> np.ndarray | None:
        return _load(self.complete_path, self.num_items)

    def load_chunk(self, index: int) -> np.ndarray | None:
        return _load(self.chunk_path(index), self.chunk_rows(index))

    def save_chunk(self, index: int, array: np.ndarray) -> None:
        atomic.save_npy(self.chunk_path(index), np.asarray(array, dtype=np.float32))

    def finish(self, array: np.ndarray) -> None:
        """Store the whole side as one file, then drop the chunks it replaces."""
        atomic.save_npy(self.complete_path, np.asarray(array, dtype=np.float32))
        for f in self.folder.glob("chunk-*.npy"):
            with contextlib.suppress(OSError):
                f.unlink()


class EmbeddingCache:
    """Embeddings on disk under root/<fingerprint>/: one SideCache per dataset and side."""

    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.root = Path(root) / _SAFE.sub("_", fingerprint)

    def side(self, dataset: str, side: str, digest: str, num_items: int, chunk_size: int) -> SideCache:
        folder = self.root / _SAFE.sub("_", dataset) / f"{side}-{digest}"
        return SideCache(folder, num_items, chunk_size)


def _load(path: Path, rows: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable cache file %s (%s); encoding again", path, e)
        return None
    if array.dtype != np.float32 or array.ndim != 2 or array.shape[0] != rows or not np.isfinite(array).all():
        log.warning(
            "ignoring cache file %s: shape %s %s does not fit; encoding again", path, array.shape, array.dtype
        )
        return None
    return array
