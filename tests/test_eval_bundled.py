"""The bundled real-image benchmark (both MMEB layouts) and `vlm2vec-rt eval` on it with tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm2vec_rt import InputError
from vlm2vec_rt import eval as mmeb
from vlm2vec_rt.cli import main
from vlm2vec_rt.eval.results import load_results


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> mmeb.BundledPaths:
    return mmeb.write_bundled(tmp_path_factory.mktemp("bundled") / "b", seed=0)


def _pixels(folder: Path) -> set[bytes]:
    return {np.asarray(Image.open(p)).tobytes() for p in folder.rglob("*.png")}


def test_layouts_sizes_and_disjoint_splits(bundled):
    assert bundled.eval_images == bundled.eval_dir / "eval_images"
    expected_eval = {"Digits": 200, "Photos_t2i": 60, "Photos_i2t": 60, "PhotoPairs": 60}
    for name, rows in expected_eval.items():
        table = pq.read_table(bundled.eval_dir / name / "test-00000-of-00001.parquet").to_pydict()
        assert list(table) == ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"]
        assert len(table["qry_text"]) == rows
        assert {len(t) for t in table["tgt_text"]} == {10}
        for paths in [table["qry_img_path"], *table["tgt_img_path"]]:
            for p in [p for p in ([paths] if isinstance(paths, str) else paths) if p]:
                assert (bundled.eval_images / p).is_file()
    digits = pq.read_table(bundled.eval_dir / "Digits/test-00000-of-00001.parquet").to_pydict()
    assert digits["qry_text"][0] == "<|image_1|>\nRepresent the given image for classification.\n"
    assert sorted(digits["tgt_text"][0]) == sorted(mmeb.bundled.DIGIT_WORDS)
    expected_train = {"Digits": 1000, "Photos_t2i": 160, "Photos_i2t": 160}
    for name, rows in expected_train.items():
        table = pq.read_table(bundled.train_dir / name / "original-00000-of-00001.parquet").to_pydict()
        assert list(table) == [
            "qry",
            "qry_image_path",
            "pos_text",
            "pos_image_path",
            "neg_text",
            "neg_image_path",
        ]
        assert len(table["qry"]) == rows
        for col in ("qry_image_path", "pos_image_path", "neg_image_path"):
            for p in filter(None, table[col]):
                assert p.startswith(f"images/{name.split('_')[0]}/Train/") or p.startswith(
                    "images/Photos/Train/"
                )
                assert (bundled.train_images / p).is_file()
    assert not (bundled.train_dir / "PhotoPairs").exists()  # OOD: evaluation only
    # No image (by pixels) is in both splits; eval images are small.
    train, evals = _pixels(bundled.train_dir / "images"), _pixels(bundled.eval_images)
    assert len(train) == 1000 + 160 and len(evals) == 200 + 60 and not train & evals
    assert max(Image.open(p).size[0] for p in bundled.eval_images.rglob("*.png")) <= 64


def test_deterministic_cached_and_safe(bundled, tmp_path):
    again = mmeb.write_bundled(tmp_path / "b2", seed=0)
    m1 = json.loads((bundled.root / "bundled.json").read_text())
    m2 = json.loads((again.root / "bundled.json").read_text())
    assert m1["files"] == m2["files"]  # byte-identical
    other = mmeb.write_bundled(tmp_path / "b3", seed=1)
    assert json.loads((other.root / "bundled.json").read_text())["files"] != m1["files"]
    # Reused as is; a damaged copy is rewritten; a foreign folder is never overwritten.
    stamp = (again.root / "bundled.json").stat().st_mtime_ns
    assert mmeb.write_bundled(tmp_path / "b2", seed=0) == again
    assert (again.root / "bundled.json").stat().st_mtime_ns == stamp
    victim = next(again.eval_images.rglob("*.png"))
    victim.unlink()
    mmeb.write_bundled(tmp_path / "b2", seed=0)
    assert victim.is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a bundled benchmark"):
        mmeb.write_bundled(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_eval_reports_and_compare(bundled, tiny_llava, tiny_qwen, tmp_path, capsys, monkeypatch):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "cmp"
    assert main(["eval", "--model", tiny_qwen, "--data", str(bundled.eval_dir), "--out", str(a)]) == 0
    printed = capsys.readouterr().out
    assert "Classification" in printed and "PhotoPairs" in printed and "Overall" in printed
    results = load_results(a)
    assert list(results["datasets"]) == ["Digits", "Photos_t2i", "Photos_i2t", "PhotoPairs"]
    assert results["aggregate"]["VQA"] is None and results["aggregate"]["Overall"] is not None
    assert all((a / f).stat().st_size > 0 for f in ("results.json", "results.md", "results.png"))
    assert "| Digits | Classification | IND | 200 | 10 |" in (a / "results.md").read_text()

    args = [
        "eval",
        "--model",
        tiny_llava,
        "--data",
        str(bundled.eval_dir),
        "--datasets",
        "Photos_i2t",
        "--out",
        str(b),
    ]
    assert main(args) == 0
    assert main(["eval", "--compare", str(a), str(b), "--out", str(c)]) == 0
    cmp = json.loads((c / "comparison.json").read_text())
    d = cmp["datasets"]["Photos_i2t"]["precision_at_1"]
    assert d["diff"] == pytest.approx(d["b"] - d["a"])
    assert cmp["only_in_a"] == ["Digits", "Photos_t2i", "PhotoPairs"]
    assert cmp["datasets"]["Digits"]["precision_at_1"]["b"] is None
    assert (c / "comparison.png").stat().st_size > 0
    capsys.readouterr()

    # Without --data the bundled benchmark (in the cache folder) is used.
    monkeypatch.setenv("VLM2VEC_RT_CACHE", str(tmp_path / "cache"))
    assert main(["eval", "--model", tiny_qwen, "--datasets", "Photos_i2t", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "cache" / "bundled-v1-seed0" / "bundled.json").is_file()
    assert load_results(tmp_path / "d")["datasets"]["Photos_i2t"]["queries"] == 60

    # Bad input: one clear line, exit code 2.
    assert (
        main(
            ["eval", "--model", tiny_qwen, "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_corrupt_image_error_names_dataset_row_and_path(bundled, tiny_qwen, tmp_path):
    import shutil

    from vlm2vec_rt.models.embedder import Embedder

    data = tmp_path / "eval"
    shutil.copytree(bundled.eval_dir / "Digits", data / "Digits")
    shutil.copytree(bundled.eval_images / "Digits", data / "eval_images" / "Digits")
    first = pq.read_table(data / "Digits/test-00000-of-00001.parquet").column("qry_img_path")[0].as_py()
    (data / "eval_images" / first).write_bytes(b"not a png")
    with pytest.raises(InputError, match=rf"'Digits', row 0, query image: .*{first}.*not a readable image"):
        mmeb.evaluate(Embedder.from_pretrained(tiny_qwen), data)
