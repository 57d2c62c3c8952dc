"""MMEB evaluation: the 36 datasets, the official MMEB-eval format, exact scoring, reports, a bundled benchmark.

from vlm2vec_rt import eval as mmeb
scores = mmeb.evaluate(encoder, "MMEB-eval/", out_dir="runs/a")   # dataset -> Precision@1
mmeb.aggregate(scores)   # Classification, VQA, Retrieval, Grounding, IND, OOD, Overall
paths = mmeb.write_bundled()   # a small real-image benchmark (eval + train splits) to try it on
"""

from __future__ import annotations

from .aggregate import aggregate
from .bundled import BundledPaths, default_bundled_root, write_bundled
from .evaluation import EvalRun, evaluate, run_evaluation
from .registry import BUNDLED_DATASETS, DATASETS, META_TASKS, DatasetInfo
from .report import compare, write_comparison
from .results import load_results

__all__ = [
    "BUNDLED_DATASETS",
    "DATASETS",
    "META_TASKS",
    "BundledPaths",
    "DatasetInfo",
    "EvalRun",
    "aggregate",
    "compare",
    "default_bundled_root",
    "evaluate",
    "load_results",
    "run_evaluation",
    "write_bundled",
    "write_comparison",
]
