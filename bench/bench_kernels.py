"""Kernel benchmarks: top-k similarity search on CPU, and the Triton kernels against eager torch on a GPU.

CPU (any machine): ops.topk_similarity's torch path (chunked matmul + filtered running top-k) against the
naive torch.mm + torch.topk over the full score matrix and against faiss-cpu IndexFlatIP, on the same data
(D = 768, k = 10 and 100; default Q = 256, 1024, 4096 x N = 100k and Q = 256, 1024 x N = 1M, about 4 minutes
on a quiet 2-core machine; --full: Q = 256, 1024, 4096 x N = 100k, 1M). Every result is checked before
timing against faiss's by the true fp64 scores (check_topk: a differing index must be a tie); methods
alternate (A B C A B C) over two query sets; on the cheaper shapes the chunked path's products alone are
timed too, so the share its selection takes is known. Peak memory: each method in a fresh subprocess on the
N = 1M corpus, the RSS high-water mark (VmHWM, reset after the data is built) minus the resident size
before the search.

GPU (--gpu; bench/gpu_check.sh runs it on a lent H100/H200): both kernels against the torch reference in
fp32/fp16/bf16, then InfoNCE forward+backward (bf16, B = 1024..8192, D = 1536 and 4096) against eager
torch with peak CUDA memory, and top-k (Q = 1024, N = 1M, D = 1536, fp16, k = 100) against torch.mm +
torch.topk with the fraction of the roofline floor reached, the ceilings measured in the same run.
--tiny runs the GPU script on tiny sizes (kernels under TRITON_INTERPRET=1 where there is no GPU).

    .venv/bin/python bench/bench_kernels.py [--full] [--out bench/results]
    python bench/bench_kernels.py --gpu [--tiny] --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ab_times, pyplot, save_plot, stats, write_results  # noqa: E402

from vlm2vec_rt import ops  # noqa: E402

D_CPU = 768
KS = (10, 100)


# ---- CPU: top-k ----------------------------------------------------------------------------------------
def _corpus_and_index(n: int, d: int, seed: int):
    """A random corpus [n, d] fp32 and a faiss IndexFlatIP over it, sharing one copy of the vectors."""
    import faiss

    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(n, d, generator=gen).numpy()
    index = faiss.IndexFlatIP(d)
    index.add(vectors)
    del vectors  # faiss copied them; view its copy instead of keeping two
    shared = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)
    return torch.from_numpy(shared), index


def _cycle(items: list) -> Any:
    """A function returning the items in turn, so successive timed calls see different inputs."""
    it = itertools.cycle(items)
    return lambda: next(it)


def _naive_topk(queries: torch.Tensor, corpus: torch.Tensor, k: int):
    return torch.topk(queries @ corpus.t(), k, dim=1)


def _products_only(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> None:
    """The chunked path's matrix products alone, no selection: what its selection adds is the difference."""
    chunk = ops.default_topk_chunk(queries.shape[0], corpus.shape[0], k)
    for start in range(0, corpus.shape[0], chunk):
        ops._inner_products(queries, corpus[start : start + chunk])


def _true_scores(queries: torch.Tensor, corpus: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """corpus[idx[i, j]] . queries[i] in fp64 [Q, k], a few queries at a time (never a Q x k x D copy)."""
    out = torch.empty(idx.shape, dtype=torch.float64)
    for r0 in range(0, idx.shape[0], 64):
        rows = corpus[idx[r0 : r0 + 64]].double()  # [64, k, D]
        out[r0 : r0 + 64] = torch.einsum("qkd,qd->qk", rows, queries[r0 : r0 + 64].double())
    return out


def check_topk(queries, corpus, ref_scores, ref_idx, scores, idx) -> dict[str, Any]:
    """A top-k result against a reference one (faiss) on the same data, judged by the true scores (fp64).

    Right means: indices in range and distinct per query, scores sorted descending, each returned score the
    true inner product of its returned index, and wherever the returned index differs from the reference's
    at the same rank, the two true scores tie (within fp32 rounding). A wrong index fails even when the
    score lists agree; an index agreement figure alone would not say so.
    """
    scores, idx = torch.as_tensor(scores), torch.as_tensor(idx)
    ref_scores, ref_idx = torch.as_tensor(ref_scores), torch.as_tensor(ref_idx)
    n = corpus.shape[0]
    in_range = bool(((idx >= 0) & (idx < n)).all())
    safe_idx = idx.clamp(0, n - 1)
    true = _true_scores(queries, corpus, safe_idx)
    true_ref = _true_scores(queries, corpus, ref_idx)
    tol = 1e-5 * max(1.0, float(true_ref.abs().max()))  # about 10x the fp32 rounding of a D=768 product
    differ = idx != ref_idx
    score_err = float((scores.double() - true).abs().max())
    tie_gap = float((true - true_ref).abs()[differ].max()) if bool(differ.any()) else 0.0
    distinct = bool((safe_idx.sort(dim=1).values.diff(dim=1) != 0).all())
    ordered = bool((scores[:, :-1] >= scores[:, 1:]).all())
    return {
        "max_abs_score_error": score_err,
        "max_abs_score_diff_vs_reference": float((scores.double() - ref_scores.double()).abs().max()),
        "index_agreement": float((~differ).double().mean()),
        "max_true_gap_where_indices_differ": tie_gap,
        "tolerance": tol,
        "in_range": in_range,
        "distinct": distinct,
        "sorted": ordered,
        "ok": in_range and distinct and ordered and score_err <= tol and tie_gap <= tol,
    }


# (Q, N): the default covers the target's range of Q at N = 100k and of N at Q = 256 and 1024
DEFAULT_SWEEP = [(256, 100_000), (1024, 100_000), (4096, 100_000), (256, 1_000_000), (1024, 1_000_000)]
FULL_SWEEP = [(q, n) for n in (100_000, 1_000_000) for q in (256, 1024, 4096)]


def cpu_topk(
    *, full: bool, repeats: int | None, naive_limit_gb: float, shapes: list[tuple[int, int]] | None = None
) -> list[dict[str, Any]]:
    """Time chunked / naive / faiss top-k on each (Q, N, k) of the sweep; every row checked first."""
    sweep = shapes or (FULL_SWEEP if full else DEFAULT_SWEEP)
    rows = []
    for n in sorted({n for _, n in sweep}):
        corpus, index = _corpus_and_index(n, D_CPU, seed=n)
        for q in sorted(q for q, nn in sweep if nn == n):
            gen = torch.Generator().manual_seed(q)
            query_sets = [torch.randn(q, D_CPU, generator=gen) for _ in range(2)]
            for k in KS:
                rows.append(_time_topk_config(corpus, index, query_sets, k, repeats, naive_limit_gb))
                print(
                    json.dumps({key: rows[-1][key] for key in ("q", "n", "k", "median_ms", "speedup", "ok")}),
                    flush=True,
                )
        del corpus, index
    return rows


def _time_topk_config(corpus, index, query_sets, k, repeats, naive_limit_gb) -> dict[str, Any]:
    n, q = corpus.shape[0], query_sets[0].shape[0]
    gflop = 2 * q * n * corpus.shape[1] / 1e9
    naive_ok = q * n * 4 <= naive_limit_gb * 1e9
    # the checks are also each method's first (warm-up) call
    queries = query_sets[0]
    ref = index.search(queries.numpy(), k)
    checks = {"chunked": check_topk(queries, corpus, *ref, *ops.topk_similarity_torch(queries, corpus, k))}
    if naive_ok:
        checks["naive"] = check_topk(queries, corpus, *ref, *_naive_topk(queries, corpus, k))

    next_queries = _cycle(query_sets)
    fns = {
        "chunked": lambda: ops.topk_similarity_torch(next_queries(), corpus, k),
        "faiss": lambda: index.search(next_queries().numpy(), k),
    }
    if naive_ok:
        fns["naive"] = lambda: _naive_topk(next_queries(), corpus, k)
    if gflop <= 200:  # where the time goes, on the cheaper shapes
        fns["chunked_products_only"] = lambda: _products_only(next_queries(), corpus, k)
    reps = repeats or (5 if gflop <= 100 else 3 if gflop <= 500 else 2)
    times = ab_times(fns, repeats=reps, warmup=1 if gflop <= 200 else 0)
    med = {name: stats(t)["median_ms"] for name, t in times.items()}
    row = {
        "q": q,
        "n": n,
        "d": corpus.shape[1],
        "k": k,
        "gflop": gflop,
        "chunk_size": ops.default_topk_chunk(q, n, k),
        "products": "oneDNN" if ops._onednn_usable() else "torch.mm",
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
        "times": {name: stats(t) for name, t in times.items()},
        "median_ms": med,
        # > 1: the chunked torch path is faster
        "speedup": {f"vs_{b}": med[b] / med["chunked"] for b in ("faiss", "naive") if b in med},
        "chunked_gflops": gflop / med["chunked"] * 1e3,
        "naive": "timed"
        if naive_ok
        else f"skipped: its {q * n * 4 / 1e9:.1f} GB score matrix > --naive-limit-gb",
    }
    if "chunked_products_only" in med:
        row["selection_share_of_chunked"] = 1 - med["chunked_products_only"] / med["chunked"]
    return row


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def memory_probe(method: str, q: int, n: int, d: int, k: int) -> dict[str, Any]:
    """One search in this (fresh) process: peak RSS above the resident size once the data is built.

    A small search by the same method runs first, so that the libraries' code and thread pools (oneDNN,
    MKL, OpenMP: a few hundred MB of pages on the first product) are resident before the baseline: the
    figure is the search's working memory, not the cost of loading the libraries.
    """
    corpus, index = _corpus_and_index(n, d, seed=n)
    queries = torch.randn(q, d, generator=torch.Generator().manual_seed(q))
    small_corpus, small_index = _corpus_and_index(min(n, 4096), d, seed=1)
    small_queries = queries[: min(q, 16)]

    def search_with(queries, corpus, index):
        return {
            "chunked": lambda: ops.topk_similarity_torch(queries, corpus, k),
            "naive": lambda: _naive_topk(queries, corpus, k),
            "faiss": lambda: index.search(queries.numpy(), k),
        }[method]

    search_with(small_queries, small_corpus, small_index)()
    search = search_with(queries, corpus, index)
    baseline_kb = _rss_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    search()
    peak_kb = _rss_kb("VmHWM")
    return {
        "method": method,
        "q": q,
        "n": n,
        "d": d,
        "k": k,
        "baseline_mb": baseline_kb / 1024,
        "peak_mb": peak_kb / 1024,
        "working_mb": (peak_kb - baseline_kb) / 1024,
        "hwm_reset": reset,
    }


def cpu_memory(configs: list[tuple[int, int, int]]) -> list[dict[str, Any]]:
    """memory_probe for each method and (Q, N, k), each in a fresh subprocess."""
    out = []
    for q, n, k in configs:
        row: dict[str, Any] = {"q": q, "n": n, "d": D_CPU, "k": k}
        for method in ("chunked", "naive", "faiss"):
            cmd = [sys.executable, __file__, "--memory-probe", method, str(q), str(n), str(D_CPU), str(k)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row[method] = json.loads(res.stdout.strip().splitlines()[-1])
        row["working_ratio_chunked_vs_naive"] = row["chunked"]["working_mb"] / row["naive"]["working_mb"]
        row["peak_ratio_chunked_vs_naive"] = row["chunked"]["peak_mb"] / row["naive"]["peak_mb"]
        out.append(row)
        print(json.dumps({key: row[key] for key in ("q", "n", "k", "working_ratio_chunked_vs_naive")}))
    return out


def plot_cpu(rows: list[dict[str, Any]], memory: list[dict[str, Any]], out_dir) -> Path:
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    labels = [f"Q={r['q']}\nN={r['n'] // 1000}k\nk={r['k']}" for r in rows]
    x = np.arange(len(rows))
    for i, method in enumerate(("chunked", "faiss", "naive")):
        vals = [r["median_ms"].get(method, np.nan) for r in rows]
        ax_t.bar(x + (i - 1) * 0.27, vals, 0.27, label=method)
    for xi, r in zip(x, rows):  # the target: chunked no slower than faiss
        ax_t.annotate(
            f"{r['speedup']['vs_faiss']:.2f}x",
            (xi - 0.27, r["median_ms"]["chunked"]),
            ha="center",
            va="bottom",
            fontsize=6,
            color="red" if not r["ok"] else "black",
        )
    ax_t.set_xticks(x, labels, fontsize=7)
    ax_t.set_ylabel("median ms per search (label: faiss / chunked)")
    ax_t.set_yscale("log")
    ax_t.set_title(f"top-k inner product, D={D_CPU}, CPU ({os.cpu_count()} cores)")
    ax_t.legend()
    for j, m in enumerate(memory):
        for i, method in enumerate(("chunked", "faiss", "naive")):
            ax_m.bar(j + (i - 1) * 0.27, m[method]["working_mb"], 0.27, color=f"C{i}")
    ax_m.set_xticks(range(len(memory)), [f"Q={m['q']}\nN={m['n'] // 1000}k" for m in memory], fontsize=7)
    ax_m.set_ylabel("peak MB above the data")
    ax_m.set_title("search working memory")
    path = save_plot(fig, "kernels", out_dir)
    plt.close(fig)
    return path


def main(
    out_dir: str | Path | None = None,
    *,
    full: bool = False,
    repeats: int | None = None,
    naive_limit_gb: float | None = None,
    memory: bool = True,
    shapes: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """CPU top-k benchmark (and, where CUDA is present, the GPU check too): writes kernels.json + kernels.png."""
    start, load_before = time.monotonic(), os.getloadavg()
    # the naive path's full score matrix: up to 2 GB by default (its 4 GB at Q=1024, N=1M would take a
    # minute of the 5-minute default run), 6 GB with --full
    naive_limit_gb = naive_limit_gb or (6.0 if full else 2.0)
    rows = cpu_topk(full=full, repeats=repeats, naive_limit_gb=naive_limit_gb, shapes=shapes)
    mem_configs = [(256, 1_000_000, 100)] + ([(1024, 1_000_000, 100)] if full else [])
    mem = cpu_memory(mem_configs) if memory else []
    results: dict[str, Any] = {
        "config": {
            "d": D_CPU,
            "ks": list(KS),
            "full": full,
            "shapes": [list(shape) for shape in shapes or (FULL_SWEEP if full else DEFAULT_SWEEP)],
            "repeats": repeats,
            "naive_limit_gb": naive_limit_gb,
        },
        "targets": {
            "chunked no slower than faiss": all(r["speedup"]["vs_faiss"] >= 1.0 for r in rows),
            "working memory < 1/4 of naive at N=1M": all(
                m["working_ratio_chunked_vs_naive"] < 0.25 for m in mem
            )
            if mem
            else None,
            "all checks passed": all(r["ok"] for r in rows),
        },
        "failures": [
            f"{method} top-k Q={r['q']} N={r['n']} k={r['k']}: wrong result ({json.dumps(c)})"
            for r in rows
            for method, c in r["checks"].items()
            if not c["ok"]
        ],
        "cpu_topk": rows,
        "cpu_memory": mem,
        "wall_s": time.monotonic() - start,
        # the machine may be shared: its load around the run says how far to trust the figures
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "notes": "Figures are medians of A/B-alternated runs over two query sets; working memory is the RSS "
        "high-water mark above the resident data (corpus, queries, faiss index).",
    }
    if torch.cuda.is_available():
        results["gpu"] = gpu_check(out_dir or Path(__file__).resolve().parent / "results", tiny=False)
    write_results("kernels", results, out_dir)
    plot_cpu(rows, mem, out_dir)
    for line in summary(results):
        print(line)
    return results


def summary(results: dict[str, Any]) -> list[str]:
    """Headline lines for `vlm2vec-rt bench`'s SUMMARY.md."""
    lines = []
    for r in results["cpu_topk"]:
        med, speed = r["median_ms"], r["speedup"]
        line = (
            f"top-k Q={r['q']} N={r['n']:,} k={r['k']}: chunked {med['chunked']:.0f} ms, faiss {med['faiss']:.0f} ms "
            f"({speed['vs_faiss']:.2f}x faiss)"
        )
        if "vs_naive" in speed:
            line += f", naive {med['naive']:.0f} ms ({speed['vs_naive']:.2f}x naive)"
        lines.append(line + ("" if r["ok"] else " WRONG RESULT"))
    for m in results["cpu_memory"]:
        lines.append(
            f"top-k working memory Q={m['q']} N={m['n']:,} k={m['k']}: chunked {m['chunked']['working_mb']:.0f} MB, "
            f"naive {m['naive']['working_mb']:.0f} MB ({m['working_ratio_chunked_vs_naive']:.2f}x)"
        )
    lines.append(f"targets: {json.dumps(results['targets'])}")
    return lines


# ---- GPU: both kernels against eager --------------------------------------------------------------------
def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _info_nce_eager_bf16(q, t, temperature):
    """What a user writes in bf16: normalise, bf16 logits, cross-entropy in fp32."""
    qn = torch.nn.functional.normalize(q, dim=1)
    tn = torch.nn.functional.normalize(t, dim=1)
    logits = (qn @ tn.t()) / temperature
    return torch.nn.functional.cross_entropy(logits.float(), torch.arange(q.shape[0], device=q.device))


def _loss_and_grads(fn, q, t, **kw):
    q = q.detach().requires_grad_()
    t = t.detach().requires_grad_()
    loss = fn(q, t, **kw)
    loss.backward()
    return loss.detach(), q.grad, t.grad


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])


def gpu_check_info_nce(device: str, tiny: bool) -> list[dict[str, Any]]:
    """The fused InfoNCE against the torch reference on fresh random inputs, loss and both gradients."""
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    out = []
    gen = torch.Generator().manual_seed(0)
    nce_sizes = (
        [(5, 2, 16, 0.02)] if tiny else [(130, 5, 257, 0.02), (1024, 64, 1536, 0.02), (37, 0, 100, 1.0)]
    )
    for dtype in _dtypes(device):
        for b, m, d, temperature in nce_sizes:
            q = torch.randn(b, d, generator=gen).to(device, dtype)
            t = torch.randn(b + m, d, generator=gen).to(device, dtype)
            got = _loss_and_grads(ops.info_nce, q, t, temperature=temperature, backend="triton")
            ref = _loss_and_grads(ops.info_nce_torch, q, t, temperature=temperature)
            errs = [_rel_err(g, r) for g, r in zip(got, ref)]
            finite = all(bool(torch.isfinite(g).all()) for g in got)
            out.append({
                "op": "info_nce", "dtype": str(dtype), "b": b, "m": m, "d": d, "temperature": temperature,
                "rel_err_loss": errs[0], "rel_err_dq": errs[1], "rel_err_dt": errs[2],
                "ok": finite and max(errs) < tol[dtype],
            })  # fmt: skip
    return out


def gpu_check_topk(device: str, tiny: bool, dtypes: list[torch.dtype] | None = None) -> list[dict[str, Any]]:
    """The top-k kernel (two-pass default, single pass, forced two-pass) against torch.topk of the full matrix.

    dtypes: only the cases of these corpus dtypes (default: all), so a caller can check the timed dtype first."""
    from vlm2vec_rt.kernels import topk as topk_kernel

    out = []
    gen = torch.Generator().manual_seed(1)
    # the timed shape's D and k (each new specialisation costs a compile of the sorting networks), with Q and
    # N off the tile sizes; k = 10 in the timed dtype only
    cases = [(dtype, 100, 100_003, 1536, 100) for dtype in _dtypes(device)] + [
        (torch.float16, 37, 50_001, 1536, 10)
    ]
    if tiny:
        cases = [(dtype, 4, 300, 32, 10) for dtype in _dtypes(device)]
    if dtypes is not None:
        cases = [case for case in cases if case[0] in dtypes]
    for dtype, nq, n, d, k in cases:
        queries = torch.randn(nq, d, generator=gen).to(device)
        corpus = torch.randn(n, d, generator=gen).to(device, dtype)
        full = queries.to(dtype).float() @ corpus.float().t()
        ref_scores, ref_idx = torch.topk(full, k, dim=1)
        # the default (two passes where the corpus is large) and the single exact pass
        for variant, stride in (("default", None), ("single_pass", 1), ("two_pass", 4)):
            scores, idx = topk_kernel.topk_similarity(queries, corpus, k, sample_stride=stride)
            written = bool(torch.isfinite(scores).all() and (idx >= 0).all() and (idx < n).all())
            true = full.gather(1, idx.clamp(0, n - 1))
            diff = float((scores - ref_scores).abs().max())
            consistent = float((true - scores).abs().max())
            # a different index at some rank must be a tie in the full matrix, not merely a close score list
            differ = idx != ref_idx
            tie_gap = float((true - ref_scores).abs()[differ].max()) if bool(differ.any()) else 0.0
            out.append({
                "op": "topk_similarity", "variant": variant, "dtype": str(dtype),
                "q": nq, "n": n, "d": d, "k": k,
                "max_abs_score_diff": diff, "index_agreement": float((~differ).float().mean()),
                "max_gap_where_indices_differ": tie_gap,
                "ok": written and max(diff, consistent, tie_gap) < 1e-3 * float(ref_scores.abs().max()),
            })  # fmt: skip
    return out


def _ceilings(device: str) -> dict[str, float]:
    """This card's fp16 matmul rate and copy bandwidth, measured now (METHOD.md: use measured ceilings)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    src = torch.randn(1 << 30, device=device, dtype=torch.float16)  # 2 GiB
    dst = torch.empty_like(src)
    t_mm = ab_times({"mm": lambda: a @ b}, repeats=10, warmup=3, sync=torch.cuda.synchronize)["mm"]
    t_cp = ab_times({"cp": lambda: dst.copy_(src)}, repeats=10, warmup=3, sync=torch.cuda.synchronize)["cp"]
    return {
        "fp16_matmul_tflops": 2 * 8192**3 / float(np.median(t_mm)) / 1e12,
        "copy_gb_s": 2 * src.numel() * 2 / float(np.median(t_cp)) / 1e9,  # bytes read + written
    }


def _peak_extra_mb(fn, device: str) -> float | None:
    """Peak device memory a call allocates beyond what was allocated before it (None off CUDA)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def gpu_infonce_timings(device: str, tiny: bool, deadline: float) -> list[dict[str, Any]]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the interpreter's bf16 is not the GPU's
    sizes = [(8, 16)] if tiny else [(b, d) for d in (1536, 4096) for b in (1024, 2048, 4096, 8192)]
    out = []
    for b, d in sizes:
        if time.monotonic() > deadline:
            out.append({"b": b, "d": d, "skipped": "time budget"})
            continue
        out.append(_time_infonce_size(b, d, device, dtype, tiny))
        print(json.dumps({key: out[-1][key] for key in ("b", "d", "median_ms", "peak_extra_mb")}))
    return out


def _time_infonce_size(b: int, d: int, device: str, dtype: torch.dtype, tiny: bool) -> dict[str, Any]:
    from vlm2vec_rt.kernels import infonce as infonce_kernel

    gen = torch.Generator().manual_seed(b + d)
    sets = [tuple(torch.randn(b, d, generator=gen).to(device, dtype) for _ in range(2)) for _ in range(2)]
    next_set = _cycle(sets)

    def step(fn, **kw):
        def run():
            q, t = (x.detach().requires_grad_() for x in next_set())
            fn(q, t, temperature=0.02, **kw).backward()

        return run

    fns = {
        "fused": step(ops.info_nce, backend="triton"),
        "eager_bf16": step(_info_nce_eager_bf16),
        "eager_fp32_reference": step(ops.info_nce_torch),
    }
    sync = torch.cuda.synchronize if device == "cuda" else None
    times = ab_times(fns, repeats=3 if tiny else 10, warmup=1 if tiny else 3, sync=sync)
    med = {name: stats(t)["median_ms"] for name, t in times.items()}
    return {
        "b": b, "m": 0, "d": d, "dtype": str(dtype),
        "median_ms": med,
        "speedup_vs_eager_bf16": med["eager_bf16"] / med["fused"],
        "speedup_vs_eager_fp32_reference": med["eager_fp32_reference"] / med["fused"],
        "peak_extra_mb": {name: _peak_extra_mb(fn, device) for name, fn in fns.items()},
        "bxb_fp32_buffer_mb": b * b * 4 / 2**20,
        "fused_chunk_rows": infonce_kernel.default_chunk_rows(b, b, d),
        "mm_out_dtype_used": infonce_kernel.mm_out_dtype_supported(),
    }  # fmt: skip


def gpu_topk_timings(
    device: str, tiny: bool, deadline: float, ceilings: dict[str, float] | None
) -> dict[str, Any]:
    from vlm2vec_rt.kernels import topk as topk_kernel

    nq, n, d, k = (4, 300, 32, 10) if tiny else (1024, 1_000_000, 1536, 100)
    dtype = torch.float16
    # drawn on the device: 1.5 G random numbers on the host would take a good part of the lease
    gen = torch.Generator(device=device).manual_seed(1)
    corpus = torch.randn(n, d, generator=gen, device=device, dtype=dtype)
    query_sets = [torch.randn(nq, d, generator=gen, device=device, dtype=dtype) for _ in range(2)]
    sync = torch.cuda.synchronize if device == "cuda" else None
    queries = _cycle(query_sets)

    # a few tile shapes for k = 100 (K_PAD = 128): the default first; later ones only while time allows
    # the default first, then the single exact pass and other tiles / sample strides while time allows
    variants = {"fused": {}, "fused_single_pass": {"sample_stride": 1}}
    if not tiny:
        variants |= {
            "fused_s32": {"sample_stride": 32},
            "fused_s64": {"sample_stride": 64},
            "fused_q64_n128_d64_w8": {"block_q": 64, "block_n": 128, "block_d": 64, "num_warps": 8},
            "fused_q32_n128_d128_w8": {"block_q": 32, "block_n": 128, "block_d": 128, "num_warps": 8},
            "fused_q16_n128_d64_w4": {"block_q": 16, "block_n": 128, "block_d": 64, "num_warps": 4},
        }
    fns = {"torch_mm_topk": lambda: torch.topk(torch.mm(queries(), corpus.t()), k, dim=1)}
    for name, kw in variants.items():
        if time.monotonic() > deadline:
            break
        try:
            fn = lambda kw=kw: topk_kernel.topk_similarity(queries(), corpus, k, **kw)  # noqa: E731
            fn()  # compiles
            fns[name] = fn
        except Exception as e:  # a variant that does not compile (registers, shared memory) is reported
            print(f"{name}: {type(e).__name__}: {e}")
    times = ab_times(fns, repeats=3 if tiny else 10, warmup=1 if tiny else 2, sync=sync)
    med = {name: stats(t)["median_ms"] for name, t in times.items()}
    best = min((m for m in med if m.startswith("fused")), key=med.get)
    flops = 2 * nq * n * d
    min_bytes = (n * d + nq * d) * 2 + nq * k * 12  # corpus and queries read once, results written once
    result: dict[str, Any] = {
        "q": nq, "n": n, "d": d, "k": k, "dtype": str(dtype),
        "median_ms": med, "best_fused": best,
        "speedup_vs_torch_mm_topk": med["torch_mm_topk"] / med["fused"],
        "best_speedup_vs_torch_mm_topk": med["torch_mm_topk"] / med[best],
        "flops": flops, "min_bytes": min_bytes,
        "peak_extra_mb": {
            "fused": _peak_extra_mb(fns["fused"], device),
            "torch_mm_topk": _peak_extra_mb(fns["torch_mm_topk"], device),
        },
    }  # fmt: skip
    if ceilings:
        floor_ms = 1e3 * max(
            flops / (ceilings["fp16_matmul_tflops"] * 1e12), min_bytes / (ceilings["copy_gb_s"] * 1e9)
        )
        result["roofline_floor_ms"] = floor_ms
        result["fraction_of_floor"] = {name: floor_ms / ms for name, ms in med.items()}
    return result


def gpu_check(out_dir: str | Path, *, tiny: bool, only: str | None = None) -> dict[str, Any]:
    """The GPU script: correctness of both kernels in each dtype, then timings; writes kernels_gpu.json.

    only: "info_nce" or "topk" to run one kernel's sections (a rerun inside a short lease)."""
    start = time.monotonic()
    deadline = start + 6.5 * 60  # gpu_check.sh must end inside 8 minutes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (Triton interpreter)"
    if device == "cpu":
        from vlm2vec_rt.kernels.interpreter import use_interpreter

        use_interpreter()
    import triton

    results: dict[str, Any] = {"card": card, "device": device, "tiny": tiny, "triton": triton.__version__}
    # InfoNCE first: its kernels compile in seconds, the top-k sorting networks may take minutes
    sections = {
        "check_info_nce": lambda: gpu_check_info_nce(device, tiny),
        "info_nce": lambda: gpu_infonce_timings(device, tiny, deadline),
        "ceilings": lambda: _ceilings(device) if device == "cuda" else None,
        "check_topk": lambda: gpu_check_topk(device, tiny),
        "topk": lambda: gpu_topk_timings(device, tiny, deadline, _measured(results.get("ceilings"))),
    }
    if only:
        sections = {name: fn for name, fn in sections.items() if only in name or name == "ceilings"}
    for name, section in sections.items():
        # one failing section (a kernel that does not compile on this Triton, say) must not cost the others;
        # the JSON is rewritten after each, so a run killed at its time limit still leaves what it measured
        try:
            results[name] = section()
        except Exception as e:
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        results["wall_s"] = time.monotonic() - start
        results["targets"] = _gpu_targets(results)
        path = write_results("kernels_gpu", results, out_dir)
        print(
            json.dumps(
                {"section": name, "wall_s": round(results["wall_s"], 1), "targets": results["targets"]}
            )
        )
    print(f"wrote {path}")
    _print_gpu_summary(results)
    return results


def _measured(ceilings: Any) -> dict[str, float] | None:
    return ceilings if isinstance(ceilings, dict) and "copy_gb_s" in ceilings else None


def _gpu_targets(r: dict[str, Any]) -> dict[str, bool | None]:
    ran = [r[key] for key in ("check_info_nce", "check_topk") if key in r]
    checks = [row for rows in ran for row in (rows if isinstance(rows, list) else [rows])]
    nce = r.get("info_nce")
    topk = r.get("topk")
    return {
        "all correct": all(isinstance(row, dict) and row.get("ok") for row in checks) if checks else None,
        "info_nce 2x eager bf16": all(row.get("speedup_vs_eager_bf16", 0) >= 2 for row in nce)
        if isinstance(nce, list)
        else None,
        "topk 1.5x torch.mm+topk": topk["speedup_vs_torch_mm_topk"] >= 1.5
        if isinstance(topk, dict) and "speedup_vs_torch_mm_topk" in topk
        else None,
    }


def _print_gpu_summary(r: dict[str, Any]) -> None:
    print(f"\n== {r['card']} (tiny={r['tiny']}, {r['wall_s']:.0f} s) ==")
    for key in ("check_info_nce", "check_topk"):
        rows = r.get(key)
        for c in rows if isinstance(rows, list) else [rows] if rows else []:
            print(
                f"  {key:15s} {c.get('variant', ''):12s} {c.get('dtype', ''):15s} ok={c.get('ok')} {c.get('error', '')}"
            )
    for row in (
        r["info_nce"]
        if isinstance(r.get("info_nce"), list)
        else [r.get("info_nce")]
        if "info_nce" in r
        else []
    ):
        if row and "median_ms" in row:
            m = row["median_ms"]
            print(
                f"  info_nce B={row['b']} D={row['d']}: fused {m['fused']:.2f} ms, eager bf16 {m['eager_bf16']:.2f}, "
                f"eager fp32 {m['eager_fp32_reference']:.2f} (x{row['speedup_vs_eager_bf16']:.2f} vs bf16), "
                f"peak extra MB {json.dumps(row['peak_extra_mb'])}"
            )
        else:
            print(f"  info_nce: {row}")
    t = r.get("topk") or {}
    if not t:
        pass
    elif "median_ms" in t:
        print(
            f"  topk: {json.dumps(t['median_ms'])} best={t['best_fused']} x{t['best_speedup_vs_torch_mm_topk']:.2f}"
        )
        if "fraction_of_floor" in t:
            print(
                f"  roofline floor {t['roofline_floor_ms']:.2f} ms; fraction {json.dumps(t['fraction_of_floor'])}"
            )
    else:
        print(f"  topk: {t}")
    print(f"  targets: {json.dumps(r['targets'])}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--full", action="store_true", help="the whole CPU sweep (Q up to 4096, N up to 1M)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--naive-limit-gb",
        type=float,
        default=None,
        help="skip naive runs whose Q x N scores exceed this (default 2, with --full 6)",
    )
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument(
        "--shapes",
        type=lambda text: [tuple(int(x) for x in shape.split("x")) for shape in text.split(",")],
        help="CPU top-k shapes QxN[,QxN...] instead of the sweep (e.g. 256x100000)",
    )
    ap.add_argument("--gpu", action="store_true", help="the GPU check (bench/gpu_check.sh)")
    ap.add_argument("--tiny", action="store_true", help="with --gpu: tiny sizes, for a CPU dry run")
    ap.add_argument("--only", choices=["info_nce", "topk"], help="with --gpu: one kernel's sections only")
    ap.add_argument("--memory-probe", nargs=5, metavar=("METHOD", "Q", "N", "D", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        method, *sizes = args.memory_probe
        print(json.dumps(memory_probe(method, *map(int, sizes))))
    elif args.gpu:
        gpu_check(args.out or Path(__file__).resolve().parent / "results", tiny=args.tiny, only=args.only)
    else:
        main(
            args.out,
            full=args.full,
            repeats=args.repeats,
            naive_limit_gb=args.naive_limit_gb,
            memory=not args.no_memory,
            shapes=args.shapes,
        )
