"""`vlm2vec-rt serve`: live servers on 127.0.0.1 (uvicorn in a thread, one engine built per module) answer
as `Engine.encode` does, through the openai client and plain HTTP; every refusal names its field; the
batcher shares model calls between requests, keeps each request's rows in order, refuses work beyond its
queue (503) without dropping what it took, and drops a disconnected client's work; a real `serve`
process drains on SIGTERM and exits 0.

Model calls that must be caught mid-flight are held by a gate (`GatedEncoder`), never by timing.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.server
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from vlm2vec_rt import Embedder, Engine, EngineError, InputError, Item, build_engine
from vlm2vec_rt.cli import load_encoder
from vlm2vec_rt.serve import ServeConfig, create_app
from vlm2vec_rt.serve.cli import add_serve_parser, bind, config_from_args

MODEL = "tiny-llava"
DEADLINE_S = 30.0  # every wait in this file gives up after this long


# ---- fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_dir(tiny_llava, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "engine"
    return build_engine(tiny_llava, out, precision="fp32", backend="onnxruntime", device="cpu")


@pytest.fixture(scope="module")
def engine(engine_dir) -> Engine:
    return Engine.load(engine_dir)


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a thread of this process."""

    def __init__(self, app) -> None:
        self.app = app
        self.sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + DEADLINE_S
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        self.client = httpx.Client(base_url=self.url, timeout=DEADLINE_S, trust_env=False)

    def post(self, body, **kwargs) -> httpx.Response:
        return self.client.post("/v1/embeddings", json=body, **kwargs)

    def depth(self) -> int:
        return self.client.get("/health").json()["queue_depth"]

    def wait_depth(self, n: int) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while self.depth() != n:
            assert time.monotonic() < deadline, f"queue depth never reached {n} (is {self.depth()})"
            time.sleep(0.01)

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics (0 when absent)."""
        for family in text_string_to_metric_families(self.client.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def wait_metric(self, value: float, name: str, **labels: str) -> None:
        """Wait for a metric to reach `value`: a request is counted once its answer is sent, so possibly
        just after the client has it."""
        deadline = time.monotonic() + DEADLINE_S
        while self.metric(name, **labels) != value:
            assert time.monotonic() < deadline, (
                f"{name} {labels} is {self.metric(name, **labels)}, not {value}"
            )
            time.sleep(0.01)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(DEADLINE_S)
        self.sock.close()


@contextlib.contextmanager
def serving(encoder, **config) -> Iterator[LiveServer]:
    server = LiveServer(create_app(encoder, ServeConfig(model_name=MODEL, **config)))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def live(engine) -> Iterator[LiveServer]:
    with serving(engine, max_request_items=8, max_image_bytes=200_000, max_request_bytes=400_000) as s:
        yield s


class GatedEncoder:
    """The engine, but each model call first waits for `gate` (open by default) and records its batch size."""

    def __init__(self, engine: Engine):
        self.engine, self.pre, self.dim, self.device = engine, engine.pre, engine.dim, "cpu"
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a call is in progress (or done)
        self.calls: list[int] = []

    def run_batch(self, batch):
        self.entered.set()
        assert self.gate.wait(DEADLINE_S)
        self.calls.append(batch.input_ids.shape[0])
        return self.engine.run_batch(batch)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def images(photos) -> dict[str, bytes]:
    """Small PNG crops of real photos, odd sizes."""
    return {
        "cat": png(photos["chelsea"][40:101, 100:187]),
        "coffee": png(photos["coffee"][::6, ::6]),
        "rocket": png(photos["rocket"][100:153, 200:231]),
    }


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return np.array([d["embedding"] for d in data], dtype=np.float32)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99999, cos
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def tokens_of(engine: Engine, items: list) -> int:
    return sum(
        len(ids)
        for ids, _ in engine.pre.prepare_many([Item(text=i) if isinstance(i, str) else i for i in items])
    )


# ---- OpenAI compatibility ------------------------------------------------------------------------------
def test_openai_client_returns_engine_encode(live, engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    texts = ["a dog running on the beach", "a cup of coffee", "the moon over a quiet river at night"]
    want = engine.encode(texts)

    one = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    assert_same(np.array([one.data[0].embedding], dtype=np.float32), want[:1])
    assert one.model == MODEL and one.usage.prompt_tokens == one.usage.total_tokens == tokens_of(
        engine, texts[:1]
    )

    listed = client.embeddings.create(model=MODEL, input=texts)  # the client's default: base64, decoded
    assert_same(np.array([d.embedding for d in listed.data], dtype=np.float32), want)
    assert listed.usage.prompt_tokens == tokens_of(engine, texts)

    head = want[:, :16] / np.linalg.norm(want[:, :16], axis=1, keepdims=True)
    short = client.embeddings.create(model=MODEL, input=texts, dimensions=16, encoding_format="float")
    assert_same(np.array([d.embedding for d in short.data], dtype=np.float32), head)
    short = client.embeddings.create(model=MODEL, input=texts, dimensions=16, encoding_format="base64")
    # asked for explicitly, base64 comes back as it is: little-endian float32
    assert_same(np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in short.data]), head)

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.BadRequestError, match="token-id input is not supported"):
        client.embeddings.create(model=MODEL, input=[[1, 2, 3]])
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=MODEL, input="x", dimensions=engine.dim + 1)
    assert [m.id for m in client.models.list()] == [MODEL]


def test_base64_is_little_endian_float32(live, engine):
    got = live.post({"input": ["a red street", "a tower"], "encoding_format": "base64"}).json()
    rows = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in got["data"]])
    assert_same(rows, engine.encode(["a red street", "a tower"]))


def test_multimodal_items_match_encode(live, engine, images):
    instruction = "Represent the given image with the following question: "
    body = {
        "model": MODEL,
        "input": [
            "plain text is a text item",
            {"image": data_uri(images["cat"])},
            {"text": "what is in the cup?", "image": data_uri(images["coffee"]), "instruction": instruction},
            {
                "text": "a rocket on its pad",
                "instruction": "Find me an everyday image that matches the caption: ",
            },
            {"image": data_uri(images["rocket"], "image/webp")},  # the declared type is a hint; bytes decide
        ],
    }
    items = [
        Item(text="plain text is a text item"),
        Item(image=images["cat"]),
        Item(text="what is in the cup?", image=images["coffee"], instruction=instruction),
        Item(text="a rocket on its pad", instruction="Find me an everyday image that matches the caption: "),
        Item(image=images["rocket"]),
    ]
    response = live.post(body)
    want = engine.encode(items)
    assert_same(vectors(response), want)
    assert response.json()["usage"]["prompt_tokens"] == tokens_of(engine, items)

    # base64 wrapped in lines, as MIME encoders write it, is the same image
    wrapped = "\n".join(textwrap.wrap(base64.b64encode(images["cat"]).decode(), 76))
    assert_same(vectors(live.post({"input": [{"image": "data:image/png;base64," + wrapped}]})), want[1:2])

    # a top-level instruction is the default of items without their own
    got = vectors(
        live.post({"input": ["a cat", {"text": "a dog", "instruction": "B: "}], "instruction": "A: "})
    )
    assert_same(
        got, engine.encode([Item(text="a cat", instruction="A: "), Item(text="a dog", instruction="B: ")])
    )


def test_chat_messages_are_one_item(live, engine, images):
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Represent the given image."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(images["cat"])}},
                    {"type": "text", "text": "a cat"},
                    {"type": "text", "text": "looking left"},
                ],
            },
        ],
    }
    want = engine.encode(
        [Item(text="a cat\nlooking left", image=images["cat"], instruction="Represent the given image.")]
    )
    assert_same(vectors(live.post(body)), want)
    text_only = {"messages": [{"role": "user", "content": "just words"}]}
    assert_same(vectors(live.post(text_only)), engine.encode(["just words"]))


# ---- refusals ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def refusals(images) -> dict[str, tuple[object, int, str | None, str]]:
    """name -> (body, status, param, text in the message)."""
    cat = data_uri(images["cat"])
    two_images = [{"type": "image_url", "image_url": {"url": cat}}, {"type": "image_url", "image_url": cat}]
    return {
        "token ids": ({"input": [1, 2, 3]}, 400, "input[0]", "token-id input is not supported"),
        "token id lists": ({"input": [[1, 2], [3]]}, 400, "input[0]", "token-id input is not supported"),
        "one token id": ({"input": 7}, 400, "input", "token-id input is not supported"),
        "wrong model": ({"input": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
        "dimensions too large": ({"input": "x", "dimensions": 65}, 400, "dimensions", "between 1 and"),
        "dimensions zero": ({"input": "x", "dimensions": 0}, 400, "dimensions", "between 1 and"),
        "dimensions not an int": ({"input": "x", "dimensions": "8"}, 400, "dimensions", "valid integer"),
        "encoding format": (
            {"input": "x", "encoding_format": "hex"},
            400,
            "encoding_format",
            "'float' or 'base64'",
        ),
        "empty list": ({"input": []}, 400, "input", "empty list"),
        "empty string": ({"input": ["ok", "  "]}, 400, "input[1]", "empty string"),
        "neither input nor messages": ({"model": MODEL}, 400, "input", "exactly one of"),
        "both input and messages": (
            {"input": "x", "messages": [{"role": "user", "content": "y"}]},
            400,
            "input",
            "exactly one of",
        ),
        "unknown field": ({"input": "x", "dimension": 8}, 400, "dimension", "unknown field"),
        "unknown item field": ({"input": [{"txt": "x"}]}, 400, "input[0].txt", "unknown field"),
        "empty item": ({"input": [{"instruction": "  "}]}, 400, "input[0]", "neither text nor image"),
        "not an object": ([1, 2], 400, None, "must be a JSON object"),
        "not an image type": (
            {"input": [{"image": data_uri(b"hello", "text/plain")}]},
            400,
            "input[0].image",
            "not an image",
        ),
        "not base64-encoded": ({"input": [{"image": "data:image/png,abc"}]}, 400, "input[0].image", "base64"),
        "bad base64": (
            {"input": ["ok", {"image": "data:image/png;base64,AB$$"}]},
            400,
            "input[1].image",
            "not valid base64",
        ),
        "unreadable image": (
            {"input": ["ok", {"image": data_uri(b"\x89PNG broken")}]},
            400,
            "input[1]",
            "not a readable image",
        ),
        "not a URI": ({"input": [{"image": "/etc/passwd"}]}, 400, "input[0].image", "expected a data URI"),
        "remote URL": (
            {"input": [{"image": "http://127.0.0.1:9/a.png"}]},
            400,
            "input[0].image",
            "--allow-url-fetch",
        ),
        "remote URL in messages": (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}],
                    }
                ]
            },
            400,
            "messages[0].content[0].image_url.url",
            "--allow-url-fetch",
        ),
        "two images in messages": (
            {"messages": [{"role": "user", "content": two_images}]},
            400,
            "messages[0].content[1]",
            "one image per item",
        ),
        "bad message role": (
            {"messages": [{"role": "tool", "content": "x"}]},
            400,
            "messages[0].role",
            "'system' or 'user'",
        ),
        "too many items": ({"input": ["x"] * 9}, 413, "input", "limit of 8"),
        "image too large": (
            {"input": [{"image": data_uri(bytes(210_000))}]},
            413,
            "input[0].image",
            "limit of 200000",
        ),
    }


def test_every_refusal_names_its_field(live, refusals):
    for name, (body, status, param, text) in refusals.items():
        response = live.post(body)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (name, error)
        assert text in error["message"], (name, error)
        assert error["type"] == ("invalid_request_error" if status != 401 else "authentication_error")


def test_body_limits_and_malformed_json(live):
    big = live.client.post("/v1/embeddings", content=b'{"input": "' + b"x" * 500_000 + b'"}')
    assert big.status_code == 413 and big.json()["error"]["param"] == "body"

    def chunks():  # no Content-Length: the limit applies while the body streams in
        for _ in range(50):
            yield b" " * 10_000

    streamed = live.client.post("/v1/embeddings", content=chunks())
    assert streamed.status_code == 413 and "over this server's limit" in streamed.json()["error"]["message"]
    bad = live.client.post("/v1/embeddings", content=b'{"input": ')
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert live.client.get("/v1/nothing").json()["error"]["message"] == "Not Found"


def test_bad_item_fails_only_its_own_request(live, engine, images):
    good = [[f"request {k} item {j}" for j in range(k % 3 + 1)] for k in range(8)]
    bad = {"input": ["fine", {"image": data_uri(b"not an image at all")}]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(live.post, [{"input": g} for g in good[:4]] + [bad] + [{"input": g} for g in good[4:]])
        )
    assert answers[4].status_code == 400 and answers[4].json()["error"]["param"] == "input[1]"
    for texts, answer in zip(good, answers[:4] + answers[5:]):
        assert_same(vectors(answer), engine.encode(texts))
    assert live.depth() == 0


# ---- batching ------------------------------------------------------------------------------------------
def test_concurrent_requests_get_their_own_rows_in_order(live, engine, images, rng):
    words = [
        "a",
        "the",
        "red",
        "dog",
        "cat",
        "river",
        "tower",
        "moon",
        "cup",
        "street",
        "rocket",
        "photo",
        "of",
    ]
    pictures = list(images.values())
    requests: list[list] = []
    for _ in range(24):
        items = []
        for _ in range(int(rng.integers(1, 5))):
            text = " ".join(rng.choice(words, size=int(rng.integers(1, 25))))
            if rng.random() < 0.3:
                items.append((text, pictures[int(rng.integers(len(pictures)))]))
            else:
                items.append((text, None))
        requests.append(items)

    def body(items):
        return {"input": [t if im is None else {"text": t, "image": data_uri(im)} for t, im in items]}

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda items: live.post(body(items)), requests))
    for items, answer in zip(requests, answers):
        assert_same(vectors(answer), engine.encode([Item(text=t, image=im) for t, im in items]))


def test_items_of_concurrent_requests_share_a_model_call(engine):
    gated = GatedEncoder(engine)
    with serving(gated) as server, ThreadPoolExecutor(4) as pool:
        gated.gate.clear()
        first = pool.submit(server.post, {"input": "holds the model"})
        assert gated.entered.wait(DEADLINE_S)
        others = [pool.submit(server.post, {"input": [f"waiting request {k}"]}) for k in range(3)]
        server.wait_depth(4)
        gated.gate.set()
        assert_same(vectors(first.result()), engine.encode(["holds the model"]))
        for k, f in enumerate(others):
            assert_same(vectors(f.result()), engine.encode([f"waiting request {k}"]))
        assert gated.calls == [1, 3]  # the three queued requests ran as one batch
        assert server.metric("vlm2vec_batch_requests_sum") == 4
        assert server.metric("vlm2vec_batch_size_count") == 2


def test_batching_off_runs_each_request_alone(engine):
    gated = GatedEncoder(engine)
    with serving(gated, batching=False) as server, ThreadPoolExecutor(4) as pool:
        gated.gate.clear()
        first = pool.submit(server.post, {"input": "holds the model"})
        assert gated.entered.wait(DEADLINE_S)
        others = [pool.submit(server.post, {"input": [f"waiting request {k}", "two"]}) for k in range(3)]
        server.wait_depth(7)
        gated.gate.set()
        vectors(first.result())
        for k, f in enumerate(others):
            assert_same(vectors(f.result()), engine.encode([f"waiting request {k}", "two"]))
        assert gated.calls == [1, 2, 2, 2]
        assert (
            server.metric("vlm2vec_batch_requests_sum") == server.metric("vlm2vec_batch_requests_count") == 4
        )


def test_model_call_failing_on_one_request_fails_only_that_one(engine):
    poison, goods = "zebra zoo", ["good 0", "good 1"]  # of like lengths: the plan puts them in one batch
    good_ids = {t for text in goods for t in engine.pre.prepare(Item(text=text))[0]}
    marker = next(t for t in engine.pre.prepare(Item(text=poison))[0] if t not in good_ids)

    class Poisoned(GatedEncoder):
        """Its model step fails on any batch that holds the poison item."""

        def run_batch(self, batch):
            if (batch.input_ids == marker).any():
                self.calls.append(-batch.input_ids.shape[0])
                raise RuntimeError("the model broke on this batch")
            return super().run_batch(batch)

    gated = Poisoned(engine)
    with serving(gated) as server, ThreadPoolExecutor(4) as pool:
        gated.gate.clear()
        held = pool.submit(server.post, {"input": "holds the model"})
        assert gated.entered.wait(DEADLINE_S)
        good = [pool.submit(server.post, {"input": [text]}) for text in goods]
        server.wait_depth(3)
        bad = pool.submit(server.post, {"input": [poison]})
        server.wait_depth(4)
        gated.gate.set()
        vectors(held.result())
        for text, f in zip(goods, good):
            assert_same(vectors(f.result()), engine.encode([text]))
        failed = bad.result()
        assert failed.status_code == 500
        assert (
            failed.json()["error"]["message"] == "internal error: RuntimeError: the model broke on this batch"
        )
        # the shared batch failed, then each request's items ran on their own
        assert gated.calls[:2] == [1, -3] and sorted(gated.calls[2:]) == [-1, 1, 1]


def test_full_queue_answers_503_and_drops_nothing(engine):
    gated = GatedEncoder(engine)
    with serving(gated, max_queue=4, max_request_items=2) as server, ThreadPoolExecutor(4) as pool:
        gated.gate.clear()
        held = pool.submit(server.post, {"input": "a"})
        assert gated.entered.wait(DEADLINE_S)
        pair = pool.submit(server.post, {"input": ["b", "c"]})
        server.wait_depth(3)
        single = pool.submit(server.post, {"input": "d"})
        server.wait_depth(4)
        refused = server.post({"input": "e"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        assert server.client.get("/health").json()["queue_depth"] == 4
        gated.gate.set()
        assert_same(vectors(held.result()), engine.encode(["a"]))
        assert_same(vectors(pair.result()), engine.encode(["b", "c"]))
        assert_same(vectors(single.result()), engine.encode(["d"]))
        assert sum(gated.calls) == 4  # everything admitted ran, nothing else
        assert server.depth() == 0
        server.wait_metric(1, "vlm2vec_requests_total", endpoint="/v1/embeddings", status="503")
        assert_same(vectors(server.post({"input": "e"})), engine.encode(["e"]))  # room again


def test_request_bodies_held_at_once_are_bounded(engine):
    gated = GatedEncoder(engine)
    with (
        serving(gated, max_request_bytes=1500, max_inflight_bytes=2000) as server,
        ThreadPoolExecutor(2) as pool,
    ):
        gated.gate.clear()
        held = pool.submit(server.post, {"input": "a " * 300})  # a body of about 600 bytes
        assert gated.entered.wait(DEADLINE_S)
        refused = server.post({"input": "b " * 700})  # 1,400 more would pass 2,000
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "limit of 2000" in refused.json()["error"]["message"]
        small = pool.submit(server.post, {"input": "c " * 100})  # fits beside the held one
        server.wait_depth(2)
        gated.gate.set()
        assert_same(vectors(held.result()), engine.encode(["a " * 300]))
        assert_same(vectors(small.result()), engine.encode(["c " * 100]))
        assert_same(vectors(server.post({"input": "b " * 700})), engine.encode(["b " * 700]))  # room again


def test_disconnected_client_work_is_dropped(engine):
    gated = GatedEncoder(engine)
    with serving(gated) as server, ThreadPoolExecutor(2) as pool:
        gated.gate.clear()
        held = pool.submit(server.post, {"input": "holds the model"})
        assert gated.entered.wait(DEADLINE_S)
        body = json.dumps({"input": ["never", "run", "these"]}).encode()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            head = f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            sock.sendall(head.encode() + body)
            server.wait_depth(4)
        server.wait_depth(1)  # the client went away: its three items left the queue
        gated.gate.set()
        assert_same(vectors(held.result()), engine.encode(["holds the model"]))
        assert gated.calls == [1]
        server.wait_metric(1, "vlm2vec_requests_total", endpoint="/v1/embeddings", status="499")


# ---- auth, health, models, metrics, logs ---------------------------------------------------------------
def test_api_key(engine):
    with serving(engine, api_key="s3cret") as server:
        assert server.post({"input": "x"}).status_code == 401
        wrong = server.post({"input": "x"}, headers={"Authorization": "Bearer s3cre"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert wrong.json()["error"]["type"] == "authentication_error"
        assert server.client.get("/v1/models").status_code == 401
        right = server.post({"input": "x"}, headers={"Authorization": "Bearer s3cret"})
        assert_same(vectors(right), engine.encode(["x"]))
        assert server.client.get("/health").status_code == 200  # probes need no key
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert len(client.embeddings.create(model=MODEL, input=["a", "b"]).data) == 2
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_health_models_metrics_and_one_log_line_per_request(engine, images, caplog):
    with serving(engine) as server, caplog.at_level(logging.INFO, logger="vlm2vec_rt.serve"):
        health = server.client.get("/health").json()
        assert health == {
            "status": "ok",
            "model": MODEL,
            "dim": engine.dim,
            "queue_depth": 0,
            "max_queue": 1024,
        }
        models = server.client.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
        assert server.client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
        assert server.client.get("/v1/models/other").status_code == 404
        caplog.clear()
        ok = server.post({"input": ["one", {"text": "two", "image": data_uri(images["cat"])}]})
        tokens = ok.json()["usage"]["prompt_tokens"]
        server.post({"input": [1]})
        # a request's line is written once its answer is sent: it may come just after the client has it
        deadline = time.monotonic() + DEADLINE_S
        while len(lines := [r.getMessage() for r in caplog.records if "POST" in r.getMessage()]) < 2:
            assert time.monotonic() < deadline, lines
            time.sleep(0.01)
        time.sleep(0.1)
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name == "vlm2vec_rt.serve" and "POST" in r.getMessage()
        ]
        assert len(lines) == 2, lines
        assert re.search(rf'"POST /v1/embeddings" 200 items=2 tokens={tokens} images=1 [\d.]+ms$', lines[0])
        assert '"POST /v1/embeddings" 400' in lines[1]

        metrics = server.client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        assert server.metric("vlm2vec_requests_total", endpoint="/v1/embeddings", status="200") == 1
        assert server.metric("vlm2vec_requests_total", endpoint="/v1/embeddings", status="400") == 1
        assert server.metric("vlm2vec_request_duration_seconds_count", endpoint="/v1/embeddings") == 2
        assert server.metric("vlm2vec_items_total") == 2
        assert server.metric("vlm2vec_tokens_total") == tokens
        assert server.metric("vlm2vec_images_total") == 1
        assert server.metric("vlm2vec_batch_size_sum") == 2
        assert server.metric("vlm2vec_queue_depth") == 0
        assert server.metric("process_resident_memory_bytes") > 0


def test_embedder_is_served_too(tiny_llava):
    emb = Embedder.from_pretrained(tiny_llava)
    with serving(emb) as server:
        texts = ["an eager model", "served the same way", "third"]
        assert_same(vectors(server.post({"input": texts})), emb.encode(texts))


# ---- remote images -------------------------------------------------------------------------------------
@contextlib.contextmanager
def image_host(files: dict[str, bytes], slow: float) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1: /NAME serves files[NAME], /slow answers after `slow` seconds."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            name = self.path.strip("/")
            if name == "slow":
                stop.wait(slow)
            data = files.get(name)
            if data is None and name != "slow":
                self.send_error(404)
                return
            data = data or b""
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()


def test_url_fetch_when_allowed(engine, images):
    files = {"cat.png": images["cat"], "big.png": images["cat"] + bytes(100_000)}
    with (
        image_host(files, slow=5.0) as host,
        serving(engine, allow_url_fetch=True, url_fetch_timeout=0.5, max_image_bytes=60_000) as server,
    ):
        got = server.post({"input": [{"text": "a cat", "image": f"{host}/cat.png"}]})
        assert_same(vectors(got), engine.encode([Item(text="a cat", image=images["cat"])]))
        chat = {
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": f"{host}/cat.png"}]}]
        }
        assert_same(vectors(server.post(chat)), engine.encode([Item(image=images["cat"])]))
        for path, status, text in [
            ("big.png", 413, "over this server's image limit"),
            ("missing.png", 400, "HTTP 404"),
            ("slow", 400, "took over 0.5 s"),
        ]:
            response = server.post({"input": ["ok", {"image": f"{host}/{path}"}]})
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert text in error["message"] and error["param"] == "input[1].image"
        assert server.depth() == 0


# ---- command line --------------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true")
    parser = argparse.ArgumentParser(prog="vlm2vec-rt")
    add_serve_parser(parser.add_subparsers(dest="command", required=True), [common])
    return parser.parse_args(argv)


def test_cli_flags_and_config(engine_dir, monkeypatch):
    monkeypatch.delenv("VLM2VEC_API_KEY", raising=False)
    args = _parse(["serve", "--engine", str(engine_dir)])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    config = config_from_args(args)
    assert config.model_name == "engine" and config.batching and not config.allow_url_fetch
    args = _parse(
        ["serve", "--engine", str(engine_dir), "--served-model-name", "m", "--max-batch-tokens", "512",
         "--max-queue", "64", "--max-request-items", "8", "--max-image-bytes", "1000", "--no-batching",
         "--allow-url-fetch", "--api-key", "k", "--debug"]
    )  # fmt: skip
    config = config_from_args(args)
    assert vars(config) | {"prep_threads": 0} == vars(
        ServeConfig(
            model_name="m",
            max_batch_tokens=512,
            max_queue=64,
            max_request_items=8,
            max_image_bytes=1000,
            batching=False,
            allow_url_fetch=True,
            api_key="k",
        )
    ) | {"prep_threads": 0}
    monkeypatch.setenv("VLM2VEC_API_KEY", "from-env")
    assert _parse(["serve", "--model", "x"]).api_key == "from-env"
    with pytest.raises(InputError, match="must not exceed max_queue"):
        config_from_args(_parse(["serve", "--engine", "e", "--max-queue", "4", "--max-request-items", "8"]))
    with pytest.raises(InputError, match="must not exceed max_inflight_bytes"):
        config_from_args(
            _parse(["serve", "--engine", "e", "--max-request-bytes", "9", "--max-inflight-bytes", "8"])
        )
    with pytest.raises(InputError, match="max_batch_tokens must be >= 1"):
        config_from_args(_parse(["serve", "--engine", "e", "--max-batch-tokens", "0"]))
    with pytest.raises(SystemExit):
        _parse(["serve", "--engine", "e", "--model", "m"])
    with socket.create_server(("127.0.0.1", 0)) as taken, pytest.raises(InputError, match="cannot listen on"):
        bind("127.0.0.1", taken.getsockname()[1])
    loaded = load_encoder(_parse(["serve", "--engine", str(engine_dir)]))
    assert loaded.dim == 64
    built = loaded.manifest.get("profile")
    if built is not None:  # --profile goes to the loader: an engine takes only the profile it was built with
        assert load_encoder(_parse(["serve", "--engine", str(engine_dir), "--profile", built])).dim == 64
        other = next(p for p in ("vlm2vec", "vlm2vec-v2", "native") if p != built)
        with pytest.raises(EngineError, match="built under profile"):
            load_encoder(_parse(["serve", "--engine", str(engine_dir), "--profile", other]))


def test_serve_process_drains_on_sigterm_and_exits_0(engine_dir, engine):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "vlm2vec_rt.serve",
        "--engine",
        str(engine_dir),
        "--port",
        "0",
        "--served-model-name",
        MODEL,
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            found = [re.search(r"listening on http://127\.0\.0\.1:(\d+)", line) for line in lines]
            port = next((int(m.group(1)) for m in found if m), None)
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, timeout=DEADLINE_S, trust_env=False) as client:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/health").status_code == 200:
                        break
                assert time.monotonic() < deadline, "".join(lines)
                time.sleep(0.05)
            assert_same(
                vectors(client.post("/v1/embeddings", json={"input": "warm"})), engine.encode(["warm"])
            )

        # a request in flight when SIGTERM comes: its body is still arriving
        body = json.dumps({"model": MODEL, "input": ["in flight", "at shutdown"]}).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            sock.sendall(head.encode() + body[:10])
            time.sleep(0.5)  # the server has read the head and is waiting for the body
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            sock.sendall(body[10:])
            response = b""
            sock.settimeout(DEADLINE_S)
            while chunk := sock.recv(65536):
                response += chunk
        status_line, _, rest = response.partition(b"\r\n")
        assert b" 200 " in status_line, response[:300]
        answer = json.loads(rest.split(b"\r\n\r\n", 1)[1])
        got = np.array([d["embedding"] for d in answer["data"]], dtype=np.float32)
        assert_same(got, engine.encode(["in flight", "at shutdown"]))
        assert proc.wait(DEADLINE_S) == 0, "".join(lines)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
