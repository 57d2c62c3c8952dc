"""Training memory and speed: GradCache (chunk 4) against plain training, global batch 16 ... 1024.

Memory: each (mode, batch) runs one step in a fresh subprocess, so its peak is its own: the RSS high-water
mark (VmHWM, reset after loading and a warm-up step so it is the measured step's peak) and the working memory
above the RSS the process had before it (model loaded, inputs built). The parent polls every worker's RSS and
kills one that passes the memory limit (--memory-limit-gib): plain training stops there, larger plain batches
are not tried. Time: for every batch plain training fits, both modes run in one process, alternating, over
--repeats sets of inputs (photo crops + captions); the median of each and their ratio. Before anything is
measured, GradCache's gradients are checked against plain backward.

    python bench/bench_train.py [--out bench/results] [--batches 16,32,...,1024] [--quick]

Importable: main(out_dir, batches=..., quick=False, ...) -> dict. Writes <out>/train.json and <out>/train.png.
Targets (issue 4): GradCache peak memory within 1.3x of its batch-16 figure up to 1024; GradCache step
time at most 1.5x plain training's at equal batch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pyplot, save_plot, write_results  # noqa: E402

NAME = "train"
BATCHES = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_BATCHES = BATCHES
QUICK_BATCHES = (16, 64)
CHUNK = 4
MEMORY_LIMIT_GIB = 4.0
# A small Qwen2-VL: big enough that activations, not the interpreter, dominate a step's memory.
MODEL = dict(
    hidden_size=256, num_layers=4, num_heads=4, vision_hidden_size=64, vision_layers=2, image_size=224
)
MODES = ("gradcache", "plain")
TARGET_MEMORY_RATIO = 1.3
TARGET_TIME_RATIO = 1.5
T2I = "Find me an everyday image that matches the given caption: "
I2T = "Find an image caption describing the given everyday image."


# ---- inputs and steps (worker side) ---------------------------------------------------------------------
def make_inputs(batch: int, seed: int):
    """batch (query, target) pairs: photo crops of random size and position <-> their captions, both ways."""
    from vlm2vec_rt import Item
    from vlm2vec_rt.sample_images import SKIMAGE_PHOTOS, photos

    rng = np.random.default_rng(seed)
    pics = photos()
    names = [n for n in pics if n in SKIMAGE_PHOTOS]
    queries, targets = [], []
    for i in range(batch):
        name = names[int(rng.integers(len(names)))]
        img = pics[name]
        side = int(rng.integers(64, 161))
        side = min(side, img.shape[0], img.shape[1])
        y, x = int(rng.integers(img.shape[0] - side + 1)), int(rng.integers(img.shape[1] - side + 1))
        crop = np.ascontiguousarray(img[y : y + side, x : x + side])
        caption = f"{SKIMAGE_PHOTOS[name]} ({i})"  # distinct targets
        if i % 2:
            queries.append(Item(image=crop, instruction=I2T))
            targets.append(Item(text=caption))
        else:
            queries.append(Item(text=caption, instruction=T2I))
            targets.append(Item(image=crop, instruction="Represent the given image."))
    return queries, targets


def lora_backbone(model_dir: str):
    import torch

    from vlm2vec_rt.models.backbones import load_backbone
    from vlm2vec_rt.training.lora import add_adapter

    bb = load_backbone(model_dir)
    torch.manual_seed(0)
    add_adapter(bb, r=16, dropout=0.1, init_b_std=0.02)  # a trained-looking adapter: every gradient non-zero
    return bb


def encoder(bb):
    return lambda items: bb.forward(bb.to_device(bb.pre.collate(bb.pre.prepare_many(items))))


def train_step(mode: str, bb, queries, targets, optimizer) -> float:
    """One optimizer step: GradCache with chunk CHUNK, or plain (each side in one forward, one backward)."""
    from vlm2vec_rt import ops
    from vlm2vec_rt.training import grad_cache_step

    optimizer.zero_grad(set_to_none=True)
    encode = encoder(bb)
    if mode == "gradcache":
        loss = grad_cache_step(encode, queries, targets, chunk_size=CHUNK)
    else:
        loss_t = ops.info_nce(encode(queries), encode(targets), temperature=0.02)
        loss_t.backward()
        loss = float(loss_t.detach())
    optimizer.step()
    return loss


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: resident high-water mark)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak measured is the timed steps' own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _setup(cfg: dict[str, Any]):
    import torch

    torch.set_num_threads(cfg["threads"])
    bb = lora_backbone(cfg["model"])
    bb.model.train()
    params = [p for p in bb.model.parameters() if p.requires_grad]
    return bb, torch.optim.AdamW(params, lr=1e-5)


def memory_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One (mode, batch) in its own process: a warm-up step at batch 16, then `steps` steps at the batch."""
    bb, optimizer = _setup(cfg)
    sets = [make_inputs(cfg["batch"], seed=s) for s in range(cfg["steps"])]
    train_step(cfg["mode"], bb, *make_inputs(16, seed=999), optimizer)
    gc.collect()
    reset = _reset_peak()  # without it the peak may be loading's, not the steps'
    rss_before = _status_bytes("VmRSS")
    times, losses = [], []
    for queries, targets in sets:
        t0 = time.perf_counter()
        losses.append(train_step(cfg["mode"], bb, queries, targets, optimizer))
        times.append(time.perf_counter() - t0)
    peak = _status_bytes("VmHWM")
    return {
        "step_s": times,
        "peak_rss_bytes": peak,
        "peak_is_steps_only": reset,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "rss_before_steps_bytes": rss_before,
        "step_working_bytes": peak - rss_before,
        "losses": losses,
    }


def timing_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Both modes at one batch in one process, alternating (A B B A ...) over `repeats` input sets."""
    bb, optimizer = _setup(cfg)
    warm = make_inputs(16, seed=999)
    for mode in MODES:
        train_step(mode, bb, *warm, optimizer)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(cfg["repeats"]):
        queries, targets = make_inputs(cfg["batch"], seed=r)
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            t0 = time.perf_counter()
            train_step(mode, bb, queries, targets, optimizer)
            times[mode].append(time.perf_counter() - t0)
    medians = {m: float(np.median(t)) for m, t in times.items()}
    return {
        "step_s": times,
        "median_step_s": medians,
        "gradcache_over_plain": medians["gradcache"] / medians["plain"],
    }


def breakdown_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Where a GradCache step's extra time goes, at one batch (A/B-alternated medians, seconds).

    plain: forward + backward of each side whole; nograd_chunks: GradCache's first pass alone (forward of
    each side in chunks, no graph); grad_chunks: forward + backward in chunks (its last pass, without the
    loss in between); gradcache and gradcache_no_dropout: whole steps, LoRA dropout on and off (the masks
    are drawn in both passes); *_torch_dropout: plain and GradCache with torch's nn.Dropout in the LoRA
    slots instead of SeededDropout (what the adapters had before it).
    A step re-encodes what plain training encodes once, so GradCache / plain >= 1 + nograd / plain whatever
    the chunking costs: `ratio_floor` is that bound.
    """
    import contextlib

    import torch

    from vlm2vec_rt.training import grad_cache_step
    from vlm2vec_rt.training.dropout import SeededDropout, lora_dropout_slots

    bb, _ = _setup(cfg)
    encode = encoder(bb)
    dropouts = {
        m: m.p for m in bb.model.modules() if isinstance(m, torch.nn.Dropout | SeededDropout) and m.p > 0
    }
    slots = [
        (slot, name) for slot, name in lora_dropout_slots(bb.model) if isinstance(slot[name], SeededDropout)
    ]

    @contextlib.contextmanager
    def torch_dropout():
        ours = [slot[name] for slot, name in slots]
        for (slot, name), d in zip(slots, ours):
            slot[name] = torch.nn.Dropout(d.p)
        try:
            yield
        finally:
            for (slot, name), d in zip(slots, ours):
                slot[name] = d

    def with_torch_dropout(fn):
        def run(q, t):
            with torch_dropout():
                fn(q, t)

        return run

    def chunks(items):
        return [items[i : i + CHUNK] for i in range(0, len(items), CHUNK)]

    def forward_backward(parts):
        for part in parts:
            encode(part).sum().backward()

    def gradcache(queries, targets, dropout: bool):
        for m, p in dropouts.items():
            m.p = p if dropout else 0.0
        try:
            grad_cache_step(encode, queries, targets, chunk_size=CHUNK)
        finally:
            for m, p in dropouts.items():
                m.p = p

    def nograd(queries, targets):
        with torch.no_grad():
            for part in chunks(queries) + chunks(targets):
                encode(part)

    parts = {
        "plain": lambda q, t: forward_backward([q, t]),
        "nograd_chunks": nograd,
        "grad_chunks": lambda q, t: forward_backward(chunks(q) + chunks(t)),
        "gradcache": lambda q, t: gradcache(q, t, True),
        "gradcache_no_dropout": lambda q, t: gradcache(q, t, False),
        "plain_torch_dropout": with_torch_dropout(lambda q, t: forward_backward([q, t])),
        "gradcache_torch_dropout": with_torch_dropout(lambda q, t: gradcache(q, t, True)),
    }
    warm = make_inputs(16, seed=999)
    for fn in parts.values():
        fn(*warm)
    times: dict[str, list[float]] = {name: [] for name in parts}
    for r in range(cfg["repeats"]):
        queries, targets = make_inputs(cfg["batch"], seed=r)
        for name in parts if r % 2 == 0 else list(parts)[::-1]:
            bb.model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            parts[name](queries, targets)
            times[name].append(time.perf_counter() - t0)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    plain = medians["plain"]
    return {
        "batch": cfg["batch"],
        "median_s": medians,
        "first_pass_over_plain": medians["nograd_chunks"] / plain,
        "chunked_over_whole_forward_backward": medians["grad_chunks"] / plain,
        "dropout_share_of_gradcache": 1 - medians["gradcache_no_dropout"] / medians["gradcache"],
        "ratio_floor": 1 + medians["nograd_chunks"] / plain,
        "gradcache_over_plain": medians["gradcache"] / plain,
        "torch_dropout_gradcache_over_plain": medians["gradcache_torch_dropout"]
        / medians["plain_torch_dropout"],
        "seeded_dropout_speedup": {
            "plain": medians["plain_torch_dropout"] / plain,
            "gradcache": medians["gradcache_torch_dropout"] / medians["gradcache"],
        },
    }


# ---- parent side -----------------------------------------------------------------------------------------
def check_gradients(model_dir: str, batch: int = 12) -> dict[str, Any]:
    """GradCache gradients vs plain backward on the same inputs (dropout off): relative difference."""

    from vlm2vec_rt import ops
    from vlm2vec_rt.training import grad_cache_step

    bb = lora_backbone(model_dir)
    bb.model.eval()
    queries, targets = make_inputs(batch, seed=12345)
    encode = encoder(bb)
    ops.info_nce(encode(queries), encode(targets), temperature=0.02).backward()
    want = {n: p.grad.clone() for n, p in bb.model.named_parameters() if p.requires_grad}
    bb.model.zero_grad()
    grad_cache_step(encode, queries, targets, chunk_size=CHUNK)
    got = {n: p.grad for n, p in bb.model.named_parameters() if p.requires_grad}
    num = sum(float((got[k] - want[k]).double().pow(2).sum()) for k in want)
    den = sum(float(want[k].double().pow(2).sum()) for k in want)
    rel = (num / den) ** 0.5
    return {"batch": batch, "chunk": CHUNK, "relative_difference": rel, "ok": rel < 1e-5}


def run_worker(cfg: dict[str, Any], limit_bytes: int, timeout_s: float) -> dict[str, Any]:
    """Run one worker (cfg["kind"]: "memory" | "timing") in a fresh process; kill it past the memory limit."""
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak_seen, started = 0, time.monotonic()
    status = f"/proc/{proc.pid}/status"
    while proc.poll() is None:
        try:
            with open(status) as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            rss = 0
        peak_seen = max(peak_seen, rss)
        if rss > limit_bytes or time.monotonic() - started > timeout_s:
            proc.kill()
            proc.wait()
            why = "memory limit" if rss > limit_bytes else "time limit"
            return {"status": f"over {why}", "rss_when_killed_bytes": rss}
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"status": "failed", "error": err.strip().splitlines()[-1] if err.strip() else "?"}
    return {"status": "ok", **json.loads(out.strip().splitlines()[-1])}


def main(
    out_dir: str | os.PathLike | None = None,
    *,
    batches: tuple[int, ...] | None = None,
    quick: bool = False,
    repeats: int = 3,
    memory_limit_gib: float = MEMORY_LIMIT_GIB,
    threads: int | None = None,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Run the sweep; write train.json and train.png into out_dir (default bench/results)."""
    import torch

    from vlm2vec_rt.models.tiny import make_tiny_model

    batches = tuple(batches or (QUICK_BATCHES if quick else DEFAULT_BATCHES))
    threads = threads or min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    limit = int(memory_limit_gib * 2**30)
    results: dict[str, dict[int, dict[str, Any]]] = {"gradcache": {}, "plain": {}}
    timing: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as work:
        model = str(make_tiny_model(Path(work) / "model", "qwen2_vl", seed=0, **MODEL))
        check = check_gradients(model)
        print(f"gradient check: relative difference {check['relative_difference']:.2e}", flush=True)
        if not check["ok"]:
            raise SystemExit("GradCache gradients differ from plain backward: not timing a wrong answer")
        base = {"model": model, "threads": threads}
        # Memory: one process per (mode, batch), the two modes alternating which goes first.
        plain_stopped = False
        for k, batch in enumerate(batches):
            for mode in MODES if k % 2 == 0 else MODES[::-1]:
                if mode == "plain" and plain_stopped:
                    results[mode][batch] = {"status": "not run (a smaller batch passed the memory limit)"}
                    continue
                cfg = {**base, "kind": "memory", "mode": mode, "batch": batch, "steps": 1}
                r = run_worker(cfg, limit, timeout_s)
                results[mode][batch] = r
                if r["status"] != "ok" and mode == "plain":
                    plain_stopped = True
                shown = (
                    f"peak {r['peak_rss_bytes'] / 2**20:.0f} MiB (working set "
                    f"{r['step_working_bytes'] / 2**20:.0f} MiB), one step {r['step_s'][0]:.2f} s"
                    if r["status"] == "ok"
                    else r["status"]
                )
                print(f"memory  batch {batch:5d} {mode:9s}: {shown}", flush=True)
        # Time: A/B in one process per batch, wherever plain training fits in memory.
        for batch in batches:
            if results["plain"][batch].get("status") != "ok":
                continue
            cfg = {**base, "kind": "timing", "batch": batch, "repeats": repeats}
            r = run_worker(cfg, limit, timeout_s)
            timing[batch] = r
            if r["status"] == "ok":
                med = r["median_step_s"]
                print(
                    f"timing  batch {batch:5d}: gradcache {med['gradcache']:.2f} s, plain {med['plain']:.2f} s, "
                    f"ratio {r['gradcache_over_plain']:.2f}",
                    flush=True,
                )

        # Where GradCache's extra time goes, at the smallest batch (where the ratio is largest).
        breakdown = run_worker(
            {**base, "kind": "breakdown", "batch": batches[0], "repeats": max(3, repeats)}, limit, timeout_s
        )
        if breakdown["status"] == "ok":
            print(
                f"breakdown batch {batches[0]}: first pass {breakdown['first_pass_over_plain']:.2f}x plain "
                f"forward+backward, chunked forward+backward {breakdown['chunked_over_whole_forward_backward']:.2f}x whole, "
                f"dropout {100 * breakdown['dropout_share_of_gradcache']:.0f}% of a GradCache step; "
                f"ratio floor {breakdown['ratio_floor']:.2f}; SeededDropout speeds plain "
                f"{breakdown['seeded_dropout_speedup']['plain']:.2f}x, GradCache "
                f"{breakdown['seeded_dropout_speedup']['gradcache']:.2f}x",
                flush=True,
            )

    summary = summarise(results, timing, batches)
    report = {
        "config": {
            "model": {"backbone": "qwen2_vl", **MODEL},
            "adapter": "LoRA r=16 on the language model, dropout 0.1 (SeededDropout)",
            "chunk": CHUNK,
            "batches": list(batches),
            "repeats": repeats,
            "warmup": "one step at batch 16 (each mode) before measuring",
            "timing": "both modes in one process per batch, alternating, `repeats` input sets; median",
            "memory_limit_gib": memory_limit_gib,
            "inputs": "photo crops (64-160 px) <-> captions, both directions; new inputs each repeat",
            "memory": "a fresh process per configuration; peak = RSS high-water mark (VmHWM) over the timed "
            "steps, reset after loading and warm-up (model, interpreter and inputs included); step working "
            "set = peak - RSS before the first timed step",
            "caveat": "measured on a shared machine: times are noisy; compare ratios",
        },
        "gradient_check": check,
        "breakdown": breakdown,
        "memory": {m: {str(b): r for b, r in rs.items()} for m, rs in results.items()},
        "timing": {str(b): r for b, r in timing.items()},
        "summary": summary,
    }
    write_results(NAME, report, out_dir)
    plot(results, timing, batches, memory_limit_gib, out_dir)
    return report


def summary(report: dict) -> list[str]:
    """Headline lines for `vlm2vec-rt bench`'s SUMMARY.md."""
    s = report["summary"]
    lines = []
    if "gradcache_peak_mib" in s:
        peaks = s["gradcache_peak_mib"]
        lines.append(
            "GradCache (chunk 4) peak RSS by global batch: "
            + ", ".join(f"{b}: {m:.0f} MiB" for b, m in peaks.items())
            + f" ({max(s['gradcache_peak_ratio_vs_smallest'].values()):.2f}x the smallest; target "
            f"<= {s['targets']['memory_ratio']}x)"
        )
    if s.get("plain_peak_mib"):
        lines.append(
            "plain training peak RSS: "
            + ", ".join(f"{b}: {m:.0f} MiB" for b, m in s["plain_peak_mib"].items())
        )
    if s.get("gradcache_over_plain_step_time"):
        lines.append(
            "GradCache step time over plain at equal batch: "
            + ", ".join(f"{b}: {r:.2f}x" for b, r in s["gradcache_over_plain_step_time"].items())
            + f" (target <= {s['targets']['time_ratio']}x)"
        )
    b = report.get("breakdown") or {}
    if b.get("status") == "ok":
        lines.append(
            f"where GradCache's extra time goes at batch {b['batch']}: its first (no-grad) pass costs "
            f"{b['first_pass_over_plain']:.2f}x plain forward+backward; forward+backward in chunks of {CHUNK} costs "
            f"{b['chunked_over_whole_forward_backward']:.2f}x the whole batch's; LoRA dropout (drawn in both "
            f"passes) is {100 * b['dropout_share_of_gradcache']:.0f}% of a GradCache step"
        )
        if "ratio_floor" in b:
            speed = b["seeded_dropout_speedup"]
            lines.append(
                f"GradCache / plain cannot go below 1 + first pass / plain = {b['ratio_floor']:.2f}x at batch "
                f"{b['batch']} (the first pass is extra work whatever the chunking); SeededDropout (LoRA "
                f"dropout) made steps {speed['plain']:.2f}x (plain) and {speed['gradcache']:.2f}x (GradCache) "
                "faster than torch's nn.Dropout"
            )
    return lines


def summarise(results, timing, batches: tuple[int, ...]) -> dict[str, Any]:
    gc_runs = results["gradcache"]
    ok_gc = [b for b in batches if gc_runs[b]["status"] == "ok"]
    out: dict[str, Any] = {"targets": {"memory_ratio": TARGET_MEMORY_RATIO, "time_ratio": TARGET_TIME_RATIO}}
    if ok_gc and ok_gc[0] == batches[0]:
        base = gc_runs[batches[0]]
        out["gradcache_peak_mib"] = {str(b): gc_runs[b]["peak_rss_bytes"] / 2**20 for b in ok_gc}
        out["gradcache_working_set_mib"] = {str(b): gc_runs[b]["step_working_bytes"] / 2**20 for b in ok_gc}
        out["gradcache_peak_ratio_vs_smallest"] = {
            str(b): gc_runs[b]["peak_rss_bytes"] / base["peak_rss_bytes"] for b in ok_gc
        }
        out["memory_target_met"] = (
            max(out["gradcache_peak_ratio_vs_smallest"].values()) <= TARGET_MEMORY_RATIO
        )
    plain_ok = [b for b in batches if results["plain"].get(b, {}).get("status") == "ok"]
    out["plain_peak_mib"] = {str(b): results["plain"][b]["peak_rss_bytes"] / 2**20 for b in plain_ok}
    ratios = {str(b): r["gradcache_over_plain"] for b, r in timing.items() if r["status"] == "ok"}
    out["gradcache_over_plain_step_time"] = ratios
    if ratios:
        out["time_target_met"] = max(ratios.values()) <= TARGET_TIME_RATIO
    out["largest_plain_batch_within_limit"] = max(plain_ok) if plain_ok else None
    out["largest_gradcache_batch"] = max(ok_gc) if ok_gc else None
    return out


def plot(results, timing, batches, memory_limit_gib, out_dir) -> None:
    plt = pyplot()
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"gradcache": f"GradCache (chunk {CHUNK})", "plain": "plain"}
    styles = {"gradcache": "o-", "plain": "s--"}
    for mode in MODES:
        ok = [b for b in batches if results[mode].get(b, {}).get("status") == "ok"]
        ax_mem.plot(
            ok, [results[mode][b]["peak_rss_bytes"] / 2**30 for b in ok], styles[mode], label=labels[mode]
        )
        timed = [b for b in batches if timing.get(b, {}).get("status") == "ok"]
        ax_time.plot(
            timed,
            [timing[b]["median_step_s"][mode] for b in timed],
            styles[mode],
            label=labels[mode] + " (A/B)",
        )
    ax_mem.axhline(memory_limit_gib, color="grey", lw=0.8, ls=":", label="memory limit")
    killed = [b for b in batches if results["plain"].get(b, {}).get("status") == "over memory limit"]
    if killed:
        ax_mem.plot(killed, [memory_limit_gib] * len(killed), "x", color="C1", ms=9, label="plain: killed")
    # The memory runs' single steps are not plotted: one untimed-alternation step is too noisy to compare.
    for ax, title, unit in ((ax_mem, "peak memory (RSS)", "GiB"), (ax_time, "step time (median, A/B)", "s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_time.set_yscale("log")
    fig.suptitle("Contrastive training, tiny Qwen2-VL + LoRA, CPU")
    save_plot(fig, NAME, out_dir)


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument(
        "--batches", default=None, help=f"comma-separated (default {','.join(map(str, DEFAULT_BATCHES))})"
    )
    p.add_argument("--quick", action="store_true", help=f"batches {QUICK_BATCHES} only")
    p.add_argument("--repeats", type=int, default=3, help="A/B timing repeats per batch")
    p.add_argument("--memory-limit-gib", type=float, default=MEMORY_LIMIT_GIB)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = _parse()
    if args.worker:
        cfg = json.loads(args.worker)
        workers = {"memory": memory_worker, "timing": timing_worker, "breakdown": breakdown_worker}
        print(json.dumps(workers[cfg["kind"]](cfg)))
        sys.exit(0)
    main(
        args.out,
        batches=tuple(int(b) for b in args.batches.split(",")) if args.batches else None,
        quick=args.quick,
        repeats=args.repeats,
        memory_limit_gib=args.memory_limit_gib,
        threads=args.threads,
    )
