"""Token-budget batching: group items of similar length so a batch wastes little on padding.

Sorting by length puts items of similar length side by side (the padded batch is `count x longest`), and
a budget on padded tokens keeps one long item from inflating a whole batch of short ones. The caller
writes each batch's results back at the indices it was given, so results come back in input order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import InputError


def token_budget_batches(lengths: Sequence[int], *, max_tokens: int, max_batch: int) -> list[np.ndarray]:
    """Split item indices into batches: longest first, at most `max_batch` items and `max_tokens` padded
    tokens (items x the batch's longest) per batch. An item longer than the budget gets a batch of its own.

    >>> [b.tolist() for b in token_budget_batches([3, 10, 4, 9], max_tokens=20, max_batch=8)]
    [[1, 3], [2, 0]]
    """
    if max_batch < 1:
        raise InputError(f"max_batch must be >= 1, got {max_batch}")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if (lengths < 0).any():
        raise InputError("lengths must be >= 0")
    # Stable sort: equal lengths keep input order, so a batch plan is deterministic.
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)  # sorted descending: the first item is the longest
        count = min(max_batch, max(1, max_tokens // longest), len(order) - start)
        batches.append(order[start : start + count])
        start += count
    return batches


def prepare_ahead(pre: Any, items: Sequence[Any], window: int) -> Iterator[tuple[int, list]]:
    """Yield (start, pre.prepare_many(items[start:start + window])) in order, preparing the next window on a
    worker thread while the caller runs the model on the current one. Errors name the item's index."""
    starts = list(range(0, len(items), window))
    if not starts:
        return
    # one pool per call: concurrent callers never wait on each other's preprocessing
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm2vec-prep") as pool:
        future = pool.submit(pre.prepare_many, items[:window], 0)
        for k, start in enumerate(starts):
            prepared = future.result()
            if k + 1 < len(starts):
                nxt = starts[k + 1]
                future = pool.submit(pre.prepare_many, items[nxt : nxt + window], nxt)
            yield start, prepared
