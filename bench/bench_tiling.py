"""Images per second: C++ tiling (vlm2vec_rt.tiling) vs transformers' Pillow image processors.

Same images, same run, interleaved (A B A B): batches of 32 real photos (scikit-learn / scikit-image samples,
resized and cropped to each size) at 1344x1344 (VLM2Vec "high": 17 views), 800x600 and 2000x1500, through
LLaVA-NeXT anyres with grid pinpoints up to 1344; float32 and float16 outputs; 1 and 2 threads. A Qwen2-VL
row (800x600, 1 and 2 threads) rides along. Outputs are checked against the processor before timing.

Phi-3.5-V (`tiling.phi3v`, num_crops 16 and 4, at 1344x1344 and 800x600) is set against the plain-Python
reference of the official Phi3VImageProcessor (`preprocess.phi3v`: Pillow, numpy and torch's interpolate, the
operations the official code runs), checked first (every pixel within 1/255, crops bit-equal, same HD sizes
and token counts).

Each C++ case is also set against the output-bandwidth bound (BENCH.md): the bytes it must write divided
by this machine's memory write bandwidth, measured in the same run, both into fresh arrays (what tiling
pays: every output is a new array) and into warm, reused ones.

    .venv/bin/python bench/bench_tiling.py [--batch 32] [--repeats 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ab_times, pyplot, save_plot, stats, write_results  # noqa: E402

from vlm2vec_rt import tiling  # noqa: E402
from vlm2vec_rt.sample_images import photos  # noqa: E402

PINPOINTS = [list(p) for p in tiling.HIGH_RESOLUTION_PINPOINTS]
SIZES = {"1344x1344": (1344, 1344), "800x600": (600, 800), "2000x1500": (1500, 2000)}  # name -> (h, w)
QWEN = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)  # Qwen2-VL's released defaults
PHI3V_SIZES = {"1344x1344": (1344, 1344), "800x600": (600, 800)}  # name -> (h, w)
PHI3V_CROPS = (16, 4)  # the processor's common setting, and VLM2Vec's
THREADS = (1, 2)
DTYPES = ("float32", "float16")


def make_images(height: int, width: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """n distinct real photos at height x width: a random crop of a sample photo, resized (Pillow bicubic)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = [p for p in photos().values() if min(p.shape[:2]) >= 256]
    out = []
    for i in range(n):
        src = pool[i % len(pool)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.7, 1.0)), int(w * rng.uniform(0.7, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = Image.fromarray(src[y : y + ch, x : x + cw])
        out.append(np.asarray(crop.resize((width, height), Image.Resampling.BICUBIC)))
    return out


def write_bandwidth(nbytes: int, *, repeats: int = 5) -> dict[str, float]:
    """Memory write bandwidth (GB/s): filling fresh arrays of `nbytes` (page faults included, as a new output
    pays) and re-filling warm ones, on 1 and 2 threads (numpy's copy releases the GIL)."""
    count = nbytes // 4
    warm = [np.ones(count, np.float32) for _ in range(2)]

    def fill_fresh(_: int) -> None:
        np.copyto(np.empty(count, np.float32), 1.0)

    def fill_warm(i: int) -> None:
        np.copyto(warm[i], 2.0)

    def rate(fill, threads: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            workers = [threading.Thread(target=fill, args=(i,)) for i in range(threads)]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - t0)
        return threads * nbytes / best / 1e9

    return {
        f"{kind}_{t}t_gbps": rate(fn, t)
        for kind, fn in (("fresh", fill_fresh), ("warm", fill_warm))
        for t in (1, 2)
    }


def cpu_ms_per_image(fn, batch: int, repeats: int = 3) -> float:
    """CPU time of the calling thread per image (min over repeats): for single-threaded runs a figure that
    other processes on a shared machine disturb far less than wall time."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best / batch * 1e3


def check_llava(images: list[np.ndarray], processor: Any) -> dict[str, Any]:
    """C++ vs the processor on these images: float32 must be bit-equal, float16 the float32 rounded."""
    ref = processor(images, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    got32 = tiling.anyres_batch(images, grid_pinpoints=PINPOINTS, dtype="float32")
    got16 = tiling.anyres_batch(images, grid_pinpoints=PINPOINTS, dtype="float16")
    max_diff = max(float(np.abs(g - r[: len(g)]).max()) for g, r in zip(got32, ref))
    exact32 = all(np.array_equal(g, r[: len(g)]) for g, r in zip(got32, ref))
    exact16 = all(np.array_equal(g, r[: len(g)].astype(np.float16)) for g, r in zip(got16, ref))
    return {
        "views": int(got32[0].shape[0]),
        "max_abs_diff": max_diff,
        "exact_fp32": exact32,
        "exact_fp16": exact16,
    }


def check_qwen(images: list[np.ndarray], processor: Any) -> dict[str, Any]:
    ref = processor(images, return_tensors="np", input_data_format="channels_last")
    got = tiling.qwen2vl_batch(images, **QWEN)
    pv = np.concatenate([g for g, _ in got])
    grids = [list(g) for _, g in got]
    return {
        "patches": int(pv.shape[0] // len(images)),
        "max_abs_diff": float(np.abs(pv - ref["pixel_values"]).max()),
        "exact_fp32": bool(
            np.array_equal(pv, ref["pixel_values"]) and grids == ref["image_grid_thw"].tolist()
        ),
    }


def check_phi3v(images: list[np.ndarray], num_crops: int) -> dict[str, Any]:
    """C++ vs the Python reference on these images: pixels within 1/255 (normalisation undone), crops
    bit-equal, same HD sizes and token counts."""
    from vlm2vec_rt.preprocess.phi3v import phi3v_reference

    std = np.asarray(tiling.CLIP_STD, np.float64).reshape(1, 3, 1, 1)
    got = tiling.phi3v_batch(images, num_crops=num_crops)
    ref = [phi3v_reference(image, num_crops=num_crops) for image in images]
    errors = [np.abs(g[0].astype(np.float64) - r[0]) * std * 255 for g, r in zip(got, ref)]
    return {
        "views": int(got[0][0].shape[0]),
        "image_size": list(got[0][1]),
        "num_img_tokens": got[0][2],
        "max_pixel_error_255": max(float(e.max()) for e in errors),
        "max_abs_diff_global_view": max(float(np.abs(g[0][0] - r[0][0]).max()) for g, r in zip(got, ref)),
        "crops_exact": all(np.array_equal(g[0][1:], r[0][1:]) for g, r in zip(got, ref)),
        "same_sizes_and_tokens": all(g[1:] == r[1:] for g, r in zip(got, ref)),
    }


def main(out_dir: str | Path | None = None, *, batch: int = 32, repeats: int = 5, warmup: int = 1) -> dict:
    """Run every case, write tiling.json + tiling.png into out_dir (default bench/results); returns the results."""
    from transformers import LlavaNextImageProcessorPil, Qwen2VLImageProcessorPil

    llava = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=PINPOINTS
    )
    qwen = Qwen2VLImageProcessorPil(**QWEN)
    config = {
        "batch": batch,
        "repeats": repeats,
        "warmup": warmup,
        "grid_pinpoints": PINPOINTS,
        "crop_size": 336,
        "threads": list(THREADS),
        "dtypes": list(DTYPES),
        "baseline": "transformers LlavaNextImageProcessorPil / Qwen2VLImageProcessorPil on the same list of images",
        "phi3v_baseline": "vlm2vec_rt.preprocess.phi3v.phi3v_reference (the official Phi3VImageProcessor's "
        "operations: Pillow resize and pad, numpy normalisation, torch bicubic interpolate), image by image",
        "phi3v_sizes": list(PHI3V_SIZES),
        "phi3v_num_crops": list(PHI3V_CROPS),
        "images": "scikit-learn/scikit-image sample photos, random crops resized to each size (Pillow bicubic)",
    }
    # The machines are shared: the load says how far the absolute figures can be trusted (ratios hold better).
    results: dict[str, Any] = {"config": config, "load_average_start": list(os.getloadavg()), "cases": []}
    biggest = 17 * 3 * 336 * 336 * 4
    results["write_bandwidth"] = bw = write_bandwidth(biggest)
    print(f"write bandwidth (GB/s): {', '.join(f'{k[:-5]} {v:.1f}' for k, v in bw.items())}", flush=True)
    failures = []

    for name, (h, w) in SIZES.items():
        images = make_images(h, w, batch, seed=h * 7 + w)
        check = check_llava(images, llava)
        print(f"anyres {name}: {check}", flush=True)
        if not (check["exact_fp32"] and check["exact_fp16"]):
            failures.append(f"anyres {name}: outputs differ from transformers ({check})")
        fns = {
            "transformers": lambda images=images: llava(
                images, return_tensors="np", input_data_format="channels_last"
            )
        }
        for dtype in DTYPES:
            for t in THREADS:
                fns[f"cpp_{dtype}_{t}t"] = lambda images=images, dtype=dtype, t=t: tiling.anyres_batch(
                    images, grid_pinpoints=PINPOINTS, dtype=dtype, num_threads=t
                )
        times = ab_times(fns, repeats=repeats, warmup=warmup)
        cpu = {k: cpu_ms_per_image(f, batch) for k, f in fns.items() if not k.endswith("2t")}
        results["cases"] += _summarise(
            "llava_next anyres", name, check, times, cpu, batch, bw, check["views"] * 3 * 336 * 336
        )

    images = make_images(600, 800, batch, seed=1)
    check = check_qwen(images, qwen)
    print(f"qwen2vl 800x600: {check}", flush=True)
    if not check["exact_fp32"]:
        failures.append(f"qwen2vl 800x600: outputs differ from transformers ({check})")
    fns = {"transformers": lambda: qwen(images, return_tensors="np", input_data_format="channels_last")}
    for t in THREADS:
        fns[f"cpp_float32_{t}t"] = lambda t=t: tiling.qwen2vl_batch(images, num_threads=t, **QWEN)
    times = ab_times(fns, repeats=repeats, warmup=warmup)
    cpu = {k: cpu_ms_per_image(f, batch) for k, f in fns.items() if not k.endswith("2t")}
    results["cases"] += _summarise(
        "qwen2_vl", "800x600", check, times, cpu, batch, bw, check["patches"] * 3 * 2 * 14 * 14
    )

    from vlm2vec_rt.preprocess.phi3v import phi3v_reference

    for name, (h, w) in PHI3V_SIZES.items():
        images = make_images(h, w, batch, seed=h * 11 + w)
        for num_crops in PHI3V_CROPS:
            check = check_phi3v(images, num_crops)
            label = f"{name} nc{num_crops}"
            print(f"phi3v {label}: {check}", flush=True)
            if not (
                check["max_pixel_error_255"] <= 1.0
                and check["crops_exact"]
                and check["same_sizes_and_tokens"]
            ):
                failures.append(f"phi3v {label}: outputs differ from the reference ({check})")
            fns = {
                "python_reference": lambda images=images, nc=num_crops: [
                    phi3v_reference(image, num_crops=nc) for image in images
                ]
            }
            for t in THREADS:
                fns[f"cpp_float32_{t}t"] = lambda images=images, nc=num_crops, t=t: tiling.phi3v_batch(
                    images, num_crops=nc, num_threads=t
                )
            times = ab_times(fns, repeats=repeats, warmup=warmup)
            cpu = {k: cpu_ms_per_image(f, batch) for k, f in fns.items() if not k.endswith("2t")}
            results["cases"] += _summarise(
                "phi3_v",
                label,
                check,
                times,
                cpu,
                batch,
                bw,
                check["views"] * 3 * 336 * 336,
                baseline="python_reference",
            )

    results["failures"] = failures
    results["load_average_end"] = list(os.getloadavg())
    target = next(c for c in results["cases"] if c["size"] == "1344x1344" and c["impl"] == "cpp_float32_2t")
    results["headline"] = {
        "case": "anyres 1344x1344, float32, 2 threads",
        "speedup_vs_transformers": target["speedup"],
        "target": 10.0,
        "met": target["speedup"] >= 10.0,
    }
    phi3v = {
        c["size"]: c["speedup"]
        for c in results["cases"]
        if c["pipeline"] == "phi3_v" and c["impl"] == "cpp_float32_2t"
    }
    results["headline_phi3v"] = {
        "case": "phi3_v, float32, 2 threads, every size and num_crops",
        "speedup_vs_python_reference": phi3v,
        "target": 10.0,
        "met": min(phi3v.values()) >= 10.0,
    }
    write_results("tiling", results, out_dir)
    _plot(results, out_dir)
    for c in results["cases"]:
        bound = (
            f", {c['of_fresh_write_bound']:.0%} of the fresh-write bound"
            if "of_fresh_write_bound" in c
            else ""
        )
        cpu = (
            f"; cpu {c['cpu_ms_per_image']:.2f} ms/img x{c['cpu_speedup']:.1f}" if "cpu_speedup" in c else ""
        )
        print(
            f"{c['pipeline']:18s} {c['size']:9s} {c['impl']:16s} {c['images_per_s']:8.1f} img/s "
            f"(median {c['ms_per_image']:.2f} ms/img, x{c['speedup']:.1f}{bound}{cpu})"
        )
    for f in failures:
        print("FAIL:", f)
    return results


def _summarise(
    pipeline: str,
    size: str,
    check: dict,
    times: dict,
    cpu: dict,
    batch: int,
    bw: dict,
    values: int,
    *,
    baseline: str = "transformers",
) -> list[dict]:
    base = float(np.median(times[baseline]))
    cases = []
    for impl, ts in times.items():
        med = float(np.median(ts))
        case = {
            "pipeline": pipeline,
            "size": size,
            "impl": impl,
            "batch": batch,
            "check": check,
            "per_batch": stats(ts),
            "ms_per_image": med / batch * 1e3,
            "images_per_s": batch / med,
            "speedup": base / med,
            "baseline": baseline,
        }
        if impl in cpu:  # single-threaded runs: CPU time per image, and its ratio
            case["cpu_ms_per_image"] = cpu[impl]
            case["cpu_speedup"] = cpu[baseline] / cpu[impl]
        if impl != baseline:
            threads = 2 if impl.endswith("2t") else 1
            out_bytes = values * (2 if "float16" in impl else 4)
            case["output_bytes_per_image"] = out_bytes
            for kind in ("fresh", "warm"):
                bound = bw[f"{kind}_{threads}t_gbps"] * 1e9 / out_bytes  # images/s if only writing mattered
                case[f"{kind}_write_bound_images_per_s"] = bound
                case[f"of_{kind}_write_bound"] = case["images_per_s"] / bound
        cases.append(case)
    return cases


def _plot(results: dict, out_dir: str | Path | None) -> None:
    plt = pyplot()
    cases = results["cases"]
    groups = list(dict.fromkeys((c["pipeline"], c["size"]) for c in cases))
    impls = list(dict.fromkeys(c["impl"] for c in cases))
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        placed = [
            (i + (j - (len(impls) - 1) / 2) * width, c)
            for i, g in enumerate(groups)
            for c in cases
            if (c["pipeline"], c["size"]) == g and c["impl"] == impl
        ]
        ax.bar([x for x, _ in placed], [c["images_per_s"] for _, c in placed], width, label=impl)
        for x, c in placed:
            ax.annotate(f"x{c['speedup']:.1f}", (x, c["images_per_s"]), ha="center", va="bottom", fontsize=6)
            if "fresh_write_bound_images_per_s" in c:
                bound = c["fresh_write_bound_images_per_s"]
                ax.plot([x - width / 2, x + width / 2], [bound, bound], color="black", lw=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{p}\n{s}" for p, s in groups])
    ax.set_yscale("log")
    ax.set_ylabel("images / s (log)")
    ax.set_title(
        f"C++ tiling vs transformers' processor (Phi-3.5-V: vs the Python reference), batch "
        f"{results['config']['batch']} "
        "(black lines: fresh-output write-bandwidth bound)"
    )
    ax.legend(fontsize=7, ncol=3)
    save_plot(fig, "tiling", out_dir)
    plt.close(fig)


def summary(results: dict) -> list[str]:
    """Headline lines for `vlm2vec-rt bench`'s SUMMARY.md."""
    lines = []
    h = results["headline"]
    lines.append(
        f"{h['case']}: {h['speedup_vs_transformers']:.1f}x transformers' processor (target {h['target']:.0f}x)"
    )
    if "headline_phi3v" in results:
        h = results["headline_phi3v"]
        worst = min(h["speedup_vs_python_reference"].values())
        lines.append(f"{h['case']}: at least {worst:.1f}x the Python reference (target {h['target']:.0f}x)")
    for c in results["cases"]:
        if c["impl"] in ("cpp_float32_1t", "cpp_float32_2t"):
            bound = c.get("of_fresh_write_bound")
            lines.append(
                f"{c['pipeline']} {c['size']} {c['impl']}: {c['ms_per_image']:.2f} ms/image, "
                f"{c['speedup']:.1f}x {c.get('baseline', 'transformers')}"
                + (f", {100 * bound:.0f}% of the write-bandwidth bound" if bound else "")
            )
    return lines


def _cli() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args()
    results = main(args.out, batch=args.batch, repeats=args.repeats)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(_cli())
