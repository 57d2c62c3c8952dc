"""evaluate() end to end on small MMEB-eval datasets written here, with stub encoders of known vectors:
exact Precision@1, deduplication, errors naming dataset/row/path, --skip-missing, resume from the cache,
encoders of any shape, and 2-process torchrun (gloo) giving the single-process result."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm2vec_rt import InputError
from vlm2vec_rt import eval as mmeb
from vlm2vec_rt.eval.results import load_results

QRY = "<|image_1|>\nIdentify the object shown in the image\n"
IMG_TGT = "<|image_1|>\nRepresent the given image.\n"


# ---- helpers --------------------------------------------------------------------------------------------
def write_dataset(data_dir: Path, name: str, rows: list[tuple], *, images: tuple[str, ...] = ()) -> None:
    """rows: (qry_text, qry_img_path, tgt_text list, tgt_img_path list); images: paths to create."""
    rng = np.random.default_rng(len(name))
    for rel in images:
        path = data_dir / "eval_images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(path)
    s, ls = pa.string(), pa.list_(pa.string())
    cols = list(zip(*rows))
    table = pa.table(
        {
            "qry_text": pa.array(cols[0], s),
            "qry_img_path": pa.array(cols[1], s),
            "tgt_text": pa.array(cols[2], ls),
            "tgt_img_path": pa.array(cols[3], ls),
        }
    )
    (data_dir / name).mkdir(parents=True, exist_ok=True)
    pq.write_table(table, data_dir / name / "test-00000-of-00001.parquet")


def item_key(item) -> tuple[str, str]:
    """(text, "<folder>/<file>" of the image or "")."""
    image = "" if item.image is None else "/".join(Path(item.image).parts[-2:])
    return (item.text or "", image)


class TableEncoder:
    """Fixed vectors: by image file name for items with an image, else by text. Records what it encodes."""

    fingerprint = "table-encoder-v1"

    def __init__(self, table: dict[str, tuple[float, ...]]):
        self.table = table
        self.seen: list[tuple[str, str]] = []

    def encode(self, items, *, batch_size=16, progress=False):
        keys = [item_key(it) for it in items]
        self.seen += keys
        return np.array([self.table[os.path.basename(img) or text] for text, img in keys], dtype=np.float32)


class HashEncoder:
    """Pseudo-random vectors from a hash of (text, image name); can stop after `limit` items (a kill)."""

    def __init__(self, dim: int = 8, limit: int | None = None, fingerprint: str | None = "hash-v1"):
        self.dim, self.limit, self.seen = dim, limit, []
        if fingerprint:
            self.fingerprint = fingerprint

    def encode(self, items, *, batch_size=16, progress=False):
        if self.limit is not None and len(self.seen) + len(items) > self.limit:
            raise KeyboardInterrupt  # interrupted between two chunks
        out = []
        for it in items:
            key = item_key(it)
            self.seen.append(key)
            seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")
            out.append(np.random.default_rng(seed).standard_normal(self.dim))
        return np.asarray(out, dtype=np.float32)


def hand_dataset(data_dir: Path) -> None:
    words = ["cat", "dog", "car", "bus"]
    rows = [
        (QRY, "VOC2007/a.png", ["cat", "dog", "car", "bus"], [""] * 4),  # rank 1
        (QRY, "VOC2007/b.png", ["car", "cat", "dog", "bus"], [""] * 4),  # car ties bus: rank 1 (strict: 2)
        (QRY, "VOC2007/c.png", ["cat", "dog", "car", "bus"], [""] * 4),  # dog wins: rank 2
        (QRY, "VOC2007/b.png", ["bus", "cat", "dog"], [""] * 3),  # rank 1 (shorter list)
        (QRY, "VOC2007/c.png", ["dog", "cat", "dog"], [""] * 3),  # the positive repeated: rank 1
    ]
    assert all(t in words for r in rows for t in r[2])
    write_dataset(data_dir, "VOC2007", rows, images=("VOC2007/a.png", "VOC2007/b.png", "VOC2007/c.png"))


HAND_TABLE = {
    "cat": (1, 0, 0),
    "dog": (0, 1, 0),
    "car": (0, 0, 1),
    "bus": (0, 0, 1),
    "a.png": (1, 0.1, 0),
    "b.png": (0, 0, 1),
    "c.png": (0.2, 1, 0),
}


def many_dataset(data_dir: Path, name: str, n: int, k: int, seed: int) -> None:
    """n text->image queries, k image candidates each from a pool of 2n images."""
    rng = np.random.default_rng(seed)
    pool = [f"{name}/img{i}.png" for i in range(2 * n)]
    rows = []
    for i in range(n):
        cands = [pool[i], *[pool[j] for j in rng.choice(np.arange(n, 2 * n), k - 1, replace=False)]]
        rows.append((f"query number {i} for {name}", "", [IMG_TGT] * k, cands))
    write_dataset(data_dir, name, rows, images=tuple(pool))


# ---- exact scores ---------------------------------------------------------------------------------------
def test_precision_at_1_is_hand_computed(tmp_path):
    hand_dataset(tmp_path)
    enc = TableEncoder(HAND_TABLE)
    scores = mmeb.evaluate(enc, tmp_path, out_dir=tmp_path / "out")
    assert scores == {"VOC2007": pytest.approx(4 / 5)}  # the official argmax: the tie goes to the positive
    strict = mmeb.evaluate(TableEncoder(HAND_TABLE), tmp_path, ties="strict")
    assert strict == {"VOC2007": pytest.approx(3 / 5)}
    # Deduplicated: 3 distinct queries and 4 distinct labels, each embedded once.
    assert sorted(enc.seen) == sorted(
        [(QRY, f"VOC2007/{x}.png") for x in "abc"] + [("cat", ""), ("dog", ""), ("car", ""), ("bus", "")]
    )
    results = load_results(tmp_path / "out")
    d = results["datasets"]["VOC2007"]
    assert (d["hit_at_5"], d["mrr"]) == (1.0, pytest.approx((1 + 1 + 0.5 + 1 + 1) / 5))
    assert d["candidates_per_query"] == [3, 4] and d["unique_queries"] == 3 and d["unique_candidates"] == 4
    assert results["aggregate"]["Classification"] == pytest.approx(0.8)
    assert results["aggregate"]["Overall"] == pytest.approx(0.8)
    assert results["ties"] == "official" and results["profile"] is None  # a table encoder has no profile
    assert all((tmp_path / "out" / f).is_file() for f in ("results.json", "results.md", "results.png"))
    # "first", the official rule's older name, is still taken
    assert mmeb.evaluate(TableEncoder(HAND_TABLE), tmp_path, ties="first") == {
        "VOC2007": pytest.approx(4 / 5)
    }


# ---- bad data ---------------------------------------------------------------------------------------------
def test_bad_data_errors_name_dataset_row_and_path(tmp_path):
    enc = HashEncoder()
    hand_dataset(tmp_path)
    os.remove(tmp_path / "eval_images/VOC2007/c.png")
    with pytest.raises(InputError, match=r"VOC2007.*row 2: image file missing: .*VOC2007/c\.png"):
        mmeb.evaluate(enc, tmp_path)

    write_dataset(tmp_path, "NIGHTS", [("", "", [], [])])
    with pytest.raises(InputError, match=r"NIGHTS.*row 0: .*has neither text nor image"):
        mmeb.evaluate(enc, tmp_path, datasets=["NIGHTS"])
    write_dataset(tmp_path, "NIGHTS", [("a question", "", [], [])])
    with pytest.raises(InputError, match=r"'NIGHTS'.*row 0: empty candidate list"):
        mmeb.evaluate(enc, tmp_path, datasets="NIGHTS")

    with pytest.raises(InputError, match=r"'CIRR': no folder .*CIRR"):
        mmeb.evaluate(enc, tmp_path, datasets=["CIRR"])
    (tmp_path / "CIRR").mkdir()
    with pytest.raises(InputError, match=r"'CIRR': no test-\*\.parquet file in .*CIRR"):
        mmeb.evaluate(enc, tmp_path, datasets=["CIRR"])
    pq.write_table(
        pa.table({"qry_text": ["x"], "qry_img_path": [""]}), tmp_path / "CIRR/test-00000-of-00001.parquet"
    )
    with pytest.raises(
        InputError,
        match=r"'CIRR'.*test-00000-of-00001\.parquet.*lacks column\(s\) \['tgt_text', 'tgt_img_path'\]",
    ):
        mmeb.evaluate(enc, tmp_path, datasets=["CIRR"])
    (tmp_path / "CIRR/test-00000-of-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"'CIRR': cannot read .* as parquet"):
        mmeb.evaluate(enc, tmp_path, datasets=["CIRR"])
    write_dataset(tmp_path, "WebQA", [("q", "", ["a", "b"], [""])])
    with pytest.raises(InputError, match=r"'WebQA'.*row 0: tgt_text has 2 entries but tgt_img_path has 1"):
        mmeb.evaluate(enc, tmp_path, datasets=["WebQA"])
    write_dataset(tmp_path, "WebQA", [("<|image_1|>\nq\n", "", ["a"], [""])])
    with pytest.raises(InputError, match=r"'WebQA'.*row 0: query text holds <\|image_1\|> but no image"):
        mmeb.evaluate(enc, tmp_path, datasets=["WebQA"])


def test_skip_missing_reports_every_skip(tmp_path):
    hand_dataset(tmp_path)
    os.remove(tmp_path / "eval_images/VOC2007/c.png")  # rows 2 and 4
    write_dataset(tmp_path, "NIGHTS", [("q one", "", ["x", "y"], ["", ""]), ("q two", "", [], [])])
    (tmp_path / "CIRR").mkdir()  # no parquet
    out = tmp_path / "out"
    scores = mmeb.evaluate(
        TableEncoder({**HAND_TABLE, "q one": (1, 0, 0), "x": (1, 0, 0), "y": (0, 1, 0)}),
        tmp_path,
        datasets=["VOC2007", "NIGHTS", "CIRR"],
        out_dir=out,
        skip_missing=True,
    )
    assert scores == {"VOC2007": 1.0, "NIGHTS": 1.0}
    skipped = load_results(out)["skipped"]
    assert [(s["dataset"], s["row"], s["reason"]) for s in skipped] == [
        ("CIRR", None, skipped[0]["reason"]),
        ("VOC2007", 2, "image file missing"),
        ("VOC2007", 4, "image file missing"),
        ("NIGHTS", 1, "empty candidate list"),
    ]
    assert "no test-*.parquet" in skipped[0]["reason"]
    assert skipped[1]["paths"] == ["VOC2007/c.png"]
    assert "skipped VOC2007 row 2: image file missing (VOC2007/c.png)" in (out / "results.md").read_text()


# ---- resume, cache, encoders ----------------------------------------------------------------------------
def test_interrupted_run_resumes_without_reencoding(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    many_dataset(data, "MSCOCO_t2i", n=9, k=5, seed=1)  # 9 queries + 18 images
    many_dataset(data, "VisDial", n=11, k=6, seed=2)  # 11 queries + 22 images
    clean = mmeb.evaluate(HashEncoder(), data, chunk_size=4)
    first = HashEncoder(limit=9 + 18 + 11 + 8)  # all of MSCOCO_t2i, VisDial's queries, 2 chunks of images
    with pytest.raises(KeyboardInterrupt):
        mmeb.evaluate(first, data, out_dir=out, chunk_size=4)
    second = HashEncoder()
    assert mmeb.evaluate(second, data, out_dir=out, chunk_size=4) == clean
    assert not set(first.seen) & set(second.seen)  # nothing cached was encoded again
    assert len(second.seen) == 22 - 8
    third = HashEncoder()
    assert mmeb.evaluate(third, data, out_dir=out, chunk_size=4) == clean
    assert third.seen == []
    # Changed image content (size/mtime) invalidates that dataset's candidate embeddings only.
    img = data / "eval_images/VisDial/img3.png"
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(img)
    fourth = HashEncoder()
    mmeb.evaluate(fourth, data, out_dir=out, chunk_size=4)
    assert len(fourth.seen) == 22


def test_encoders_without_fingerprint_or_keywords(tmp_path, caplog):
    hand_dataset(tmp_path)

    class Plain:  # encode(items) only, returns a torch tensor, no fingerprint
        calls = 0

        def encode(self, items):
            import torch

            Plain.calls += len(items)
            return torch.tensor([HAND_TABLE[os.path.basename(i.image or "") or i.text] for i in items])

    assert mmeb.evaluate(Plain(), tmp_path, out_dir=tmp_path / "o") == {"VOC2007": pytest.approx(0.8)}
    assert mmeb.evaluate(Plain(), tmp_path, out_dir=tmp_path / "o") == {"VOC2007": pytest.approx(0.8)}
    assert Plain.calls == 14  # not cached: encoded on both runs
    assert "no .fingerprint" in caplog.text
    # cache_key makes it cacheable.
    Plain.calls = 0
    mmeb.evaluate(Plain(), tmp_path, out_dir=tmp_path / "o", cache_key="plain-v1")
    mmeb.evaluate(Plain(), tmp_path, out_dir=tmp_path / "o", cache_key="plain-v1")
    assert Plain.calls == 7

    class Broken:
        fingerprint = "broken"

        def __init__(self, fn):
            self.fn = fn

        def encode(self, items, **kw):
            return self.fn(len(items))

    with pytest.raises(InputError, match="shape"):
        mmeb.evaluate(Broken(lambda n: np.zeros((n + 1, 3))), tmp_path)
    with pytest.raises(InputError, match="NaN"):
        mmeb.evaluate(Broken(lambda n: np.full((n, 3), np.nan)), tmp_path)
    with pytest.raises(InputError, match="VOC2007.*row 0.*failing on purpose"):

        def fail(n):
            raise InputError("item 0: failing on purpose")

        mmeb.evaluate(Broken(fail), tmp_path)


def test_scalar_target_columns_are_broadcast(tmp_path):
    # The reference code accepts tgt_text == "" with a list of image paths.
    pool = ("NIGHTS/p.png", "NIGHTS/n.png")
    write_dataset(tmp_path, "NIGHTS", [(QRY, "NIGHTS/p.png", [IMG_TGT] * 2, list(pool))], images=pool)
    table = pq.read_table(tmp_path / "NIGHTS/test-00000-of-00001.parquet").to_pydict()
    table["tgt_text"] = [""]
    pq.write_table(pa.table(table), tmp_path / "NIGHTS/test-00000-of-00001.parquet")
    enc = TableEncoder({"p.png": (1, 0), "n.png": (0, 1)})
    assert mmeb.evaluate(enc, tmp_path) == {"NIGHTS": 1.0}
    assert ("", "NIGHTS/p.png") in enc.seen


def test_cache_files_are_checked_and_stay_under_the_cache_root(tmp_path, caplog):
    from vlm2vec_rt.eval.cache import path_component

    data = tmp_path / "data"
    many_dataset(data, "VisDial", n=11, k=6, seed=2)  # 11 queries + 22 images
    clean = mmeb.evaluate(HashEncoder(), data, chunk_size=4)
    cache = tmp_path / "run" / "cache"
    first = HashEncoder(limit=11 + 8)  # the queries, then 2 chunks of candidates, then "killed"
    with pytest.raises(KeyboardInterrupt):
        mmeb.evaluate(first, data, cache_dir=cache, chunk_size=4)
    chunks = sorted(cache.rglob("chunk-*.npy"))
    assert len(chunks) == 2
    np.save(chunks[1], np.ones((4, 8), np.float32))  # valid .npy, right shape, wrong content
    second = HashEncoder()
    with caplog.at_level("WARNING", logger="vlm2vec_rt"):
        assert mmeb.evaluate(second, data, cache_dir=cache, chunk_size=4) == clean
    assert "does not match its checksum" in caplog.text
    assert len(second.seen) == 22 - 4  # the damaged chunk again, and what was never encoded
    # a finished side is one checked file too
    (candidates,) = [p for p in cache.rglob("embeddings-*.npy") if p.parent.name.startswith("candidates")]
    candidates.write_bytes(candidates.read_bytes()[:-4] + b"\0\0\0\0")
    third = HashEncoder()
    assert mmeb.evaluate(third, data, cache_dir=cache, chunk_size=4) == clean
    assert len(third.seen) == 22
    # a cache key (or dataset name) is one path component under the cache root, whatever it holds
    escape = tmp_path / "escape"
    mmeb.evaluate(HashEncoder(fingerprint=None), data, cache_dir=escape / "cache", cache_key="..")
    assert [p.name for p in escape.iterdir()] == ["cache"]
    assert len({path_component(n) for n in ("..", ".", "", "a.b", "a_b", "a/b", "VisDial")}) == 7
    assert path_component("VisDial") == "VisDial"


# ---- torchrun -------------------------------------------------------------------------------------------
_RANK_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from test_eval_pipeline import HashEncoder
from vlm2vec_rt import distributed
from vlm2vec_rt import eval as mmeb


class FailsOnRank1(HashEncoder):
    def encode(self, items, **kw):
        if os.environ["RANK"] == "1":
            raise ValueError("rank 1 fails on purpose")
        return super().encode(items, **kw)


report = {{}}
with distributed.joined("cpu"):  # and leave together: a rank exiting mid-teardown can abort the other
    # Pretend the job is NCCL, where the object collectives need a gloo side group, and count those made.
    made, new_group, get_backend = [], dist.new_group, dist.get_backend
    dist.new_group = lambda *a, **k: made.append(1) or new_group(*a, **k)
    dist.get_backend = lambda group=None: "nccl"
    enc = HashEncoder()
    report["scores"] = mmeb.evaluate(enc, {data!r}, out_dir={out!r}, chunk_size=3)
    report["encoded"] = len(enc.seen)
    mmeb.evaluate(HashEncoder(), {data!r}, chunk_size=3)
    report["same_comm"] = distributed.current() is distributed.current()
    try:  # an encoder failing on rank 1 only: every rank raises, none waits for it
        mmeb.evaluate(FailsOnRank1(fingerprint=None), {data!r}, chunk_size=3)
    except Exception as e:
        report["error"] = [type(e).__name__, str(e)]
    report["side_groups"] = len(made)
    dist.new_group, dist.get_backend = new_group, get_backend
report["left"] = not dist.is_initialized() and not isinstance(distributed.current(), distributed.TorchDistributed)
with open(os.path.join({out!r}, "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(report, f)
"""


def test_torchrun_two_gloo_processes_match_one(tmp_path):
    from test_training_distributed import torchrun

    data, out = tmp_path / "data", tmp_path / "out"
    many_dataset(data, "MSCOCO_t2i", n=7, k=4, seed=3)
    many_dataset(data, "VisDial", n=5, k=5, seed=4)
    single = mmeb.evaluate(HashEncoder(), data, chunk_size=3)
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT.format(tests=str(Path(__file__).parent), data=str(data), out=str(out)))
    out.mkdir()
    torchrun(script, [], timeout=240)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["scores"] == ranks[1]["scores"] == single
    assert all(r["encoded"] > 0 for r in ranks)  # both ranks did work
    assert sum(r["encoded"] for r in ranks) == 7 + 14 + 5 + 10  # and nothing twice
    assert load_results(out)["datasets"]["VisDial"]["precision_at_1"] == single["VisDial"]
    # One side group for three evaluations; the same collectives object each time; the group left cleanly.
    assert [(r["side_groups"], r["same_comm"], r["left"]) for r in ranks] == [(1, True, True)] * 2
    # rank 1's ValueError: its own on rank 1, and on rank 0 a RuntimeError saying what and where
    assert ranks[1]["error"] == ["ValueError", "rank 1 fails on purpose"]
    assert ranks[0]["error"] == [
        "RuntimeError",
        "ValueError on rank 1: dataset 'VisDial', encoding queries: rank 1 fails on purpose",
    ]


def test_empty_parquet_is_an_error(tmp_path):
    write_dataset(tmp_path, "VOC2007", [(QRY, "VOC2007/a.png", ["cat"], [""])], images=("VOC2007/a.png",))
    table = pq.read_table(tmp_path / "VOC2007/test-00000-of-00001.parquet").slice(0, 0)
    pq.write_table(table, tmp_path / "VOC2007/test-00000-of-00001.parquet")
    with pytest.raises(InputError, match=r"'VOC2007': .*test-00000-of-00001\.parquet' has no rows"):
        mmeb.evaluate(HashEncoder(), tmp_path)
    assert mmeb.evaluate(HashEncoder(), tmp_path, skip_missing=True) == {}


def test_cli_compare_needs_two_runs(tmp_path, capsys):
    from vlm2vec_rt.cli import main

    hand_dataset(tmp_path)
    mmeb.evaluate(TableEncoder(HAND_TABLE), tmp_path, out_dir=tmp_path / "a")
    assert (
        main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "none"), "--out", str(tmp_path / "c")])
        == 2
    )
    assert "no results.json" in capsys.readouterr().err
    assert (
        main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "c")])
        == 0
    )
    assert "VOC2007" in capsys.readouterr().out and (tmp_path / "c/comparison.md").is_file()
