"""`vlm2vec-rt serve`: its flags (`add_serve_parser`) and the command (`cmd_serve`).

uvicorn runs the app on a socket bound here (so a taken port is one clear error before the model loads,
and `--port 0` picks a free one). SIGTERM and Ctrl-C stop accepting connections, let the requests in
flight finish (at most --drain-timeout seconds), stop the batcher, and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..preprocess.images import DEFAULT_MAX_PIXELS
from ..profiles import PROFILES
from .config import MIB, ServeConfig

log = logging.getLogger("vlm2vec_rt.serve")

API_KEY_ENV = "VLM2VEC_API_KEY"
DEFAULTS = ServeConfig()


def add_serve_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the `serve` subcommand (every flag; `func` set to cmd_serve) to an argparse subparsers object."""
    p = subparsers.add_parser(
        "serve",
        parents=parents,
        help="OpenAI-compatible embeddings server (text and images, cross-request batching)",
        description="Serve POST /v1/embeddings (OpenAI-compatible; strings, items with images, chat-style "
        "messages), GET /health, /v1/models and /metrics. Binds to 127.0.0.1 unless --host says otherwise.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--engine", metavar="DIR", help="an engine directory built by `vlm2vec-rt build`")
    src.add_argument("--model", metavar="DIR", help="a model directory (eager PyTorch)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument(
        "--served-model-name", metavar="NAME", help="the `model` clients name (default: the directory's name)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else no key)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="eager dtype (--model)"
    )
    p.add_argument(
        "--image-resolution",
        choices=["high"],
        default=None,
        help="high: resize images to 1344x1344 first (VLM2Vec's high-resolution setting)",
    )
    p.add_argument(
        "--profile",
        choices=PROFILES,
        default=None,
        help="input recipe: vlm2vec (default), vlm2vec-v2 or native; an engine must have been built with it",
    )
    g = p.add_argument_group("batching")
    g.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULTS.max_batch_tokens,
        metavar="N",
        help=f"padded tokens per model call (default: {DEFAULTS.max_batch_tokens})",
    )
    g.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULTS.max_batch_size,
        metavar="N",
        help=f"items per model call (default: {DEFAULTS.max_batch_size})",
    )
    g.add_argument(
        "--batch-wait-ms",
        type=float,
        default=DEFAULTS.batch_wait_ms,
        metavar="MS",
        help="hold a batch that is not full up to MS for more requests (default: 0, never wait)",
    )
    g.add_argument(
        "--no-batching",
        action="store_true",
        help="plan each request on its own, never sharing a model call (for comparisons)",
    )
    g.add_argument(
        "--prep-threads",
        type=int,
        default=0,
        metavar="N",
        help="threads decoding and tiling images (default: the cores, at most 4)",
    )
    lim = p.add_argument_group("limits")
    lim.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULTS.max_queue,
        metavar="N",
        help=f"items admitted at once; beyond it 503 + Retry-After (default: {DEFAULTS.max_queue})",
    )
    lim.add_argument(
        "--max-request-items",
        type=int,
        default=DEFAULTS.max_request_items,
        metavar="N",
        help=f"items per request (default: {DEFAULTS.max_request_items})",
    )
    lim.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULTS.max_request_bytes,
        metavar="N",
        help=f"request body size (default: {DEFAULTS.max_request_bytes // MIB} MiB)",
    )
    lim.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=DEFAULTS.max_inflight_bytes,
        metavar="N",
        help="request bodies held at once; beyond it 503 + Retry-After "
        f"(default: {DEFAULTS.max_inflight_bytes // MIB} MiB)",
    )
    lim.add_argument(
        "--max-image-bytes",
        type=int,
        default=DEFAULTS.max_image_bytes,
        metavar="N",
        help=f"encoded size of one image (default: {DEFAULTS.max_image_bytes // MIB} MiB)",
    )
    lim.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"decoded size of one image, checked before decoding (default: {DEFAULT_MAX_PIXELS})",
    )
    lim.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        metavar="N",
        help="open connections at once; beyond it uvicorn answers 503 (default: 1024)",
    )
    lim.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, wait at most S seconds for requests in flight (default: 30)",
    )
    url = p.add_argument_group("remote images")
    url.add_argument(
        "--allow-url-fetch",
        action="store_true",
        help="fetch http(s) image URLs (off by default: the server would reach any address a client names)",
    )
    url.add_argument(
        "--url-fetch-timeout",
        type=float,
        default=DEFAULTS.url_fetch_timeout,
        metavar="S",
        help=f"seconds per fetched image, all included (default: {DEFAULTS.url_fetch_timeout:g})",
    )
    p.set_defaults(func=cmd_serve)
    return p


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig the flags describe (InputError on a bad value)."""
    source = args.engine or args.model
    return ServeConfig(
        model_name=args.served_model_name or Path(source).resolve().name or "vlm2vec",
        api_key=args.api_key or None,
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        max_queue=args.max_queue,
        max_request_items=args.max_request_items,
        max_request_bytes=args.max_request_bytes,
        max_inflight_bytes=args.max_inflight_bytes,
        max_image_bytes=args.max_image_bytes,
        batch_wait_ms=args.batch_wait_ms,
        batching=not args.no_batching,
        allow_url_fetch=args.allow_url_fetch,
        url_fetch_timeout=args.url_fetch_timeout,
        prep_threads=args.prep_threads,
    )


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not listening yet: uvicorn listens once the app has started)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InputError(f"cannot resolve --host {host!r}: {e}") from None
    family, kind, proto, _, address = infos[0]
    # proto must say TCP: asyncio turns Nagle off only on sockets that do, and with Nagle on, an answer's
    # head and body (two writes) wait out the client's delayed ACK, 40 ms a request
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM / Ctrl-C; 0 after a clean drain."""
    import uvicorn

    from ..cli import load_encoder
    from .app import create_app

    if args.max_connections < 1:
        raise InputError(f"--max-connections must be >= 1, got {args.max_connections}")
    if args.drain_timeout < 0:
        raise InputError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    config = config_from_args(args)
    sock = bind(args.host, args.port)
    try:
        encoder = load_encoder(args)  # the CLI's: --model/--engine, device, dtype, resolution, profile
        app = create_app(encoder, config)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_config=None,  # our logging setup (the CLI's) applies; uvicorn's loggers propagate to it
                access_log=False,  # the app logs one line per request itself, with items and tokens
                lifespan="on",
                limit_concurrency=args.max_connections,
                timeout_graceful_shutdown=args.drain_timeout,
                server_header=False,
            )
        )
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        log.info("listening on http://%s:%d (model %r)", shown, port, config.model_name)
        with _signals_end_quietly():
            server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


class _signals_end_quietly:
    """uvicorn drains on SIGTERM/SIGINT, then raises the signal again for the handler that was there
    before; with this one in place that second delivery is a no-op and the command returns 0."""

    def __enter__(self) -> None:
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, lambda *_: None)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
