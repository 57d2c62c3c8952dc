"""`ServeConfig`: every limit and switch of the embeddings server, with the defaults `vlm2vec-rt serve` uses."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import InputError
from ..preprocess.batching import DEFAULT_MAX_TOKENS

MIB = 1 << 20


def default_prep_threads() -> int:
    """Threads that decode and tile images: the cores this process may use, at most 4 (the model call
    needs cores too, and the C++ tiling already threads over a request's images)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


@dataclass
class ServeConfig:
    """Limits and switches of one server. Sizes are in bytes, queue and batch sizes in items.

    model_name: the name clients pass as `model` (and /v1/models lists). api_key: when set, /v1/* needs
    `Authorization: Bearer <api_key>`. Two bounds keep memory flat under overload, each answering 503 when
    reached: max_queue, on the items admitted and not yet answered (queued, being prepared or in a model
    call: what holds decoded pixels), and max_inflight_bytes, on the request bodies held at once.
    batching=False plans each request on its own (one model call per request of one item): the baseline
    the cross-request batcher is compared with.
    """

    model_name: str = "vlm2vec"
    api_key: str | None = None
    max_batch_size: int = 32
    max_batch_tokens: int = DEFAULT_MAX_TOKENS
    max_queue: int = 1024
    max_request_items: int = 256
    max_request_bytes: int = 32 * MIB
    max_inflight_bytes: int = 256 * MIB
    max_image_bytes: int = 16 * MIB
    batch_wait_ms: float = 0.0
    batching: bool = True
    allow_url_fetch: bool = False
    url_fetch_timeout: float = 10.0
    prep_threads: int = 0  # 0: default_prep_threads()

    def __post_init__(self) -> None:
        positive = {
            "max_batch_size": self.max_batch_size,
            "max_batch_tokens": self.max_batch_tokens,
            "max_queue": self.max_queue,
            "max_request_items": self.max_request_items,
            "max_request_bytes": self.max_request_bytes,
            "max_inflight_bytes": self.max_inflight_bytes,
            "max_image_bytes": self.max_image_bytes,
        }
        for name, value in positive.items():
            if int(value) < 1:
                raise InputError(f"{name} must be >= 1, got {value}")
        if self.max_request_items > self.max_queue:
            # a request is admitted whole or not at all: a larger one could never get in
            raise InputError(
                f"max_request_items ({self.max_request_items}) must not exceed max_queue ({self.max_queue})"
            )
        if self.max_request_bytes > self.max_inflight_bytes:
            raise InputError(
                f"max_request_bytes ({self.max_request_bytes}) must not exceed max_inflight_bytes "
                f"({self.max_inflight_bytes})"
            )
        if self.batch_wait_ms < 0:
            raise InputError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if self.url_fetch_timeout <= 0:
            raise InputError(f"url_fetch_timeout must be > 0, got {self.url_fetch_timeout}")
        if self.prep_threads < 0:
            raise InputError(f"prep_threads must be >= 0, got {self.prep_threads}")
        if self.api_key is not None and not self.api_key.strip():
            raise InputError("api_key must not be empty")
        if not self.model_name:
            raise InputError("model_name must not be empty")
        if self.prep_threads == 0:
            self.prep_threads = default_prep_threads()
