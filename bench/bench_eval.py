"""MMEB evaluation speed: embeddings/s on the bundled benchmark (eager Embedder vs engines, A/B in one
run), wall time of a full bundled evaluation (cold and from the cache), and scoring at MMEB scale
(the reference code's per-query loop vs the vectorised scorer).

    python bench/bench_eval.py [--out bench/results] [--quick] [--no-engine]

Importable: main(out_dir, quick=False, engines=True, extra_encoders=None) -> dict. An engine is added
automatically when vlm2vec_rt.engine builds one here; `extra_encoders` ({name: () -> encoder}) plugs
in anything else with .encode(items) and .fingerprint.
Writes <out>/eval.json and <out>/eval.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ab_times, pyplot, save_plot, write_results  # noqa: E402

NAME = "eval"
ENGINE_PRECISIONS = ("fp32", "fp16")
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.99}


# ---- encoders -------------------------------------------------------------------------------------------
def make_encoders(
    model_dir: Path, work: Path, *, engines: bool, notes: list[str]
) -> dict[str, Callable[[], Any]]:
    """name -> factory. Eager always; engines when vlm2vec_rt.engine can build them on this machine."""
    from vlm2vec_rt.models.embedder import Embedder

    factories: dict[str, Callable[[], Any]] = {"eager": lambda: Embedder.from_pretrained(model_dir)}
    if not engines:
        return factories
    try:
        from vlm2vec_rt.engine.build import build_engine
        from vlm2vec_rt.engine.runtime import Engine
    except ImportError as e:
        notes.append(f"engine comparison skipped: vlm2vec_rt.engine not available ({e})")
        return factories
    for precision in ENGINE_PRECISIONS:
        try:
            path = build_engine(model_dir, work / f"engine-{precision}", precision=precision)
            Engine.load(path)  # fails here rather than mid-benchmark
        except Exception as e:  # an engine that does not build is a note, not a crash of the benchmark
            notes.append(f"engine {precision} skipped: {type(e).__name__}: {e}")
            continue
        factories[f"engine-{precision}"] = lambda p=path: Engine.load(p)
    return factories


def input_sets(eval_dir: Path) -> dict[str, list]:
    """Three kinds of input from the bundled benchmark: digit images, photo crops, texts (distinct items)."""
    from vlm2vec_rt.eval.reader import read_dataset

    digits = read_dataset(eval_dir, "Digits")
    pairs = read_dataset(eval_dir, "PhotoPairs")
    i2t = read_dataset(eval_dir, "Photos_i2t")
    t2i = read_dataset(eval_dir, "Photos_t2i")
    return {
        "digit images": digits.items("queries"),
        "photo crops": pairs.items("queries") + pairs.items("candidates"),
        "texts": i2t.items("candidates") + t2i.items("queries") + digits.items("candidates"),
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


# ---- scoring at MMEB scale --------------------------------------------------------------------------------
def official_loop(q_emb, c_emb, qi, ci) -> float:
    """The reference evaluation's scoring: per query, stack its candidates, cosine, argmax == 0."""
    hits = 0
    q_norm = np.linalg.norm(q_emb, axis=1)
    c_norm = np.linalg.norm(c_emb, axis=1)
    for i, row in zip(qi, ci):
        tgt = np.stack([c_emb[j] for j in row])
        scores = tgt @ q_emb[i] / (c_norm[row] * q_norm[i])
        hits += int(np.argmax(scores) == 0)
    return hits / len(qi)


def scoring_problem(rng, *, queries: int, candidates: int, pool: int, dim: int):
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    c = rng.standard_normal((pool, dim)).astype(np.float32)
    ci = np.stack([rng.choice(pool, candidates, replace=False) for _ in range(queries)])
    # Make the positive the best candidate for ~60% of queries so precision is not trivially 0.
    good = rng.random(queries) < 0.6
    q[good] = c[ci[good, 0]] + 0.5 * rng.standard_normal((int(good.sum()), dim)).astype(np.float32)
    return q, c, np.arange(queries), ci


def bench_scoring(quick: bool) -> dict:
    """Per input set, every method once in turn (A B C ...), each result checked against the reference."""
    from vlm2vec_rt.eval.scoring import metrics, positive_ranks

    def precision(ranks):
        return metrics(ranks)["precision_at_1"]

    shapes = [
        dict(queries=1000, candidates=1000, pool=2000, dim=1024),
        dict(queries=1000, candidates=1000, pool=6000, dim=1024),
    ]
    if quick:
        shapes = [dict(queries=200, candidates=200, pool=500, dim=256)]
    rng = np.random.default_rng(0)
    out = []
    for n, shape in enumerate(shapes):
        methods = {
            "official loop": official_loop,
            "vectorised auto": lambda *p: precision(positive_ranks(*p, ties="official")),
            "vectorised dense": lambda *p: precision(positive_ranks(*p, ties="official", strategy="dense")),
        }
        if n == 0:  # the memory-bound path, once: it is as slow as the loop at these sizes
            methods["vectorised gather"] = lambda *p: precision(
                positive_ranks(*p, ties="official", strategy="gather")
            )
        times: dict[str, list[float]] = {k: [] for k in methods}
        for _ in range(2):  # two input sets
            problem = scoring_problem(rng, **shape)
            got = {}
            for name, fn in methods.items():
                t0 = time.perf_counter()
                got[name] = fn(*problem)
                times[name].append(time.perf_counter() - t0)
            assert all(v == got["official loop"] for v in got.values()), got  # a fast wrong answer fails
        med = {k: float(np.median(v)) for k, v in times.items()}
        out.append(
            {
                "shape": shape,
                "median_s": med,
                "speedup_auto_vs_official": med["official loop"] / med["vectorised auto"],
            }
        )
    return {"scoring": out}


# ---- main -----------------------------------------------------------------------------------------------
def main(
    out_dir: str | Path | None = None,
    *,
    quick: bool = False,
    engines: bool = True,
    extra_encoders: dict[str, Callable[[], Any]] | None = None,
) -> dict:
    import torch

    from vlm2vec_rt import eval as mmeb
    from vlm2vec_rt.models.tiny import make_tiny_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        paths = mmeb.write_bundled(work / "bundled")
        generate_s = time.perf_counter() - t0
        model_dir = make_tiny_model(work / "model", "llava_next")
        factories = make_encoders(model_dir, work, engines=engines, notes=notes)
        factories.update(extra_encoders or {})
        encoders = {name: make() for name, make in factories.items()}
        sets = input_sets(paths.eval_dir)
        if quick:
            sets = {k: v[:24] for k, v in sets.items()}

        # Correctness before timing: every encoder agrees with eager on the same items.
        agreement = {}
        probe = [x for v in sets.values() for x in v[:8]]
        reference = encoders["eager"].encode(probe)
        for name, enc in encoders.items():
            cos = _cosine(np.asarray(enc.encode(probe), dtype=np.float32), reference)
            agreement[name] = cos
            precision = name.rsplit("-", 1)[-1]
            if cos < MIN_COSINE.get(precision, 0.99):
                notes.append(f"{name}: min cosine vs eager {cos:.5f} below threshold: excluded from timing")
        timed = {
            n: e
            for n, e in encoders.items()
            if n == "eager" or agreement[n] >= MIN_COSINE.get(n.rsplit("-", 1)[-1], 0.99)
        }

        throughput: dict[str, dict[str, float]] = {n: {} for n in timed}
        for set_name, items in sets.items():
            times = ab_times(
                {n: (lambda e=e, items=items: e.encode(items, batch_size=16)) for n, e in timed.items()},
                repeats=2 if quick else 3,
                warmup=1,
            )
            for n, t in times.items():
                throughput[n][set_name] = len(items) / float(np.median(t))
        total_items = sum(len(v) for v in sets.values())
        for n in timed:
            # items/s over all sets: total items / sum of median times
            throughput[n]["all"] = total_items / sum(len(sets[s]) / throughput[n][s] for s in sets)

        # Full bundled evaluation: cold (empty cache) and warm (everything cached), per encoder, alternating.
        evaluation: dict[str, dict[str, Any]] = {n: {"cold_s": [], "warm_s": []} for n in timed}
        scores = {}
        for r in range(1 if quick else 2):
            for n, enc in timed.items():
                cache = work / f"cache-{n}-{r}"
                for key in ("cold_s", "warm_s"):
                    t0 = time.perf_counter()
                    scores[n] = mmeb.evaluate(enc, paths.eval_dir, cache_dir=cache)
                    evaluation[n][key].append(time.perf_counter() - t0)
        for n in timed:
            evaluation[n] = {k: float(np.median(v)) for k, v in evaluation[n].items()}
            evaluation[n]["precision_at_1"] = scores[n]
        unique = sum(len(v) for v in (sets.values()))
        dedup = _dedup_counts(paths.eval_dir)

    results = {
        "config": {
            "model": "make_tiny_model defaults (llava_next)",
            "quick": quick,
            "batch_size": 16,
            "input_sets": {k: len(v) for k, v in sets.items()},
        },
        "bundled_generate_s": generate_s,
        "agreement_min_cosine_vs_eager": agreement,
        "embeddings_per_s": throughput,
        "ratio_vs_eager": {n: throughput[n]["all"] / throughput["eager"]["all"] for n in timed},
        "bundled_evaluation": evaluation,
        "distinct_items_timed": unique,
        "dedup": dedup,
        **bench_scoring(quick),
        "notes": notes,
        "failures": [n for n in notes if "excluded from timing" in n],
    }
    out = write_results(NAME, results, out_dir)
    _plot(results, out_dir)
    print(f"wrote {out}")
    return results


def _dedup_counts(eval_dir: Path) -> dict:
    """Items the bundled benchmark needs embedded with and without per-side deduplication."""
    from vlm2vec_rt import eval as mmeb
    from vlm2vec_rt.eval.reader import read_dataset

    out = {}
    for name in mmeb.BUNDLED_DATASETS:
        d = read_dataset(eval_dir, name)
        out[name] = {
            "without_dedup": int(d.num_queries + (d.candidate_index >= 0).sum()),
            "with_dedup": len(d.queries) + len(d.candidates),
        }
    return out


def _plot(results: dict, out_dir) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    tp = results["embeddings_per_s"]
    names = list(tp)
    sets = [s for s in next(iter(tp.values())) if s != "all"] + ["all"]
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        axes[0].bar(np.arange(len(sets)) + i * width, [tp[n][s] for s in sets], width, label=n)
    axes[0].set_xticks(np.arange(len(sets)) + width * (len(names) - 1) / 2, sets, fontsize=8)
    axes[0].set_ylabel("embeddings / s (log)")
    axes[0].set_yscale("log")
    axes[0].set_title("Bundled benchmark items (batch 16)")
    axes[0].legend(fontsize=8)
    ev = results["bundled_evaluation"]
    for i, n in enumerate(names):
        axes[1].bar(np.arange(2) + i * width, [ev[n]["cold_s"], ev[n]["warm_s"]], width, label=n)
    axes[1].set_xticks(np.arange(2) + width * (len(names) - 1) / 2, ["cold", "from cache"])
    axes[1].set_ylabel("seconds")
    axes[1].set_title("Full bundled evaluation (4 datasets)")
    axes[1].legend(fontsize=8)
    sc = results["scoring"]
    labels = list(sc[0]["median_s"])
    for i, entry in enumerate(sc):
        s = entry["shape"]
        axes[2].bar(
            np.arange(len(labels)) + i * 0.4,
            [entry["median_s"].get(k, np.nan) for k in labels],
            0.4,
            label=f"Q{s['queries']} K{s['candidates']} pool {s['pool']} D{s['dim']}",
        )
    axes[2].set_xticks(np.arange(len(labels)) + 0.2 * (len(sc) - 1), labels, rotation=20, fontsize=8)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("seconds per dataset (log)")
    axes[2].set_title("Scoring one MMEB-size dataset")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    save_plot(fig, NAME, out_dir)
    plt.close(fig)


def summary(results: dict) -> list[str]:
    """Headline lines for `vlm2vec-rt bench`'s SUMMARY.md."""
    lines = [
        f"{name}: {tp['all']:.1f} embeddings/s on the bundled benchmark's items "
        f"({results['ratio_vs_eager'][name]:.2f}x eager)"
        for name, tp in results["embeddings_per_s"].items()
    ]
    for name, ev in results["bundled_evaluation"].items():
        lines.append(
            f"full bundled evaluation, {name}: {ev['cold_s']:.1f} s cold, {ev['warm_s']:.2f} s from cache"
        )
    for sc in results.get("scoring", []):
        shape = sc["shape"]
        lines.append(
            f"scoring {shape['queries']} queries x {shape['candidates']} candidates (pool {shape['pool']}, "
            f"dim {shape['dim']}): {sc['speedup_auto_vs_official']:.0f}x the reference loop"
        )
    return lines


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="results folder (default: bench/results)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--no-engine", action="store_true", help="eager only")
    a = ap.parse_args()
    main(a.out, quick=a.quick, engines=not a.no_engine)
