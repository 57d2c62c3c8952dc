"""The ASGI app: OpenAI-compatible `POST /v1/embeddings` (text, images, chat-style messages) over the
cross-request batcher, plus `GET /health`, `/v1/models`, `/metrics`.

    body (size-capped) --pydantic--> EmbeddingRequest --checks--> raw items --admit (bounded queue)-->
    [fetch remote images] --prepare (threads)--> batcher (shared model calls) --> dimensions --> JSON

A request whose client disconnects is cancelled wherever it is: its queued items leave the queue and its
room in the queue is given back. One log line and one set of metrics per request (`_AccessLog`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import EngineError, InputError
from .batcher import Batcher, Overloaded, encoder_device, model_step
from .config import ServeConfig
from .errors import APIError
from .inputs import RawItem, error_param, fetch_remote_images, parse_request, prepare_items, request_items
from .metrics import Metrics
from .schemas import EmbeddingResponse, ErrorResponse, ModelList

log = logging.getLogger("vlm2vec_rt.serve")

# bodies above this are parsed, and responses above this many floats rendered, on a worker thread
_OFF_LOOP_BODY_BYTES = 256 << 10
_OFF_LOOP_FLOATS = 1 << 16
_INLINE_TEXT_CHARS = 2048  # requests with no image and at most this much text are tokenised on the loop
ENDPOINTS = ("/v1/embeddings", "/v1/models", "/health", "/metrics")
STATUS_CLIENT_GONE = 499  # nginx's "client closed request": logged and counted, never sent


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Server:
    """What the routes share: the encoder, its batcher, the limits, the metrics, the URL-fetch client."""

    def __init__(self, encoder: Any, config: ServeConfig, metrics: Metrics | None = None):
        self.encoder = encoder
        self.config = config
        self.metrics = metrics or Metrics()
        self.dim = int(encoder.dim)
        max_batch = min(config.max_batch_size, int(getattr(encoder, "max_batch", config.max_batch_size)))
        self.batcher = Batcher(
            encoder.pre,
            model_step(encoder),
            dim=self.dim,
            device=encoder_device(encoder),
            max_batch_size=max_batch,
            max_batch_tokens=config.max_batch_tokens,
            max_queue=config.max_queue,
            cross_request=config.batching,
            batch_wait_s=config.batch_wait_ms / 1000.0,
            prep_threads=config.prep_threads,
            metrics=self.metrics,
        )
        self.created = int(time.time())
        self.http: Any = None  # httpx.AsyncClient, only with allow_url_fetch
        self.draining = False
        self.inflight_bytes = 0

    @contextlib.contextmanager
    def holding_bytes(self, size: int) -> Iterator[None]:
        """Count a request body against max_inflight_bytes while the request lasts (503 when it would not fit)."""
        if self.inflight_bytes + size > self.config.max_inflight_bytes:
            raise _overloaded(
                f"the server holds {self.inflight_bytes} bytes of requests, and this one's {size} would pass "
                f"its limit of {self.config.max_inflight_bytes}; retry shortly"
            )
        self.inflight_bytes += size  # only the event loop's thread counts: no lock
        try:
            yield
        finally:
            self.inflight_bytes -= size

    async def start(self) -> None:
        """Start the batcher (and the URL-fetch client) in the serving event loop."""
        await self.batcher.start()
        if self.config.allow_url_fetch:
            import httpx

            self.http = httpx.AsyncClient(
                timeout=self.config.url_fetch_timeout, follow_redirects=True, max_redirects=3
            )

    async def stop(self) -> None:
        """Stop after uvicorn's drain: nothing is in flight any more."""
        self.draining = True
        if self.http is not None:
            await self.http.aclose()
        await self.batcher.aclose()

    async def embed(self, items: list[RawItem]) -> tuple[np.ndarray, int]:
        """Rows [len(items), dim] in the items' order and the request's token count."""
        try:
            ticket = self.batcher.admit(len(items))
        except Overloaded as e:
            raise _overloaded(str(e), e.retry_after) from None
        with ticket:
            if self.http is not None:
                await fetch_remote_images(items, self.http, self.config)
            pre = self.encoder.pre
            try:
                if _short_text_only(items):
                    # tokenising a few short strings takes microseconds: a thread hop would cost more
                    prepared = prepare_items(pre, items)
                else:
                    prepared = await self.batcher.prepare(ticket, lambda: prepare_items(pre, items))
            except InputError as e:
                raise APIError(400, str(e), param=error_param(str(e)), code="invalid_input") from None
            rows = await self.batcher.embed(prepared)
        return rows, sum(len(ids) for ids, _ in prepared)


# ---- helpers -------------------------------------------------------------------------------------------
def _short_text_only(items: list[RawItem]) -> bool:
    """No image and little text: preparing it on the event loop costs less than handing it to a thread."""
    if any(raw.has_image for raw in items):
        return False
    return sum(len(raw.text or "") + len(raw.instruction or "") for raw in items) <= _INLINE_TEXT_CHARS


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _body_too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _body_too_large(len(body), limit)
    return bytes(body)


def _overloaded(message: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, code="overloaded", headers={"Retry-After": str(retry_after)})


def _body_too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body has {size} bytes or more, over this server's limit of {limit}",
        param="body",
        code="request_too_large",
    )


async def _unless_disconnected(request: Request, work: asyncio.Future) -> Any:
    """Await `work`, cancelling it (and raising _ClientGone) if the client disconnects first."""

    async def disconnected() -> None:
        # the body is read: the next message the server sends is the disconnect (or, after the answer, none)
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    raise _ClientGone


def _normalised_prefix(rows: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka-style: the first `dimensions` components, re-normalised to unit length."""
    if dimensions is None or dimensions == rows.shape[1]:
        return rows
    head = rows[:, :dimensions]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return (head / np.maximum(norms, 1e-12)).astype(np.float32)


def _render(rows: np.ndarray, encoding: str, model: str, tokens: int) -> bytes:
    if encoding == "base64":
        vectors: list[Any] = [base64.b64encode(r.astype("<f4").tobytes()).decode("ascii") for r in rows]
    else:
        vectors = rows.tolist()
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _AccessLog:
    """One log line and the request metrics per HTTP request (a plain ASGI middleware: it sees the status
    of every answer, errors and unknown paths included, and leaves the receive channel alone)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless an answer starts
        info: dict[str, Any] = scope.setdefault("vlm2vec", {})

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            seconds = time.perf_counter() - start
            path = scope.get("path", "")
            endpoint = (
                path
                if path in ENDPOINTS
                else "/v1/models/{id}"
                if path.startswith("/v1/models/")
                else "other"
            )
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(seconds)
            client = scope.get("client") or ("-", 0)
            extra = "".join(f" {k}={v}" for k, v in info.items())
            log.info(
                '%s "%s %s" %d%s %.1fms',
                client[0],
                scope.get("method", "-"),
                path,
                status,
                extra,
                seconds * 1e3,
            )


# ---- the app -------------------------------------------------------------------------------------------
def create_app(encoder: Any, config: ServeConfig | None = None, *, metrics: Metrics | None = None) -> FastAPI:
    """The ASGI app serving `encoder` (an Engine or an Embedder: `.pre`, `.dim`, and `.run_batch` or
    `.backbone`). Run it with uvicorn (`vlm2vec-rt serve` does); the batcher starts with the app's
    lifespan and stops after uvicorn has drained the requests in flight."""
    config = config or ServeConfig()
    server = Server(encoder, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await server.start()
        log.info(
            "serving model %r (dim %d, max batch %d items / %d tokens, queue %d items)",
            config.model_name,
            server.dim,
            server.batcher.max_batch_size,
            config.max_batch_tokens,
            config.max_queue,
        )
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(
        title="vlm2vec-rt",
        summary="OpenAI-compatible multimodal embeddings (VLM2Vec)",
        lifespan=lifespan,
        responses={"default": {"model": ErrorResponse}},
    )
    app.state.server = server
    app.add_middleware(_AccessLog, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(e.status_code, str(e.detail), headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, str(e.errors()[0].get("msg", e)), code="invalid_value"))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return _error_response(
            APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")
        )

    bearer = HTTPBearer(auto_error=False)
    expected = None if config.api_key is None else config.api_key.encode()

    async def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        # async: FastAPI would run a plain function on a thread, a hop per request
        if expected is None:
            return
        given = b"" if credentials is None else credentials.credentials.encode()
        # constant time: how much of a guess matched must not show in the answer's timing
        if not hmac.compare_digest(given, expected):
            raise APIError(
                401,
                "missing or wrong API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.post(
        "/v1/embeddings",
        dependencies=[Depends(authorised)],
        response_model=EmbeddingResponse,
    )
    async def embeddings(request: Request) -> Response:
        """Embed strings, multimodal items or one chat-style message list (OpenAI's embeddings API)."""
        if server.batcher.full:  # before reading a body that could not be queued anyway
            raise _overloaded("the server is at capacity; retry shortly")
        declared = request.headers.get("content-length")
        # a body of unknown length (chunked) may grow to the limit: it holds that much room
        size = int(declared) if declared is not None and declared.isdigit() else config.max_request_bytes
        if size > config.max_request_bytes:
            raise _body_too_large(size, config.max_request_bytes)
        with server.holding_bytes(size):
            return await answer(request)

    async def answer(request: Request) -> Response:
        try:
            body = await _read_body(request, config.max_request_bytes)
        except ClientDisconnect:
            return Response(status_code=STATUS_CLIENT_GONE)
        if len(body) > _OFF_LOOP_BODY_BYTES:
            req = await asyncio.to_thread(parse_request, body)
        else:
            req = parse_request(body)
        if req.model is not None and req.model != config.model_name:
            raise APIError(
                404,
                f"the model {req.model!r} does not exist here; this server serves {config.model_name!r}",
                param="model",
                code="model_not_found",
            )
        if req.dimensions is not None and not 1 <= req.dimensions <= server.dim:
            raise APIError(
                400,
                f"dimensions must be between 1 and the model's {server.dim}, got {req.dimensions}",
                param="dimensions",
                code="invalid_value",
            )
        items = request_items(req, config)
        info = request.scope.setdefault("vlm2vec", {})
        info["items"] = len(items)
        try:
            rows, tokens = await _unless_disconnected(request, asyncio.ensure_future(server.embed(items)))
        except _ClientGone:
            info["disconnected"] = 1
            return Response(status_code=STATUS_CLIENT_GONE)
        except APIError:
            raise
        except EngineError as e:
            raise APIError(500, f"model error: {e}", code="model_error") from None
        except Exception as e:  # a failing model call: answer in the API's error shape, keep the trace
            log.exception("embedding failed")
            raise APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error") from None
        images = sum(1 for raw in items if raw.has_image)
        info.update(tokens=tokens, images=images)
        server.metrics.items.inc(len(items))
        server.metrics.tokens.inc(tokens)
        server.metrics.images.inc(images)
        rows = _normalised_prefix(rows, req.dimensions)
        if rows.size > _OFF_LOOP_FLOATS:
            payload = await asyncio.to_thread(_render, rows, req.encoding_format, config.model_name, tokens)
        else:
            payload = _render(rows, req.encoding_format, config.model_name, tokens)
        return Response(payload, media_type="application/json")

    def model_card() -> dict:
        return {
            "id": config.model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "vlm2vec-rt",
        }

    @app.get("/v1/models", dependencies=[Depends(authorised)], response_model=ModelList)
    async def models() -> dict:
        """The one model this server serves."""
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorised)])
    async def model(model_id: str) -> dict:
        if model_id != config.model_name:
            raise APIError(
                404, f"the model {model_id!r} does not exist here", param="model", code="model_not_found"
            )
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while serving (503 while shutting down), with the model and the queue's depth."""
        body = {
            "status": "draining" if server.draining else "ok",
            "model": config.model_name,
            "dim": server.dim,
            "queue_depth": server.batcher.depth,
            "max_queue": config.max_queue,
        }
        return JSONResponse(body, status_code=503 if server.draining else 200)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        """Prometheus text exposition."""
        payload, content_type = server.metrics.render()
        return Response(payload, media_type=content_type)

    return app
