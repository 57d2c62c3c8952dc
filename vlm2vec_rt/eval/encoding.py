"""Encoding one side of a dataset: each distinct (text, image) once, in chunks, cached, shared by ranks.

Any object with `encode(items, ...)` -> [N, D] works: the Embedder, an Engine, or a user's own encoder
(batch_size/progress keywords are passed only where its signature takes them). Items are encoded in
order of (has image, text length) so batches hold similar lengths and pad little.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..progress import progress_bar
from .cache import EmbeddingCache, SideCache, keys_digest
from .distributed import SingleProcess
from .reader import EvalData

log = logging.getLogger("vlm2vec_rt")


def encoder_fingerprint(encoder: Any, cache_key: str | None = None) -> str | None:
    """What identifies the encoder's embeddings for caching: cache_key if given, else its `.fingerprint`.

    An encoder without one (and no cache_key) is not cached: a name alone cannot tell two models apart.
    """
    if cache_key:
        return str(cache_key)
    fp = getattr(encoder, "fingerprint", None)
    if callable(fp):
        fp = fp()
    return str(fp) if fp else None


def _accepted_keywords(encoder: Any) -> set[str]:
    try:
        params = inspect.signature(encoder.encode).parameters.values()
    except (TypeError, ValueError):
        return set()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {"batch_size", "progress"}
    return {p.name for p in params} & {"batch_size", "progress"}


def call_encode(encoder: Any, items: list, *, batch_size: int) -> np.ndarray:
    """encoder.encode(items) as a checked float32 [len(items), D] array."""
    if not callable(getattr(encoder, "encode", None)):
        raise InputError(f"the encoder ({type(encoder).__name__}) has no encode(items) method")
    accepted = _accepted_keywords(encoder)
    kwargs = {k: v for k, v in (("batch_size", batch_size), ("progress", False)) if k in accepted}
    out = encoder.encode(items, **kwargs)
    if hasattr(out, "detach"):  # a torch tensor
        out = out.detach().float().cpu().numpy()
    out = np.asarray(out, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != len(items):
        raise InputError(
            f"encoder returned shape {out.shape} for {len(items)} items; expected [{len(items)}, D]"
        )
    if not np.isfinite(out).all():
        raise InputError("encoder returned NaN or infinite values")
    return out


def encoding_order(keys: list[tuple[str, str]]) -> np.ndarray:
    """Text-only first, then by text length (stable): batches of similar length pad little."""
    return np.asarray(
        sorted(range(len(keys)), key=lambda i: (bool(keys[i][1]), len(keys[i][0]))), dtype=np.int64
    )


@dataclass
class SideStats:
    items: int = 0  # distinct items on this side
    encoded: int = 0  # encoded in this run, all ranks
    cached: int = 0  # loaded from the cache
    seconds: float = 0.0


def encode_side(
    encoder: Any,
    data: EvalData,
    side: str,
    *,
    batch_size: int,
    chunk_size: int,
    cache: EmbeddingCache | None,
    comm: SingleProcess,
    progress: bool = False,
) -> tuple[np.ndarray | None, SideStats]:
    """Embeddings of the side's unique keys in key order: [U, D] on rank 0, None on other ranks."""
    t0 = time.perf_counter()
    keys = data.queries if side == "queries" else data.candidates
    order = encoding_order(keys)
    if comm.world_size > 1:  # at least one chunk per rank, so every rank works on small datasets too
        chunk_size = max(1, min(chunk_size, -(-len(keys) // comm.world_size)))
    num_chunks = -(-len(keys) // chunk_size)
    stats = SideStats(items=len(keys))
    store: SideCache | None = None
    done: dict[int, np.ndarray] = {}
    complete = None
    if comm.is_main:
        if cache is not None:
            digest = keys_digest([keys[i] for i in order], data.image_root)
            store = cache.side(data.name, side, digest, len(keys), chunk_size)
            complete = store.load_complete()
            if complete is None:
                for c in range(num_chunks):
                    array = store.load_chunk(c)
                    if array is not None:
                        done[c] = array
        todo = [] if complete is not None else [c for c in range(num_chunks) if c not in done]
    else:
        todo = None
    todo = comm.broadcast(todo)
    bar = progress_bar(len(keys), enabled=progress and comm.is_main, desc=f"{data.name} {side}", leave=False)
    bar.update(len(keys) - sum(min(chunk_size, len(keys) - c * chunk_size) for c in todo))

    # Each round every rank encodes one chunk; rank 0 collects them (and writes them to the cache).
    world = comm.world_size
    for start in range(0, len(todo), world):
        mine = start + comm.rank
        result: tuple[int, Any] | None = None
        if mine < len(todo):
            c = todo[mine]
            idx = order[c * chunk_size : (c + 1) * chunk_size]
            try:
                result = (c, call_encode(encoder, data.items(side, idx), batch_size=batch_size))
            except InputError as e:
                result = (c, _locate_error(str(e), data, side, idx))
        gathered = comm.gather(result)
        error = None
        if comm.is_main:
            for got in gathered:
                if got is None:
                    continue
                c, array = got
                if isinstance(array, str):
                    error = error or array
                    continue
                done[c] = array
                if store is not None:
                    store.save_chunk(c, array)
                bar.update(array.shape[0])
                stats.encoded += array.shape[0]
        error = comm.broadcast(error)
        if error:
            bar.close()
            raise InputError(error)
    bar.close()
    if not comm.is_main:
        return None, stats
    if complete is None:
        if keys:
            complete = np.concatenate([done[c] for c in range(num_chunks)])
        else:
            complete = np.zeros((0, 0), dtype=np.float32)
        if store is not None and len(keys):
            store.finish(complete)
    stats.cached = len(keys) - stats.encoded
    embeddings = np.empty_like(complete)
    embeddings[order] = complete
    stats.seconds = time.perf_counter() - t0
    return embeddings, stats


def _locate_error(message: str, data: EvalData, side: str, idx: np.ndarray) -> str:
    """Prefix an encoder's error with the dataset and the first row using the input it names."""
    keys = data.queries if side == "queries" else data.candidates
    what = "query" if side == "queries" else "candidate"
    root = os.fspath(data.image_root)
    for i in idx:
        path = keys[int(i)][1]
        full = os.path.join(root, path)
        if path and (full in message or path in message):
            row = _first_row(data, side, int(i))
            shown = "" if full in message else f" {full!r}"
            return f"dataset {data.name!r}, row {row}, {what} image{shown}: {message}"
    m = re.match(r"item (\d+)", message)
    if m and int(m.group(1)) < len(idx):
        i = int(idx[int(m.group(1))])
        return f"dataset {data.name!r}, row {_first_row(data, side, i)}, {what} {keys[i]!r}: {message}"
    return f"dataset {data.name!r}, encoding {side}: {message}"


def _first_row(data: EvalData, side: str, key: int) -> int:
    if side == "queries":
        hits = np.nonzero(data.query_index == key)[0]
    else:
        hits = np.nonzero((data.candidate_index == key).any(axis=1))[0]
    return int(data.rows[hits[0]]) if hits.size else -1
