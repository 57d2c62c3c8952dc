"""Token-budget batching: group items of similar length so a batch wastes little on padding.

Sorting by length puts items of similar length side by side (the padded batch is `count x longest`), and
a budget on padded tokens keeps one long item from inflating a whole batch of short ones. The caller
writes each batch's results back at the indices it was given, so results come back in input order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import InputError
from ..progress import progress_bar

DEFAULT_MAX_TOKENS = 8192  # padded tokens per model call: bounds activation memory, not batch count
WINDOW_BATCHES = 4  # items are prepared, sorted and batched a window of batch_size x this at a time
# ... unless their prepared pixels pass this first: a window of 1344x1344 LLaVA-NeXT images (17 views,
# 23 MB of float32 each) would hold 1.5 GB, and two windows are alive at once. A window always has one
# batch_size of items, so batches stay full.
WINDOW_BYTES = 256 << 20

# What one more model call costs, in padded tokens' worth of work. On 2 CPU cores an ORT decoder call
# costs about as much as 16-64 tokens (bench/bench_engine.py's text batches ran fastest in that range,
# 1.7x faster than one padded batch); GPUs, which need large batches to fill, want far more.
CALL_COST_TOKENS = 32


def token_budget_batches(
    lengths: Sequence[int], *, max_tokens: int, max_batch: int, call_cost_tokens: int = CALL_COST_TOKENS
) -> list[np.ndarray]:
    """Split item indices into batches of similar length: longest first, at most `max_batch` items and
    `max_tokens` padded tokens (items x the batch's longest) per batch; an item longer than the budget gets
    a batch of its own.

    Within those limits the split is the one with the least work, counted as padded tokens plus
    `call_cost_tokens` per batch (the fixed cost of one model call, in tokens' worth of work), and among
    those the one with the fewest batches: with 0, batches split wherever that saves any padding; the
    larger it is, the fewer and fuller the batches.

    >>> [b.tolist() for b in token_budget_batches([3, 10, 4, 9], max_tokens=20, max_batch=8)]
    [[1, 3], [2, 0]]
    >>> [b.tolist() for b in token_budget_batches([30, 4, 29, 5, 28], max_tokens=200, max_batch=8)]
    [[0, 2, 4], [3, 1]]
    >>> [b.tolist() for b in token_budget_batches([30, 4, 29, 5, 28], max_tokens=200, max_batch=8, call_cost_tokens=100)]
    [[0, 2, 4, 3, 1]]
    """
    if max_batch < 1:
        raise InputError(f"max_batch must be >= 1, got {max_batch}")
    if max_tokens < 1:
        raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
    if call_cost_tokens < 0:
        raise InputError(f"call_cost_tokens must be >= 0, got {call_cost_tokens}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if (lengths < 0).any():
        raise InputError("lengths must be >= 0")
    # Stable sort: equal lengths keep input order, so a batch plan is deterministic. In this order every
    # batch is a run [j, i) whose longest item is its first: the best split is a shortest path over the
    # run ends (cost[i] = min over j of cost[j] + (i - j) x longest[j] + call cost): O(n x the widest
    # batch the limits allow), ~10 ms for a window of 1,024 items at max_batch 256.
    order = np.argsort(-lengths, kind="stable")
    longest = np.maximum(lengths[order], 1)
    n = len(order)
    # Costs are whole tokens; a 1/(n+1) surcharge per call (under 1 for a whole plan) makes the plan with
    # the fewest calls win among plans of equal cost.
    per_call = call_cost_tokens + 1.0 / (n + 1)
    cost = np.zeros(n + 1)
    start_of = np.zeros(n + 1, dtype=np.int64)  # where the last batch of the best plan for [0, i) begins
    first = 0  # the earliest start whose run up to i fits the budget: it only moves right as i grows
    for i in range(1, n + 1):
        while first < i - 1 and (i - first) * longest[first] > max_tokens:
            first += 1
        j = np.arange(max(first, i - max_batch), i)  # a batch of one always fits
        run = cost[j] + (i - j) * longest[j] + per_call
        k = int(np.argmin(run))
        cost[i], start_of[i] = run[k], j[k]
    batches: list[np.ndarray] = []
    end = n
    while end > 0:
        batches.append(order[start_of[end] : end])
        end = start_of[end]
    return batches[::-1]


def prepare_ahead(
    pre: Any, items: Sequence[Any], window: int, *, max_bytes: int | None = None, step: int | None = None
) -> Iterator[tuple[int, list]]:
    """Yield (start, prepared items[start:start + n]) in order, windows of n <= `window` items, preparing the
    next window on a worker thread while the caller runs the model on the current one. Errors name the
    item's index.

    max_bytes bounds a window's prepared arrays (token ids and pixels) instead of its item count alone: a
    window is prepared `step` items at a time (default: all `window` at once) and closes once it holds
    max_bytes, so each window has at least `step` items and at most about max_bytes plus one step's worth.
    """
    if not items:
        return
    step = window if step is None else max(1, min(step, window))

    def prepare_window(start: int) -> list:
        prepared: list = []
        held = 0
        while len(prepared) < window and start + len(prepared) < len(items):
            at = start + len(prepared)
            part = pre.prepare_many(items[at : at + min(step, window - len(prepared))], at)
            prepared += part
            if max_bytes is not None:
                held += sum(prepared_nbytes(p) for p in part)
                if held >= max_bytes:
                    break
        return prepared

    # one pool per call: concurrent callers never wait on each other's preprocessing
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm2vec-prep") as pool:
        start = 0
        future = pool.submit(prepare_window, start)
        while True:
            prepared = future.result()
            nxt = start + len(prepared)
            if nxt < len(items):
                future = pool.submit(prepare_window, nxt)
            yield start, prepared
            if nxt >= len(items):
                return
            start = nxt


def prepared_nbytes(prepared: tuple) -> int:
    """Bytes a prepared item holds: its token ids (as the int64 they become) and its image's arrays."""
    ids, image = prepared
    nbytes = 8 * len(ids)
    if image is not None:
        nbytes += int(getattr(image.pixel_values, "nbytes", 0))
    return nbytes


def call_cost_tokens(device: str, max_tokens: int | None) -> int:
    """The batcher's cost of one more model call on `device`: CALL_COST_TOKENS on a CPU; on a GPU, which runs
    a small batch in about the time of a full one, a whole token budget (DEFAULT_MAX_TOKENS without a cap):
    only what saves more padding than that is split off (not measured on a GPU)."""
    if str(device).startswith("cpu"):
        return CALL_COST_TOKENS
    return DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens


def encode_by_length(
    pre: Any,
    items: Sequence[Any],
    run_batch: Callable[[Any], np.ndarray],
    *,
    dim: int,
    batch_size: int,
    max_tokens: int | None,
    call_cost: int,
    progress: bool,
    window_batches: int = WINDOW_BATCHES,
    window_bytes: int | None = WINDOW_BYTES,
) -> np.ndarray:
    """The encode loop of Embedder and Engine -> float32 [N, dim] in input order.

    Windows of up to batch_size x window_batches items are preprocessed one ahead on a worker thread
    (`prepare_ahead`; two windows of prepared pixels are held at once), a window closing early, after a
    multiple of batch_size items, once its prepared arrays pass window_bytes (None: no byte bound): this
    bounds host memory. Each window is split by `token_budget_batches` (max_tokens None: no token cap), and
    run_batch(pre.collate(...)) computes a batch's [B, dim] rows.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    budget = int(np.iinfo(np.int64).max) if max_tokens is None else max_tokens
    out = np.empty((len(items), dim), dtype=np.float32)
    # closing(): when the model step raises, the prepare-ahead worker is shut down here, not left to the
    # garbage collector; the bar is closed on every exit
    with (
        progress_bar(len(items), enabled=progress, desc="encode") as bar,
        contextlib.closing(
            prepare_ahead(pre, items, batch_size * window_batches, max_bytes=window_bytes, step=batch_size)
        ) as windows,
    ):
        for start, prepared in windows:
            lengths = [len(ids) for ids, _ in prepared]
            plan = token_budget_batches(
                lengths, max_tokens=budget, max_batch=batch_size, call_cost_tokens=call_cost
            )
            for idx in plan:
                out[start + idx] = run_batch(pre.collate([prepared[i] for i in idx]))
                bar.update(len(idx))
    return out
