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

from ..distributed import RankError, SingleProcess, on_main, raise_everywhere
from ..errors import InputError
from ..progress import progress_bar
from .cache import EmbeddingCache, SideCache, keys_digest
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
    """Embeddings of the side's unique keys in key order: [U, D] on rank 0, None on other ranks.

    An exception on any rank (the encoder's, or rank 0's while it caches) is raised on every rank: see
    vlm2vec_rt.distributed.raise_everywhere.
    """
    t0 = time.perf_counter()
    keys = data.queries if side == "queries" else data.candidates
    order = encoding_order(keys)
    if comm.world_size > 1:  # at least one chunk per rank, so every rank works on small datasets too
        chunk_size = max(1, min(chunk_size, -(-len(keys) // comm.world_size)))
    num_chunks = -(-len(keys) // chunk_size)
    stats = SideStats(items=len(keys))
    store: SideCache | None = None
    done: dict[int, np.ndarray] = {}
    complete: np.ndarray | None = None

    def look_up_cache() -> list[int]:  # rank 0: the chunks still to encode
        nonlocal store, complete
        if cache is not None:
            digest = keys_digest([keys[i] for i in order], data.image_root)
            store = cache.side(data.name, side, digest, len(keys), chunk_size)
            complete = store.load_complete()
            if complete is None:
                for c in range(num_chunks):
                    array = store.load_chunk(c)
                    if array is not None:
                        done[c] = array
        return [] if complete is not None else [c for c in range(num_chunks) if c not in done]

    todo = on_main(comm, look_up_cache)
    bar = progress_bar(len(keys), enabled=progress and comm.is_main, desc=f"{data.name} {side}", leave=False)
    bar.update(len(keys) - sum(min(chunk_size, len(keys) - c * chunk_size) for c in todo))

    # Each round every rank encodes one chunk; rank 0 collects them (and writes them to the cache).
    world = comm.world_size
    context = f"dataset {data.name!r}, encoding {side}"
    for start in range(0, len(todo), world):
        mine = start + comm.rank
        result: tuple[int, np.ndarray | RankError] | None = None
        local: BaseException | None = None  # this rank's own failure, raised here with its traceback
        if mine < len(todo):
            c = todo[mine]
            idx = order[c * chunk_size : (c + 1) * chunk_size]
            try:
                result = (c, call_encode(encoder, data.items(side, idx), batch_size=batch_size))
            except InputError as e:
                local = InputError(_locate_error(str(e), data, side, idx))
                result = (c, RankError.of(local, comm.rank))
            except Exception as e:  # an engine error, an out-of-memory, a user encoder's bug: all ranks stop
                e.add_note(f"({context})")
                local, result = e, (c, RankError.of(e, comm.rank, context=context))
        gathered = comm.gather(result)
        error = None
        if comm.is_main:
            try:
                for got in gathered:
                    if got is None:
                        continue
                    c, array = got
                    if isinstance(array, RankError):
                        error = error or array
                        continue
                    done[c] = array
                    if store is not None:
                        store.save_chunk(c, array)
                    bar.update(array.shape[0])
                    stats.encoded += array.shape[0]
            except Exception as e:  # e.g. the cache's disk is full
                local = local or e
                error = error or RankError.of(e, comm.rank, context=context)
        error = comm.broadcast(error)
        if error is not None:
            bar.close()
            raise_everywhere(error, local)
    bar.close()

    def assemble() -> None:  # rank 0: the whole side, stored as one cache file
        nonlocal complete
        if complete is None:
            if keys:
                complete = np.concatenate([done[c] for c in range(num_chunks)])
            else:
                complete = np.zeros((0, 0), dtype=np.float32)
            if store is not None and len(keys):
                store.finish(complete)

    on_main(comm, assemble)
    if not comm.is_main:
        return None, stats
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
