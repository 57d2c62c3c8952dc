"""Cross-request dynamic batching: the items of concurrent requests share model calls.

    request --admit (bounded queue, else Overloaded)--> prepare (thread pool: decode, tile, tokenise)
            --> pending items (FIFO) --worker: token_budget_batches over a window of them, the batch
                holding the oldest item--> model call (one thread) --> each request's rows, in its order

The plan is `token_budget_batches`, the one `Engine.encode` and `Embedder.encode` use; the batcher only
decides which pending items it plans over. It always runs the planned batch holding the oldest pending
item, so no item waits behind a stream of newer ones. No wait is added by default: while a model call
runs, newly arrived items queue and form the next batch by themselves (`batch_wait_s` may hold a lone
item back a little for company). The event loop never runs preprocessing or the model: both are in
threads, so a slow batch never delays accepting, parsing or answering other requests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import EngineError
from ..models.preprocessors import NumpyBatch, Prepared
from ..preprocess.batching import WINDOW_BATCHES, call_cost_tokens, token_budget_batches
from .metrics import Metrics

ModelStep = Callable[[NumpyBatch], np.ndarray]

log = logging.getLogger("vlm2vec_rt.serve")


class Overloaded(Exception):
    """The queue cannot take a request's items now; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


def model_step(encoder: Any) -> ModelStep:
    """One collated batch -> [B, dim] float32 rows, for an Engine (its `run_batch`) or an Embedder (its
    backbone's forward, under inference mode: it is per thread, so it is entered in the calling thread)."""
    if hasattr(encoder, "run_batch"):
        return encoder.run_batch
    backbone = getattr(encoder, "backbone", None)
    if backbone is None:
        raise TypeError(f"cannot serve a {type(encoder).__name__}: expected an Engine or an Embedder")
    import torch

    def step(batch: NumpyBatch) -> np.ndarray:
        with torch.inference_mode():
            return backbone.forward(backbone.to_device(batch)).float().cpu().numpy()

    return step


def encoder_device(encoder: Any) -> str:
    """The device the model runs on ("cpu", "cuda", ...): it sets the cost of one more model call."""
    if hasattr(encoder, "device") and isinstance(encoder.device, str):
        return encoder.device
    backbone = getattr(encoder, "backbone", None)
    return str(getattr(getattr(backbone, "device", None), "type", "cpu"))


class Ticket:
    """Queue capacity held by one request from admission until it is answered or abandoned.

    A request cancelled while a worker thread still prepares its items keeps its capacity until that
    thread is done (`defer`), so abandoned work still counts against the bound on memory.
    """

    def __init__(self, batcher: Batcher, items: int):
        self._batcher = batcher
        self.items = items
        self._released = False
        self._deferred = False
        self._lock = threading.Lock()

    def release(self) -> None:
        """Give the capacity back (idempotent; safe from any thread)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        self._batcher._release(self.items)

    def defer(self) -> None:
        """Leave the release to a worker thread that still holds the request's data."""
        self._deferred = True

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._deferred:
            self.release()


@dataclass(eq=False)
class _Job:
    """One request's items in the batcher."""

    rows: np.ndarray  # [n, dim] float32, filled as its items' batches finish
    waiting: int
    future: asyncio.Future
    submitted: float


@dataclass(eq=False)
class _Entry:
    """One pending item."""

    job: _Job
    index: int  # row in job.rows
    prepared: Prepared
    length: int = field(init=False)

    def __post_init__(self) -> None:
        self.length = len(self.prepared[0])


class Batcher:
    """Batches the items of concurrent requests into token-budget model calls (see the module docstring).

    pre: the encoder's Preprocessor (collate); step: a collated batch -> [B, dim] rows (`model_step`).
    cross_request=False plans every request on its own (its items never share a call with another's):
    the one-call-per-request baseline. Use from one event loop: `start()` in it, then `admit`, `prepare`,
    `embed`; `aclose()` at shutdown.
    """

    def __init__(
        self,
        pre: Any,
        step: ModelStep,
        *,
        dim: int,
        device: str = "cpu",
        max_batch_size: int = 32,
        max_batch_tokens: int = 8192,
        max_queue: int = 1024,
        cross_request: bool = True,
        batch_wait_s: float = 0.0,
        prep_threads: int = 2,
        metrics: Metrics | None = None,
    ):
        self.pre = pre
        self.step = step
        self.dim = dim
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.call_cost = call_cost_tokens(device, max_batch_tokens)
        self.max_queue = max_queue
        self.cross_request = cross_request
        self.batch_wait_s = batch_wait_s
        self.metrics = metrics or Metrics()
        self._prep_threads = prep_threads
        self._depth = 0
        self._depth_lock = threading.Lock()
        self._pending: list[_Entry] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._prep_pool: concurrent.futures.ThreadPoolExecutor | None = None
        # one model call at a time: a call already uses every core (intra-op threads); two would thrash
        self._model_pool: concurrent.futures.ThreadPoolExecutor | None = None

    # ---- life cycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker task and the thread pools (in the event loop that will serve)."""
        self._wake = asyncio.Event()
        self._prep_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._prep_threads, thread_name_prefix="vlm2vec-serve-prep"
        )
        self._model_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="vlm2vec-serve-model"
        )
        self._worker = asyncio.create_task(self._work(), name="vlm2vec-batcher")

    async def aclose(self) -> None:
        """Stop: fail what is still queued (nothing, after a drain) and shut the pools down."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for entry in self._pending:
            if not entry.job.future.done():
                entry.job.future.set_exception(EngineError("the server is shutting down"))
        self._pending.clear()
        for pool in (self._prep_pool, self._model_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    # ---- admission -----------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Items admitted and not yet answered."""
        return self._depth

    @property
    def full(self) -> bool:
        """No room for even one more item."""
        return self._depth >= self.max_queue

    def admit(self, items: int) -> Ticket:
        """Reserve queue room for a request's items (all or nothing); Overloaded when there is none."""
        with self._depth_lock:
            if self._depth + items > self.max_queue:
                raise Overloaded(
                    f"the server is at capacity ({self._depth} of {self.max_queue} queued items); retry shortly"
                )
            self._depth += items
            self.metrics.queue_depth.set(self._depth)
        return Ticket(self, items)

    def _release(self, items: int) -> None:
        with self._depth_lock:
            self._depth -= items
            self.metrics.queue_depth.set(self._depth)

    # ---- the request side ----------------------------------------------------------------------------
    async def prepare(self, ticket: Ticket, fn: Callable[[], list[Prepared]]) -> list[Prepared]:
        """Run `fn` (decode, tile, tokenise) on the preparation threads, off the event loop."""
        assert self._prep_pool is not None, "Batcher.start() was not called"
        work = self._prep_pool.submit(fn)
        try:
            return await asyncio.wrap_future(work)
        except asyncio.CancelledError:
            # the thread cannot be interrupted: its memory is released, and the room with it, when it ends
            ticket.defer()
            work.add_done_callback(lambda _: ticket.release())
            raise

    async def embed(self, prepared: Sequence[Prepared]) -> np.ndarray:
        """Queue prepared items and wait for their rows -> float32 [len(prepared), dim], in their order.

        A cancelled caller (a client that went away) takes its items that have not run out of the queue.
        """
        assert self._wake is not None, "Batcher.start() was not called"
        loop = asyncio.get_running_loop()
        job = _Job(
            rows=np.empty((len(prepared), self.dim), dtype=np.float32),
            waiting=len(prepared),
            future=loop.create_future(),
            submitted=time.perf_counter(),
        )
        if not prepared:
            return job.rows
        self._pending.extend(_Entry(job, i, p) for i, p in enumerate(prepared))
        self._wake.set()
        try:
            return await job.future
        except asyncio.CancelledError:
            self._drop(job)
            raise

    def _drop(self, job: _Job) -> None:
        self._pending = [e for e in self._pending if e.job is not job]

    # ---- the worker ----------------------------------------------------------------------------------
    def _next_batch(self) -> list[_Entry]:
        """The planned batch that holds the oldest pending item, planned over a window of pending items."""
        window = self._pending[: self.max_batch_size * WINDOW_BATCHES]
        if not self.cross_request:
            oldest = window[0].job
            window = [e for e in window if e.job is oldest]
        plan = token_budget_batches(
            [e.length for e in window],
            max_tokens=self.max_batch_tokens,
            max_batch=self.max_batch_size,
            call_cost_tokens=self.call_cost,
        )
        chosen = next(b for b in plan if (b == 0).any())
        taken = {id(window[i]) for i in chosen}
        self._pending = [e for e in self._pending if id(e) not in taken]
        # in the plan's order: the batch's rows come back in it
        return [window[i] for i in chosen]

    async def _work(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.batch_wait_s > 0 and len(self._pending) < self.max_batch_size:
                waited = time.perf_counter() - self._pending[0].job.submitted
                if waited < self.batch_wait_s:
                    await asyncio.sleep(self.batch_wait_s - waited)
                    continue  # requests may have come or gone meanwhile
            try:
                batch = self._next_batch()
            except Exception as e:  # a bug, not bad input: fail what waits rather than hang it forever
                log.exception("batch planning failed")
                for entry in self._pending:
                    if not entry.job.future.done():
                        entry.job.future.set_exception(EngineError(f"batch planning failed: {e}"))
                self._pending.clear()
                continue
            started = time.perf_counter()
            for entry in batch:
                self.metrics.queue_seconds.observe(started - entry.job.submitted)
            try:
                results = await loop.run_in_executor(self._model_pool, self._run, batch)
            except RuntimeError as e:  # the pool was shut down under us: fail the batch, keep the loop
                results = [(batch, EngineError(f"model call not run: {e}"))]
            self._observe(batch, time.perf_counter() - started)
            for entries, outcome in results:
                self._deliver(entries, outcome)

    def _run(self, batch: list[_Entry]) -> list[tuple[list[_Entry], np.ndarray | BaseException]]:
        """The model call (on the model thread). Should it fail on a batch that mixes requests, each
        request's items are rerun on their own, so an item that breaks the model fails its request only."""
        try:
            return [(batch, self._call(batch))]
        except Exception as e:
            groups: dict[int, list[_Entry]] = {}
            for entry in batch:
                groups.setdefault(id(entry.job), []).append(entry)
            if len(groups) == 1:
                return [(batch, e)]
        results: list[tuple[list[_Entry], np.ndarray | BaseException]] = []
        for entries in groups.values():
            try:
                results.append((entries, self._call(entries)))
            except Exception as e:
                results.append((entries, e))
        return results

    def _call(self, entries: list[_Entry]) -> np.ndarray:
        rows = self.step(self.pre.collate([e.prepared for e in entries]))
        if rows.shape != (len(entries), self.dim):
            raise EngineError(
                f"the model returned rows of shape {rows.shape}, expected {(len(entries), self.dim)}"
            )
        return rows

    def _deliver(self, entries: list[_Entry], outcome: np.ndarray | BaseException) -> None:
        for k, entry in enumerate(entries):
            job = entry.job
            if job.future.done():
                continue  # cancelled, or failed by another of its batches
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
                self._drop(job)
                continue
            job.rows[entry.index] = outcome[k]
            job.waiting -= 1
            if job.waiting == 0:
                job.future.set_result(job.rows)

    def _observe(self, batch: list[_Entry], seconds: float) -> None:
        m = self.metrics
        m.model_seconds.observe(seconds)
        m.batch_items.observe(len(batch))
        m.batch_requests.observe(len({id(e.job) for e in batch}))
        m.batch_tokens.observe(len(batch) * max(e.length for e in batch))
