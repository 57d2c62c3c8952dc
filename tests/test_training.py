"""Training: the MMEB-train reader and its bad-data errors, the sampler, checkpoints and exact resume after
SIGKILL, adapter merge, and the `train` / `merge` commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlm2vec_rt import Embedder, InputError, Item
from vlm2vec_rt.preprocess.images import StoredImage
from vlm2vec_rt.sample_images import digits
from vlm2vec_rt.training.data import DistinctTargetSampler, read_train_data

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUERY = "<|image_1|>\nRepresent the given image for classification.\n"
COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, type=pa.string()) for k, v in columns.items()}), path)
    return path


def write_digit_set(
    root: Path, n: int = 40, *, start: int = 0, negatives: bool = True, name="Digits"
) -> Path:
    """A small MMEB-train dataset: a digit image -> its label word; hard negative: the next label word."""
    images, labels = digits()
    rows = {c: [] for c in COLUMNS}
    for i in range(start, start + n):
        rel = f"images/{name}/{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).convert("RGB").resize((32, 32), Image.Resampling.NEAREST).save(root / rel)
        label = int(labels[i])
        for col, value in zip(
            COLUMNS, (QUERY, rel, WORDS[label], "", WORDS[(label + 1) % 10] if negatives else "", "")
        ):
            rows[col].append(value)
    write_parquet(root / name / "original-00000-of-00001.parquet", rows)
    return root


@pytest.fixture()
def digit_set(tmp_path) -> Path:
    return write_digit_set(tmp_path / "data")


# ---- reader ------------------------------------------------------------------------------------------------
def test_reader_builds_items_and_mixes_datasets(tmp_path):
    root = write_digit_set(tmp_path / "data", 12)
    write_digit_set(root, 5, start=100, negatives=False, name="More")
    write_parquet(root / "More" / "diverse_instruction-00000-of-00001.parquet", {c: [QUERY] for c in COLUMNS})
    data = read_train_data(root)
    assert data.datasets == {"Digits": 12, "More": 5}
    first = data.examples[0]
    assert isinstance(first.query, Item) and os.path.isfile(first.query.image)
    assert isinstance(first.query.image, StoredImage)  # read as stored, as the official training does
    assert first.query.format_text() == QUERY  # MMEB's text kept as written
    assert first.positive.image is None and first.positive.text in WORDS
    assert first.negative is not None and data.examples[-1].negative is None
    assert "original-00000-of-00001.parquet, row 0" in first.source
    assert read_train_data(root, datasets=["More"]).datasets == {"More": 5}


PARQUET = "Digits/original-00000-of-00001.parquet"


def _corrupt(root: Path, column: str, row: int, value) -> None:
    table = pq.read_table(root / PARQUET).to_pydict()
    table[column][row] = value
    write_parquet(root / PARQUET, table)


def _no_text_no_image(root: Path) -> None:
    _corrupt(root, "qry", 3, "")
    _corrupt(root, "qry_image_path", 3, "")


# case -> (damage done to a good set, the error it must raise)
BAD_DATA = {
    "missing image": (
        lambda root: os.remove(root / "images/Digits/7.png"),
        r"row 7: the query image file .*7\.png' does not exist",
    ),
    "empty parquet": (
        lambda root: write_parquet(root / PARQUET, {c: [] for c in COLUMNS}),
        "original-00000-of-00001.parquet: has no rows",
    ),
    "wrong columns": (
        lambda root: write_parquet(root / PARQUET, {"query": ["a"], "positive": ["b"]}),
        r"lacks column\(s\) \['qry', 'qry_image_path', 'pos_text', 'pos_image_path'\]",
    ),
    "neither text nor image": (_no_text_no_image, "row 3: the query has neither text nor image"),
    "positive without anything": (
        lambda root: _corrupt(root, "pos_text", 5, None),
        "row 5: the positive has neither text nor image",
    ),
    "placeholder without image": (
        lambda root: _corrupt(root, "qry_image_path", 2, ""),
        "row 2: the query text holds <|image_1|> but 'qry_image_path' is empty",
    ),
    "not parquet": (
        lambda root: (root / PARQUET).write_bytes(b"not a parquet file"),
        "cannot read as parquet",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_names_file_and_row(digit_set, case):
    damage, message = BAD_DATA[case]
    damage(digit_set)
    with pytest.raises(InputError, match=message) as e:
        read_train_data(digit_set)
    assert "original-00000-of-00001.parquet" in str(e.value)


def test_no_data(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_train_data(tmp_path / "nowhere")
    with pytest.raises(InputError, match="no training data"):
        read_train_data(tmp_path)
    with pytest.raises(InputError, match="dataset 'Nope'"):
        read_train_data(write_digit_set(tmp_path / "d", 3), datasets=["Nope"])


def test_bad_data_stops_training_before_any_step(tmp_path, tiny_qwen, digit_set):
    from vlm2vec_rt.cli import main

    os.remove(digit_set / "images/Digits/13.png")
    steps = []
    from vlm2vec_rt.training.trainer import train

    with pytest.raises(InputError, match="row 13"):
        train(
            tiny_qwen,
            digit_set,
            tmp_path / "out",
            steps=2,
            batch_size=4,
            callback=lambda s, m: steps.append(s),
        )
    assert steps == [] and not (tmp_path / "out").exists()
    assert (
        main(["train", "--model", tiny_qwen, "--data", str(digit_set), "--out", str(tmp_path / "out")]) == 2
    )


# ---- sampler -----------------------------------------------------------------------------------------------
def _check_epoch(batches, targets, datasets, batch_size):
    """Every example exactly once; each batch from one dataset, its targets distinct, at most batch_size."""
    used = np.concatenate(batches)
    assert sorted(used.tolist()) == list(range(len(targets)))
    for b in batches:
        assert 1 <= len(b) <= batch_size
        assert len({datasets[i] for i in b}) == 1
        assert len({targets[i] for i in b}) == len(b)


def test_sampler_keeps_equal_targets_apart_and_uses_every_example():
    rng = np.random.default_rng(0)
    targets = [(f"label {int(x)}", "") for x in rng.integers(0, 10, 503)]
    sampler = DistinctTargetSampler(targets, 8, seed=3)
    batches = sampler.epoch(0)
    _check_epoch(batches, targets, ["data"] * len(targets), 8)
    assert {len(b) for b in batches} <= {7, 8}  # 503 rows in 63 batches: sizes differ by one at most
    again = DistinctTargetSampler(targets, 8, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again.epoch(0)))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, sampler.epoch(1)))
    _check_epoch(sampler.epoch(1), targets, ["data"] * len(targets), 8)
    # the position after the last batch of an epoch is the first batch of the next
    last, epoch, index = sampler.batch_at(0, len(batches) - 1)
    assert np.array_equal(last, batches[-1]) and (epoch, index) == (0, len(batches))
    first, epoch, index = sampler.batch_at(epoch, index)
    assert np.array_equal(first, sampler.epoch(1)[0]) and (epoch, index) == (1, 1)


def test_sampler_does_not_starve_datasets_with_few_labels():
    """5000 distinct-target rows + 5000 two-label rows, batch 256 (the review's case): the old sampler used 38
    of the two-label rows per epoch. Now every row is used once per epoch, a batch never mixes datasets, the
    two-label set gets batches of two, and the rows drawn follow dataset sizes all through the epoch."""
    targets = [(f"caption {i}", "") for i in range(5000)] + [(("yes", "no")[i % 2], "") for i in range(5000)]
    datasets = ["Distinct"] * 5000 + ["TwoLabel"] * 5000
    sampler = DistinctTargetSampler(targets, 256, datasets=datasets, seed=0)
    batches = sampler.epoch(0)
    _check_epoch(batches, targets, datasets, 256)
    sizes = {name: {len(b) for b in batches if datasets[b[0]] == name} for name in ("Distinct", "TwoLabel")}
    assert sizes == {"Distinct": {250}, "TwoLabel": {2}}
    rows = np.cumsum([len(b) for b in batches])
    two_label = np.cumsum([len(b) * (datasets[b[0]] == "TwoLabel") for b in batches])
    for fraction in (0.1, 0.25, 0.5, 0.75):
        at = int(np.searchsorted(rows, fraction * len(targets)))
        assert abs(two_label[at] / rows[at] - 0.5) < 0.05, fraction
    assert sampler.describe() == (
        "Distinct 5000 rows (50.0%) in 20 batches of 250 (0.8% of steps); "
        "TwoLabel 5000 rows (50.0%) in 2500 batches of 2 (99.2% of steps)"
    )
    assert [p.limited for p in sampler.plans] == [False, True]
    # a dominant label: batches as many as its rows, sizes differing by one at most
    skewed = [("yes", "")] * 7 + [("no", "")] * 3 + [("maybe", "")] * 2
    batches = DistinctTargetSampler(skewed, 4, seed=1).epoch(5)
    _check_epoch(batches, skewed, ["data"] * 12, 4)
    assert sorted(len(b) for b in batches) == [1, 1, 2, 2, 2, 2, 2]


def test_sampler_refuses_batches_smaller_than_the_ranks():
    targets = [("a", ""), ("b", ""), ("a", "")]
    assert sorted(len(b) for b in DistinctTargetSampler(targets, 3).epoch(0)) == [1, 2]
    with pytest.raises(InputError, match="dataset 'HatefulMemes'.*only 1 row.*fewer than the 2 ranks"):
        DistinctTargetSampler(targets, 3, datasets=["HatefulMemes"] * 3, min_batch=2)


# ---- resume after SIGKILL ----------------------------------------------------------------------------------
SETTINGS = dict(
    steps=6, batch_size=4, gc_chunk=3, checkpoint_every=3, lr=1e-3, lora_r=4, lora_dropout=0.2, warmup_steps=2
)
KILLED_RUN = textwrap.dedent(
    f"""
    import os, signal, sys, torch
    torch.set_num_threads(int(sys.argv[4]))
    from vlm2vec_rt.training.trainer import train

    def callback(step, metrics):
        if step == 4:  # after the checkpoint at step 3, before the next one
            os.kill(os.getpid(), signal.SIGKILL)

    train(sys.argv[1], sys.argv[2], sys.argv[3], callback=callback, **{SETTINGS!r})
    """
)


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_resume_after_sigkill_is_exact(tmp_path, tiny_qwen, digit_set):
    """Killed (SIGKILL, in a subprocess) after its checkpoint at step 3, resumed, it ends where a run that was
    never interrupted ends: the same parameters bit for bit (CPU, same thread count)."""
    from vlm2vec_rt.training.trainer import train

    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    cmd = [
        sys.executable,
        str(script),
        tiny_qwen,
        str(digit_set),
        str(tmp_path / "a"),
        str(torch.get_num_threads()),
    ]
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003"] and not (tmp_path / "a" / "adapter").exists()
    # a checkpoint write that was killed half way leaves a temporary folder: ignored and removed on resume
    (tmp_path / "a" / "checkpoints" / ".step-00000006.abc.tmp").mkdir()
    train(tiny_qwen, digit_set, tmp_path / "a", resume=True, **SETTINGS)
    train(tiny_qwen, digit_set, tmp_path / "b", **SETTINGS)

    got, want = _adapter_tensors(tmp_path / "a" / "adapter"), _adapter_tensors(tmp_path / "b" / "adapter")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    initial = {k: v for k, v in want.items() if "lora_B" in k}
    assert any(v.abs().max() > 0 for v in initial.values())  # training moved the adapter
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003", "step-00000006"]
    # a checkpoint's adapter is the run's adapter at that step
    last = _adapter_tensors(tmp_path / "a" / "checkpoints" / "step-00000006" / "adapter")
    assert all(torch.equal(last[k], want[k]) for k in want)
    # the log has one line a step, as the uninterrupted run's: step 4, logged before the kill, is not repeated
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [r["step"] for r in whole] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["lr"]) for r in log] == [(r["loss"], r["lr"]) for r in whole]
    assert {"loss", "lr", "examples_per_s"} <= log[0].keys()


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_dirs(tmp_path, tiny_qwen, digit_set):
    from vlm2vec_rt.training.trainer import train

    out = train(tiny_qwen, digit_set, tmp_path / "out", steps=1, batch_size=4, gc_chunk=4, lora_r=2)
    assert (out / "adapter_config.json").is_file()
    with pytest.raises(InputError, match="already holds a training run"):
        train(tiny_qwen, digit_set, tmp_path / "out", steps=1, batch_size=4)
    with pytest.raises(InputError, match="batch_size: 4 -> 8"):
        train(tiny_qwen, digit_set, tmp_path / "out", steps=1, batch_size=8, lora_r=2, resume=True)
    with pytest.raises(InputError, match="profile: 'vlm2vec' -> 'native'"):
        train(
            tiny_qwen,
            digit_set,
            tmp_path / "out",
            steps=1,
            batch_size=4,
            lora_r=2,
            resume=True,
            profile="native",
        )
    with pytest.raises(InputError, match="profile must be one of"):
        train(tiny_qwen, digit_set, tmp_path / "other", steps=1, batch_size=4, profile="gme")


def test_a_run_that_fails_to_start_leaves_nothing_and_can_be_retried(tmp_path, tiny_qwen, digit_set, caplog):
    """`train --model /nonexistent` used to leave out/train_config.json, and the identical retry was refused
    ("already holds a training run"). A config without any checkpoint or final adapter is no run to protect."""
    from vlm2vec_rt.cli import main
    from vlm2vec_rt.training.trainer import train

    out = tmp_path / "out"
    rest = ["--data", str(digit_set), "--out", str(out), "--steps", "1", "--batch-size", "4"]
    assert main(["train", "--model", str(tmp_path / "nonexistent"), *rest]) == 2
    assert not out.exists()
    caplog.set_level("INFO", logger="vlm2vec_rt.training")
    assert main(["train", "--model", tiny_qwen, *rest]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert "epoch 0: Digits 40 rows (100.0%) in 10 batches of 4 (100.0% of steps)" in caplog.text

    # What a run killed before its first checkpoint leaves: its settings and a log. A new run replaces both.
    left = tmp_path / "left"
    left.mkdir()
    (left / "train_config.json").write_text(json.dumps({"batch_size": 8}))
    (left / "train_log.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    train(tiny_qwen, digit_set, left, steps=1, batch_size=4, lora_r=2)
    assert json.loads((left / "train_config.json").read_text())["batch_size"] == 4
    logged = [json.loads(line) for line in (left / "train_log.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and logged[0]["loss"] != 9.0
    # a directory with checkpoints but no settings cannot be resumed
    (left / "train_config.json").unlink()
    with pytest.raises(InputError, match="no train_config.json"):
        train(tiny_qwen, digit_set, left, steps=1, batch_size=4, lora_r=2, resume=True)


def test_full_finetune_writes_a_complete_model(tmp_path, tiny_qwen, digit_set):
    from vlm2vec_rt.training.trainer import train

    out = train(tiny_qwen, digit_set, tmp_path / "ft", steps=1, batch_size=4, full_finetune=True, lr=1e-3)
    assert out.name == "model" and not (tmp_path / "ft" / "adapter").exists()
    items = [Item(text="seven"), Item(image=digits()[0][3], instruction="Represent the given image.")]
    tuned = Embedder.from_pretrained(out).encode(items)
    base = Embedder.from_pretrained(tiny_qwen).encode(items)
    assert (tuned * base).sum(1).min() < 0.99999  # the weights moved


# ---- merge -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_merged_model_embeds_like_the_adapter(tmp_path, tiny_model, photos, dora):
    from vlm2vec_rt.models.backbones import load_backbone
    from vlm2vec_rt.training.lora import add_adapter, merge_adapter

    bb = load_backbone(tiny_model)
    torch.manual_seed(0)
    peft_model = add_adapter(bb, r=4, dora=dora, train_vision=True)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "magnitude" in name:  # a trained-looking adapter
                p.add_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")

    # in fp32: the Phi-3.5-V tiny model is bf16 like the official one, and a bf16 merge rounds the sums
    merged = merge_adapter(tiny_model, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    items = [
        Item(text="a cat"),
        Item(image=photos["chelsea"], instruction="Represent the given image."),
        Item(image=photos["coffee"][:120, :200], text="What is in the cup?", instruction="Question: "),
    ]
    want = Embedder.from_pretrained(tiny_model, adapter=tmp_path / "adapter").encode(items)
    got = Embedder.from_pretrained(merged).encode(items)
    base = Embedder.from_pretrained(tiny_model).encode(items)
    assert (got * want).sum(1).min() >= 0.99999
    assert (got * base).sum(1).min() < 0.999  # the adapter did change the model
    # the merged directory is a complete checkpoint: the LM head came along
    full = load_backbone(merged, keep_lm_head=True)
    assert full.model.lm_head is not None
    with pytest.raises(InputError, match="already exists"):
        merge_adapter(tiny_model, tmp_path / "adapter", tmp_path / "merged")


def test_adapter_b_starts_at_zero_unless_asked(tiny_llava):
    from vlm2vec_rt.models.backbones import load_backbone
    from vlm2vec_rt.training.lora import add_adapter

    def b_weights(**kw):
        model = add_adapter(load_backbone(tiny_llava), r=4, **kw)
        return torch.cat([p.flatten() for name, p in model.named_parameters() if "lora_B" in name])

    assert (b_weights() == 0).all()
    acting = b_weights(init_b_std=0.05)
    assert 0.04 < float(acting.std()) < 0.06
    with pytest.raises(InputError, match="init_b_std"):
        b_weights(init_b_std=-1.0)


# ---- command line ------------------------------------------------------------------------------------------
def test_cli_train_then_merge(tmp_path, tiny_qwen, digit_set, capsys):
    from vlm2vec_rt.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", tiny_qwen, "--data", str(digit_set), "--out", str(out)]
    args += [
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--gc-chunk",
        "3",
        "--lora-r",
        "4",
        "--lr",
        "1e-3",
        "--dora",
        "--profile",
        "vlm2vec-v2",
    ]
    assert main(args) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    # the profile trained under is recorded with the run and the adapter, and follows into the merged model
    assert json.loads((out / "train_config.json").read_text())["profile"] == "vlm2vec-v2"
    assert json.loads((out / "adapter" / "vlm2vec_rt.json").read_text()) == {"profile": "vlm2vec-v2"}
    assert Embedder.from_pretrained(tiny_qwen, adapter=out / "adapter").profile == "vlm2vec-v2"
    assert (
        main(["merge", "--model", tiny_qwen, "--adapter", str(out / "adapter"), "--out", str(tmp_path / "m")])
        == 0
    )
    merged = Embedder.from_pretrained(tmp_path / "m")
    assert merged.profile == "vlm2vec-v2" and merged.encode(["seven"]).shape == (1, 64)
    # every file of the merged model has the mode a plain open gives (safetensors too, not 0600)
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "m").iterdir() if f.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
    assert Embedder.from_pretrained(tmp_path / "m", profile="native").profile == "native"  # asked: used
    capsys.readouterr()
    assert (
        main(["merge", "--model", tiny_qwen, "--adapter", str(tmp_path), "--out", str(tmp_path / "m2")]) == 2
    )
    assert "adapter_config.json" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()
