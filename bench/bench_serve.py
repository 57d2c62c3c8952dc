"""`vlm2vec-rt serve` under concurrent load: the cross-request batcher against the same server with batching
off (one model call per request) and against `Engine.encode` in-process, on the same items, in one run.

    python bench/bench_serve.py [--out bench/results] [--quick]

Importable: main(out_dir=None, *, quick=False) -> dict.
The model is bench_engine's ~27M-parameter LLaVA-NeXT as an onnxruntime fp32 engine. Items: one third
image+text (random crops of real photos, sent as PNG data URIs), two thirds text with an instruction; every
request carries one item. Two servers run as subprocesses (`python -m vlm2vec_rt.serve`, batching on and
`--no-batching`) on 127.0.0.1; clients are asyncio tasks of this process (httpx), `concurrency` of them
each sending its next request as soon as its last is answered. Per concurrency level (1, 4, 16, 64) the
two servers are measured alternately (A B A B ...), items/s and the p50 / p99 of request latency, medians
over rounds. In-process baselines on the same items (PNG bytes, so both decode them): `Engine.encode` of
all items at batch 32 (items/s) and of one item at a time (latency). Every answer of both servers is
checked against `Engine.encode` (cosine) before anything is timed.
The clients share the machine's cores with the servers: on 2 cores that costs the servers some speed.
Last, a soak: 64 clients for 60 s on the batched server, every answer checked against its own item, the
server's resident memory sampled from /metrics each second.
Writes <out>/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import MODEL_SIZE, image_text_items, text_items  # noqa: E402
from common import write_results  # noqa: E402

NAME = "serve"
CONCURRENCY = (1, 4, 16, 64)
MODEL = "bench"


# ---- inputs ---------------------------------------------------------------------------------------------
def items_and_bodies(n: int, seed: int = 0) -> tuple[list, list[bytes]]:
    """n mixed items (image items' pixels as PNG bytes) and their one-item request bodies."""
    from PIL import Image

    from vlm2vec_rt import Item

    rng = np.random.default_rng(seed)
    n_image = n // 3
    raw = image_text_items(rng, n_image) + text_items(rng, n - n_image)
    order = rng.permutation(n)
    items, bodies = [], []
    for k in order:
        item = raw[int(k)]
        obj: dict[str, Any] = {"text": item.text, "instruction": item.instruction}
        image = None
        if item.image is not None:
            buf = io.BytesIO()
            Image.fromarray(item.image).save(buf, format="PNG")
            image = buf.getvalue()
            obj["image"] = "data:image/png;base64," + base64.b64encode(image).decode()
        items.append(Item(text=item.text, image=image, instruction=item.instruction))
        body = {"model": MODEL, "input": [obj], "encoding_format": "base64"}
        bodies.append(json.dumps(body).encode())
    return items, bodies


# ---- servers --------------------------------------------------------------------------------------------
class ServerProcess:
    """`python -m vlm2vec_rt.serve --engine DIR --port 0 EXTRA...`, its port read from its log."""

    def __init__(self, engine_dir: Path, *extra: str):
        cmd = [sys.executable, "-m", "vlm2vec_rt.serve", "--engine", str(engine_dir), "--port", "0"]
        cmd += ["--served-model-name", MODEL, "--max-queue", "4096", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 120
        self.port = None
        while self.port is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + "".join(self.lines[-20:]))
            found = [re.search(r"listening on http://127\.0\.0\.1:(\d+)", line) for line in self.lines]
            self.port = next((int(m.group(1)) for m in found if m), None)
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "POST /v1/embeddings" not in line:  # the per-request lines would grow without bound
                self.lines.append(line)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def _wait_ready(url: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
        for _ in range(1200):
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/health")).status_code == 200:
                    return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} never became healthy")


async def _metric(client: Any, name: str) -> float:
    text = (await client.get("/metrics")).text
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def load(url: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    """Send every body once from `concurrency` clients; -> wall time, per-request latencies, rows, batches."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False) as client:
        batches0 = await _metric(client, "vlm2vec_batch_size_count")
        rows: list[np.ndarray | None] = [None] * len(bodies)
        latencies: list[float] = []
        queue = iter(range(len(bodies)))
        headers = {"Content-Type": "application/json"}

        async def worker() -> None:
            for k in queue:
                t0 = time.perf_counter()
                r = await client.post("/v1/embeddings", content=bodies[k], headers=headers)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                rows[k] = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        batches = await _metric(client, "vlm2vec_batch_size_count") - batches0
    return {"wall_s": wall, "latencies": latencies, "rows": np.stack(rows), "model_calls": batches}


async def soak(url: str, bodies: list[bytes], want: np.ndarray, concurrency: int, seconds: float) -> dict:
    """`concurrency` clients send requests for `seconds`; every answer is checked against its own items'
    rows (`want`), and the server's resident memory is read from /metrics once a second."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False) as client:
        deadline = time.perf_counter() + seconds
        counts = {"requests": 0, "mismatched": 0, "failed": 0}
        memory: list[float] = []
        headers = {"Content-Type": "application/json"}

        async def worker(offset: int) -> None:
            k = offset
            while time.perf_counter() < deadline:
                k = (k + 1) % len(bodies)
                r = await client.post("/v1/embeddings", content=bodies[k], headers=headers)
                counts["requests"] += 1
                if r.status_code != 200:
                    counts["failed"] += 1
                    continue
                row = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4")
                if float(row @ want[k]) < 0.9999:
                    counts["mismatched"] += 1

        async def sampler() -> None:
            while time.perf_counter() < deadline:
                memory.append(await _metric(client, "process_resident_memory_bytes") / 2**20)
                await asyncio.sleep(1.0)

        await asyncio.gather(sampler(), *(worker(i * len(bodies) // concurrency) for i in range(concurrency)))
    quarter = max(1, len(memory) // 4)
    return {
        "seconds": seconds,
        "concurrency": concurrency,
        **counts,
        "rss_mib_first_quarter_median": float(np.median(memory[:quarter])),
        "rss_mib_last_quarter_median": float(np.median(memory[-quarter:])),
        "rss_mib_max": float(max(memory)),
    }


def in_process(engine: Any, items: list, concurrency: int) -> dict[str, Any]:
    """Engine.encode on the same items in this process: one item a call at concurrency 1, else all at once."""
    latencies = []
    start = time.perf_counter()
    if concurrency == 1:
        for item in items:
            t0 = time.perf_counter()
            engine.encode([item])
            latencies.append(time.perf_counter() - t0)
    else:
        engine.encode(items, batch_size=32)
        latencies.append(time.perf_counter() - start)  # every item waits for the whole call
    return {"wall_s": time.perf_counter() - start, "latencies": latencies, "model_calls": 0}


def summarise(runs: list[dict], n_items: int) -> dict[str, float]:
    """Medians over rounds of items/s, p50 and p99 latency, and items per model call."""
    return {
        "items_per_s": float(np.median([n_items / r["wall_s"] for r in runs])),
        "p50_ms": float(np.median([np.percentile(r["latencies"], 50) * 1e3 for r in runs])),
        "p99_ms": float(np.median([np.percentile(r["latencies"], 99) * 1e3 for r in runs])),
        "items_per_model_call": float(
            np.median([n_items / r["model_calls"] if r["model_calls"] else 0 for r in runs])
        ),
    }


def compare(results: dict[str, dict], levels: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per level: batched items/s over unbatched and over in-process; at concurrency 1 (one item a call
    everywhere) also the batched server's p50 latency minus in-process encode's."""
    out = {}
    for c in levels:
        b, u, p = (results[name][str(c)] for name in ("batched", "unbatched", "in_process"))
        out[str(c)] = {
            "batched_over_unbatched": b["items_per_s"] / u["items_per_s"],
            "batched_over_in_process": b["items_per_s"] / p["items_per_s"],
        }
        if c == 1:
            out[str(c)]["batched_p50_minus_in_process_p50_ms"] = b["p50_ms"] - p["p50_ms"]
    return out


# ---- the benchmark ------------------------------------------------------------------------------------------
def main(out_dir: str | os.PathLike | None = None, *, quick: bool = False) -> dict:
    from vlm2vec_rt import Engine, build_engine
    from vlm2vec_rt.models.tiny import make_tiny_model

    n_items = 48 if quick else 192
    rounds = 2 if quick else 3
    levels = (1, 4, 16) if quick else CONCURRENCY
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        model_dir = make_tiny_model(work / "model", "llava_next", **MODEL_SIZE)
        engine_dir = build_engine(
            model_dir, work / "engine", precision="fp32", backend="onnxruntime", device="cpu"
        )
        items, bodies = items_and_bodies(n_items)
        engine = Engine.load(engine_dir)
        want = engine.encode(items, batch_size=32)

        servers = {
            "batched": ServerProcess(engine_dir),
            "unbatched": ServerProcess(engine_dir, "--no-batching"),
        }
        try:
            for s in servers.values():
                asyncio.run(_wait_ready(s.url))
            # correctness first: every answer of both servers against Engine.encode
            min_cos = {}
            for name, s in servers.items():
                got = asyncio.run(load(s.url, bodies, 8))["rows"]
                min_cos[name] = float((got * want).sum(1).min())
                if min_cos[name] < 0.9999:
                    raise RuntimeError(
                        f"{name} server answers differ from Engine.encode: min cosine {min_cos[name]}"
                    )
            results: dict[str, dict] = {name: {} for name in (*servers, "in_process")}
            for c in levels:
                runs: dict[str, list] = {name: [] for name in results}
                for _ in range(rounds):
                    # the in-process baseline takes its turn among the servers, so drift and other load on
                    # the machine hit all three alike: at concurrency 1 one item a call (latency), else all
                    # items in one encode at batch 32 (throughput)
                    runs["in_process"].append(in_process(engine, items, c))
                    for name, s in servers.items():
                        runs[name].append(asyncio.run(load(s.url, bodies, c)))
                for name, rs in runs.items():
                    results[name][str(c)] = summarise(rs, len(bodies))
                line = ", ".join(
                    f"{name} {results[name][str(c)]['items_per_s']:.1f} items/s (p50 {results[name][str(c)]['p50_ms']:.1f} ms)"
                    for name in results
                )
                print(f"concurrency {c:3d}: {line}", flush=True)
            soaked = asyncio.run(soak(servers["batched"].url, bodies, want, 64, 10.0 if quick else 60.0))
            print(f"soak: {soaked}", flush=True)
        finally:
            exit_codes = {name: s.stop() for name, s in servers.items()}
            engine.close()

    ratios = compare(results, levels)
    report = {
        "model": {"backbone": "llava_next", **MODEL_SIZE, "engine": "onnxruntime fp32"},
        "items": {
            "total": n_items,
            "image_text": n_items // 3,
            "text": n_items - n_items // 3,
            "per_request": 1,
        },
        "rounds": rounds,
        "min_cosine_to_encode": min_cos,
        "results": results,
        "ratios": ratios,
        "soak_batched": soaked,
        "server_exit_codes": exit_codes,
        "targets": {
            "c16_batched_over_unbatched": ">= 2.0",
            "c16_batched_over_in_process": ">= 0.8",
            "c1_batched_p50_minus_in_process_p50_ms": "<= 3.0",
        },
    }
    path = write_results(NAME, report, out_dir)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="results folder (default: bench/results)")
    parser.add_argument("--quick", action="store_true", help="fewer items, rounds and levels")
    args = parser.parse_args()
    main(args.out, quick=args.quick)
