"""On-disk embedding cache, per model fingerprint, dataset and side, written chunk by chunk.

    root/<fingerprint>/<dataset>/<side>-<digest>/chunk-<size>-<index>-<sha>.npy   while encoding
    root/<fingerprint>/<dataset>/<side>-<digest>/embeddings-<sha>.npy             once the side is complete

<digest> hashes the side's keys in encoding order together with each image file's size and mtime,
so changed data or images never reuse stale vectors. <sha> is the start of the sha256 of the file's own
bytes: a cache directory copied from elsewhere (or damaged) is checked file by file before use, and a file
that does not match its name, or does not load as a float32 [n, D] array of finite values, is ignored with
a warning and encoded again. Every file is written atomically as .npy with allow_pickle=False and is
complete the moment it has its name, so an interrupted run resumes at the first chunk it had not finished.

Fingerprints and dataset names become path components only through `path_component` (no '..', no '/').
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
from pathlib import Path

import numpy as np

from .. import atomic

log = logging.getLogger("vlm2vec_rt")

_PLAIN = re.compile(r"[A-Za-z0-9_-]{1,100}")
_SHA_CHARS = 20  # of the sha256 in a file name: 80 bits, against damage rather than an adversary


def path_component(name: str) -> str:
    """A name as one safe path component: kept when it is plain ([A-Za-z0-9_-], at most 100 characters),
    else its plain characters (others as '_') and a hash of the whole name, so distinct names never share a
    folder and nothing ('..' included) escapes the cache root."""
    if _PLAIN.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)[:64]}-{digest}"


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

    def _chunk_stem(self, index: int) -> str:
        return f"chunk-{self.chunk_size}-{index:06d}"

    def chunk_rows(self, index: int) -> int:
        return min(self.chunk_size, self.num_items - index * self.chunk_size)

    def load_complete(self) -> np.ndarray | None:
        return _load_checked(self.folder, "embeddings", self.num_items)

    def load_chunk(self, index: int) -> np.ndarray | None:
        return _load_checked(self.folder, self._chunk_stem(index), self.chunk_rows(index))

    def save_chunk(self, index: int, array: np.ndarray) -> None:
        _save_checked(self.folder, self._chunk_stem(index), array)

    def finish(self, array: np.ndarray) -> None:
        """Store the whole side as one file, then drop the chunks it replaces."""
        _save_checked(self.folder, "embeddings", array)
        for f in self.folder.glob("chunk-*.npy"):
            with contextlib.suppress(OSError):
                f.unlink()


class EmbeddingCache:
    """Embeddings on disk under root/<fingerprint>/: one SideCache per dataset and side."""

    def __init__(self, root: str | os.PathLike, fingerprint: str):
        self.root = Path(root) / path_component(fingerprint)

    def side(self, dataset: str, side: str, digest: str, num_items: int, chunk_size: int) -> SideCache:
        folder = self.root / path_component(dataset) / f"{path_component(side)}-{path_component(digest)}"
        return SideCache(folder, num_items, chunk_size)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:_SHA_CHARS]


def _save_checked(folder: Path, stem: str, array: np.ndarray) -> None:
    """Write <stem>-<sha>.npy atomically, then remove any other version of <stem>."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32), allow_pickle=False)
    data = buffer.getvalue()
    path = folder / f"{stem}-{_sha(data)}.npy"
    atomic.write_bytes(path, data)
    for other in folder.glob(f"{stem}-*.npy"):
        if other != path:
            with contextlib.suppress(OSError):
                other.unlink()


def _load_checked(folder: Path, stem: str, rows: int) -> np.ndarray | None:
    """The array in <stem>-<sha>.npy if the file's bytes match <sha> and it holds rows finite float32 rows."""
    for path in sorted(folder.glob(f"{stem}-*.npy")) if folder.is_dir() else []:
        try:
            data = path.read_bytes()
        except OSError as e:
            log.warning("ignoring unreadable cache file %s (%s); encoding again", path, e)
            continue
        if path.stem != f"{stem}-{_sha(data)}":
            log.warning(
                "ignoring cache file %s: its content does not match its checksum; encoding again", path
            )
            with contextlib.suppress(OSError):
                path.unlink()  # damaged: the re-encoded version replaces it
            continue
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable cache file %s (%s); encoding again", path, e)
            continue
        if (
            array.dtype != np.float32
            or array.ndim != 2
            or array.shape[0] != rows
            or not np.isfinite(array).all()
        ):
            log.warning(
                "ignoring cache file %s: shape %s %s does not fit; encoding again",
                path,
                array.shape,
                array.dtype,
            )
            continue
        return array
    return None
