"""Reports of an evaluation: the table papers print (text, Markdown), results.json, a PNG bar chart,
and the side-by-side comparison of two runs (A, B and B - A in points).

Everything is rendered from the results.json dictionary, so a run read back from disk reports exactly
like a fresh one. Scores are stored as fractions and shown as percentages with one decimal.
Files are written atomically; the PNG needs matplotlib (skipped with a warning without it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .. import atomic
from .aggregate import AGGREGATE_KEYS
from .results import load_results, save_results

log = logging.getLogger("vlm2vec_rt")

RESULTS_FILES = ("results.json", "results.md", "results.png")
COMPARISON_FILES = ("comparison.json", "comparison.md", "comparison.png")
_META_COLORS = {"Classification": "#4c72b0", "VQA": "#dd8452", "Retrieval": "#55a868", "Grounding": "#c44e52"}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _diff(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.1f}"


def _dataset_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, d in results["datasets"].items():
        lo, hi = d["candidates_per_query"]
        rows.append(
            [
                name,
                d["meta_task"] or "?",
                d["split"] or "?",
                str(d["queries"]),
                str(lo) if lo == hi else f"{lo}-{hi}",
                _pct(d["precision_at_1"]),
                _pct(d["hit_at_5"]),
                _pct(d["mrr"]),
                str(d["skipped_rows"]),
            ]
        )
    return rows


_DATASET_HEADER = ["Dataset", "Meta-task", "Split", "Queries", "Cands", "P@1", "Hit@5", "MRR", "Skipped"]


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _aggregate_row(agg: dict) -> list[str]:
    return [_pct(agg.get(k)) for k in AGGREGATE_KEYS]


def _notes(results: dict) -> list[str]:
    notes = []
    if results.get("not_aggregated"):
        notes.append(
            f"not in the aggregates (unknown to the registry): {', '.join(results['not_aggregated'])}"
        )
    for s in results.get("skipped", []):
        where = s["dataset"] if s["row"] is None else f"{s['dataset']} row {s['row']}"
        paths = f" ({', '.join(s['paths'][:3])}{' ...' if len(s['paths']) > 3 else ''})" if s["paths"] else ""
        notes.append(f"skipped {where}: {s['reason']}{paths}")
    return notes


def format_results(results: dict) -> str:
    """The per-dataset and aggregate tables as aligned plain text (what the CLI prints)."""
    parts = [
        f"MMEB evaluation of {results['label']} (Precision@1 x 100, ties: {results['ties']}, "
        f"profile: {results.get('profile')})",
        _text_table(_DATASET_HEADER, _dataset_rows(results)),
        "",
        _text_table(list(AGGREGATE_KEYS), [_aggregate_row(results["aggregate"])]),
    ]
    notes = _notes(results)
    if notes:
        parts += ["", *notes[:20]]
        if len(notes) > 20:
            parts.append(f"... and {len(notes) - 20} more (see results.json)")
    parts.append(
        f"\n{results['timing']['items_encoded']} items encoded in {results['timing']['seconds']:.1f} s"
    )
    return "\n".join(parts)


def results_markdown(results: dict) -> str:
    """The same tables in Markdown, with what was evaluated and how."""
    parts = [
        f"# MMEB evaluation: {results['label']}",
        "",
        f"Data: `{results['data_dir']}`; images: `{results['image_root']}`; model fingerprint: "
        f"`{results['fingerprint']}`; Precision@1 x 100 (ties: {results['ties']}, profile: "
        f"{results.get('profile')}); {results['created']}.",
        "",
        "## Aggregates",
        "",
        _md_table(list(AGGREGATE_KEYS), [_aggregate_row(results["aggregate"])]),
        "",
        "## Datasets",
        "",
        _md_table(_DATASET_HEADER, _dataset_rows(results)),
    ]
    notes = _notes(results)
    if notes:
        parts += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(parts) + "\n"


def write_reports(run_or_results: Any, out_dir: str | os.PathLike) -> dict:
    """Write results.json, results.md and results.png into out_dir; returns the results dictionary."""
    results = run_or_results if isinstance(run_or_results, dict) else run_or_results.as_dict()
    out = Path(out_dir)
    save_results(results, out)
    atomic.write_bytes(out / "results.md", results_markdown(results).encode())
    _plot(out / "results.png", _results_figure, results)
    return results


# ---- comparison ------------------------------------------------------------------------------------
def compare(a: dict, b: dict) -> dict:
    """Two runs side by side: per dataset and aggregate, A, B and B - A (fractions; None where absent)."""

    def entry(x, y):
        return {"a": x, "b": y, "diff": None if x is None or y is None else y - x}

    names = list(a["datasets"]) + [n for n in b["datasets"] if n not in a["datasets"]]
    datasets = {}
    for n in names:
        da, db = a["datasets"].get(n), b["datasets"].get(n)
        info = da or db
        datasets[n] = {
            "meta_task": info["meta_task"],
            "split": info["split"],
            **{m: entry(da and da[m], db and db[m]) for m in ("precision_at_1", "hit_at_5", "mrr")},
        }
    return {
        "format": "vlm2vec-rt/mmeb-comparison",
        "version": 1,
        "a": {"label": a["label"], "fingerprint": a["fingerprint"], "data_dir": a["data_dir"]},
        "b": {"label": b["label"], "fingerprint": b["fingerprint"], "data_dir": b["data_dir"]},
        "datasets": datasets,
        "aggregate": {k: entry(a["aggregate"].get(k), b["aggregate"].get(k)) for k in AGGREGATE_KEYS},
        "only_in_a": [n for n in a["datasets"] if n not in b["datasets"]],
        "only_in_b": [n for n in b["datasets"] if n not in a["datasets"]],
    }


def _comparison_tables(cmp: dict) -> tuple[list[str], list[list[str]], list[list[str]]]:
    header = ["", "A", "B", "B - A"]
    rows = [
        [
            n,
            _pct(d["precision_at_1"]["a"]),
            _pct(d["precision_at_1"]["b"]),
            _diff(d["precision_at_1"]["diff"]),
        ]
        for n, d in cmp["datasets"].items()
    ]
    agg = [[k, _pct(e["a"]), _pct(e["b"]), _diff(e["diff"])] for k, e in cmp["aggregate"].items()]
    return header, rows, agg


def format_comparison(cmp: dict) -> str:
    """The comparison as aligned plain text."""
    header, rows, agg = _comparison_tables(cmp)
    return "\n".join(
        [
            f"A: {cmp['a']['label']}",
            f"B: {cmp['b']['label']}",
            "Precision@1 x 100; B - A in points",
            _text_table(["Dataset", *header[1:]], rows),
            "",
            _text_table(["Aggregate", *header[1:]], agg),
        ]
    )


def write_comparison(a_dir: str | os.PathLike, b_dir: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Compare two run directories; writes comparison.json, .md and .png into out_dir and returns the dict."""
    cmp = compare(load_results(a_dir), load_results(b_dir))
    header, rows, agg = _comparison_tables(cmp)
    md = "\n".join(
        [
            "# MMEB comparison",
            "",
            f"- A: {cmp['a']['label']} (`{cmp['a']['fingerprint']}`)",
            f"- B: {cmp['b']['label']} (`{cmp['b']['fingerprint']}`)",
            "",
            "Precision@1 x 100; B - A in points.",
            "",
            _md_table(["Aggregate", *header[1:]], agg),
            "",
            _md_table(["Dataset", *header[1:]], rows),
            "",
        ]
    )
    out = Path(out_dir)
    atomic.write_json(out / "comparison.json", cmp)
    atomic.write_bytes(out / "comparison.md", md.encode())
    _plot(out / "comparison.png", _comparison_figure, cmp)
    return cmp


# ---- charts ----------------------------------------------------------------------------------------
def _plot(path: Path, draw, data: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: %s not written (pip install matplotlib)", path.name)
        return
    fig = draw(plt, data)
    try:
        with atomic.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


def _results_figure(plt, results: dict):
    names = list(results["datasets"])
    values = [100 * results["datasets"][n]["precision_at_1"] for n in names]
    colors = [_META_COLORS.get(results["datasets"][n]["meta_task"], "#8c8c8c") for n in names]
    agg_keys = [k for k in AGGREGATE_KEYS if results["aggregate"].get(k) is not None]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(11, max(3.0, 0.28 * len(names) + 1.2)), gridspec_kw={"width_ratios": [3, 1.3]}
    )
    ax1.barh(range(len(names)), values, color=colors)
    ax1.set_yticks(range(len(names)), names, fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 100)
    ax1.set_xlabel("Precision@1 (%)")
    for i, v in enumerate(values):
        ax1.text(min(v + 1, 88), i, f"{v:.1f}", va="center", fontsize=7)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _META_COLORS.values()]
    ax1.legend(handles, list(_META_COLORS), fontsize=7, loc="lower right")
    ax2.bar(range(len(agg_keys)), [100 * results["aggregate"][k] for k in agg_keys], color="#4c4c4c")
    ax2.set_xticks(range(len(agg_keys)), agg_keys, rotation=45, ha="right", fontsize=8)
    ax2.set_ylim(0, 100)
    ax2.set_title("Aggregates", fontsize=9)
    fig.suptitle(f"MMEB Precision@1: {results['label']}", fontsize=10)
    fig.tight_layout()
    return fig


def _comparison_figure(plt, cmp: dict):
    import numpy as np

    names = list(cmp["datasets"]) + [f"[{k}]" for k in cmp["aggregate"]]
    entries = list(cmp["datasets"].values()) + [{"precision_at_1": e} for e in cmp["aggregate"].values()]

    def val(e, side):
        v = e["precision_at_1"][side]
        return np.nan if v is None else 100 * v

    a = [val(e, "a") for e in entries]
    b = [val(e, "b") for e in entries]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.32 * len(names) + 1.2)))
    ax.barh(y - 0.2, a, height=0.4, label=f"A: {cmp['a']['label']}"[:60], color="#4c72b0")
    ax.barh(y + 0.2, b, height=0.4, label=f"B: {cmp['b']['label']}"[:60], color="#dd8452")
    for i, (x, z) in enumerate(zip(a, b)):
        if not (np.isnan(x) or np.isnan(z)):
            ax.text(max(x, z) + 1, i, f"{z - x:+.1f}", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel("Precision@1 (%); label: B - A in points")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
