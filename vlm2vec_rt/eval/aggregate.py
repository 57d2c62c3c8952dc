"""MMEB's aggregate scores: plain means per meta-task, per IND/OOD split, and over all datasets."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from ..errors import InputError
from .registry import META_TASKS, SPLITS, DatasetInfo, known_datasets

AGGREGATE_KEYS = (*META_TASKS, *SPLITS, "Overall")


def aggregate(
    scores: Mapping[str, float], *, infos: Mapping[str, DatasetInfo] | None = None
) -> dict[str, float | None]:
    """Aggregate per-dataset scores the way MMEB reports them.

    Returns the keys "Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall": each
    the plain mean over the datasets given that belong to it; "Overall" is the mean over all datasets
    given (not the mean of the four meta-task scores, which weighs a Grounding set 2.5x a
    Retrieval one). A key none of the given datasets belongs to is None. Scores are taken as they
    come (fractions or percentages alike).

    infos: name -> DatasetInfo; default the 36 MMEB datasets and the bundled benchmark's.
    Unknown dataset names and non-finite scores raise InputError.
    """
    infos = known_datasets() if infos is None else infos
    unknown = sorted(set(scores) - set(infos))
    if unknown:
        raise InputError(
            f"unknown dataset name(s) {unknown}: aggregate knows the 36 MMEB datasets and the bundled ones"
        )
    groups: dict[str, list[float]] = {key: [] for key in AGGREGATE_KEYS}
    for name, value in scores.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise InputError(f"dataset {name!r}: score must be a finite number, got {value!r}")
        info = infos[name]
        for key in (info.meta_task, info.split, "Overall"):
            groups[key].append(float(value))
    return {key: (math.fsum(v) / len(v) if v else None) for key, v in groups.items()}
