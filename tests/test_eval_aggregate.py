"""The MMEB registry and aggregation: 36 datasets as MMEB.md lists them; published aggregates reproduced."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlm2vec_rt import InputError
from vlm2vec_rt import eval as mmeb

# MMEB.md: the published Cls, VQA, Ret, Grd, IND, OOD, Overall rows (Precision@1 x 100).
PUBLISHED = {
    "VLM2Vec Phi-3.5-V LoRA": (54.8, 54.9, 62.3, 79.5, 66.5, 52.0, 60.1),
    "VLM2Vec LLaVA-1.6 LoRA 1344": (61.2, 49.9, 67.4, 86.1, 67.5, 57.1, 62.9),
    "VLM2Vec Qwen2-VL-7B LoRA": (62.6, 57.8, 69.9, 81.7, 72.2, 57.8, 65.8),
    "VLM2Vec-V2 Qwen2-VL-2B": (62.9, 56.3, 69.5, 77.3, 68.8, 60.0, 64.9),
}

# Per-dataset hit@1 x 100 of Qwen3-VL-Embedding-8B on the 36 image sets, the leaderboard column of
# TIGER-AI-Lab/VLM2Vec docs/mmebv2_reproduction/results_qwen3vl8b.md, whose published plain mean is 80.12.
QWEN3_VL_8B = {
    "A-OKVQA": 72.9, "CIRR": 74.9, "ChartQA": 74.3, "Country211": 27.3, "DocVQA": 96.3, "EDIS": 96.3,
    "FashionIQ": 44.5, "GQA": 92.6, "HatefulMemes": 77.5, "ImageNet-1K": 81.9, "ImageNet-A": 77.1,
    "ImageNet-R": 93.9, "InfographicsVQA": 88.4, "MSCOCO": 86.3, "MSCOCO_i2t": 79.1, "MSCOCO_t2i": 81.1,
    "N24News": 80.6, "NIGHTS": 72.7, "OK-VQA": 77.8, "OVEN": 79.2, "ObjectNet": 79.9, "Place365": 47.6,
    "RefCOCO": 95.7, "RefCOCO-Matching": 91.1, "SUN397": 82.7, "ScienceQA": 81.0, "TextVQA": 92.8,
    "VOC2007": 93.4, "VisDial": 87.6, "Visual7W": 70.9, "Visual7W-Pointing": 96.1, "VisualNews_i2t": 85.7,
    "VisualNews_t2i": 81.1, "VizWiz": 64.4, "WebQA": 91.8, "Wiki-SS-NQ": 87.9,
}  # fmt: skip


def test_registry_matches_mmeb_md():
    d = mmeb.DATASETS
    assert len(d) == 36
    count = {
        (m, s): sum(1 for i in d.values() if (i.meta_task, i.split) == (m, s))
        for m in mmeb.META_TASKS
        for s in ("IND", "OOD")
    }
    assert count == {
        ("Classification", "IND"): 5, ("Classification", "OOD"): 5,
        ("VQA", "IND"): 6, ("VQA", "OOD"): 4,
        ("Retrieval", "IND"): 8, ("Retrieval", "OOD"): 4,
        ("Grounding", "IND"): 1, ("Grounding", "OOD"): 3,
    }  # fmt: skip
    assert {n: d[n].num_candidates for n in ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397")} == {
        "ImageNet-1K": 1000, "N24News": 24, "HatefulMemes": 2, "VOC2007": 20, "SUN397": 397,
    }  # fmt: skip
    assert d["MSCOCO_t2i"].instruction == "Find me an everyday image that matches the given caption: "
    assert (d["NIGHTS"].query, d["NIGHTS"].candidates) == ("image", "image")
    assert (d["WebQA"].query, d["WebQA"].candidates) == ("text", "image+text")
    assert set(QWEN3_VL_8B) == set(d)


@pytest.mark.parametrize("model", list(PUBLISHED))
def test_published_meta_task_rows_give_published_overall(model):
    cls, vqa, ret, grd, ind, ood, overall = PUBLISHED[model]
    by_meta = {"Classification": cls, "VQA": vqa, "Retrieval": ret, "Grounding": grd}
    # Every dataset at its meta-task's published score: meta-task means come back exactly, and Overall
    # (a mean over the 36 datasets, so weighted 10/10/12/4) matches the published one to rounding.
    agg = mmeb.aggregate({n: by_meta[i.meta_task] for n, i in mmeb.DATASETS.items()})
    for key, value in by_meta.items():
        assert agg[key] == pytest.approx(value)
    assert agg["Overall"] == pytest.approx(overall, abs=0.05 + 1e-9)
    # The mean of the four meta-task scores is not MMEB's Overall.
    assert abs(np.mean(list(by_meta.values())) - overall) > 0.5
    # The same from the IND/OOD side (20 and 16 datasets).
    agg = mmeb.aggregate({n: ind if i.split == "IND" else ood for n, i in mmeb.DATASETS.items()})
    assert (agg["IND"], agg["OOD"]) == (pytest.approx(ind), pytest.approx(ood))
    assert agg["Overall"] == pytest.approx(overall, abs=0.05 + 1e-9)


def test_published_per_dataset_numbers_give_published_mean():
    agg = mmeb.aggregate(QWEN3_VL_8B)
    assert round(agg["Overall"], 2) == 80.12
    for key in ("Classification", "VQA", "Retrieval", "Grounding"):
        members = [v for n, v in QWEN3_VL_8B.items() if mmeb.DATASETS[n].meta_task == key]
        assert agg[key] == pytest.approx(sum(members) / len(members))
    assert agg["Grounding"] == pytest.approx((86.3 + 96.1 + 95.7 + 91.1) / 4)


def test_aggregate_subsets_and_errors():
    agg = mmeb.aggregate({"VOC2007": 0.5, "NIGHTS": 0.25, "RefCOCO": np.float32(1.0)})
    assert agg["Classification"] == 0.5 and agg["Retrieval"] == 0.25 and agg["Grounding"] == 1.0
    assert agg["VQA"] is None
    assert agg["IND"] == pytest.approx(0.375) and agg["OOD"] == 1.0
    assert agg["Overall"] == pytest.approx(1.75 / 3)
    assert set(agg) == {"Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall"}
    with pytest.raises(InputError, match="NotADataset"):
        mmeb.aggregate({"VOC2007": 0.5, "NotADataset": 0.1})
    with pytest.raises(InputError, match="VOC2007"):
        mmeb.aggregate({"VOC2007": math.nan})
    # The bundled benchmark's datasets are known too.
    assert mmeb.aggregate({"Digits": 0.9, "PhotoPairs": 0.5})["OOD"] == 0.5
