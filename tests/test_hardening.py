"""Cases a hostile new user broke, each kept fixed: EXIF orientation, flags before the command, the training
log after a resume, unhandled exceptions on bad input (None, lone surrogates, non-UTF-8 files, outputs that
cannot be written, devices that are not there, NaN settings), the pixel limit on the command line, what
killed builds leave, file modes, the Engine's memory on large images and the cost of a 1M-character text."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2vec_rt import Embedder, Engine, EngineError, InputError, Item, build_engine, cli
from vlm2vec_rt.atomic import atomic_dir
from vlm2vec_rt.cli import build_parser, main
from vlm2vec_rt.engine import build
from vlm2vec_rt.preprocess import batching
from vlm2vec_rt.preprocess import text as text_ops
from vlm2vec_rt.preprocess.images import StoredImage, load_image
from vlm2vec_rt.preprocess.items import read_jsonl_items
from vlm2vec_rt.training.trainer import TrainConfig, _truncate_log


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def engine(tiny_llava, tmp_path_factory) -> Engine:
    out = tmp_path_factory.mktemp("hardening") / "llava_fp32"
    return Engine.load(build_engine(tiny_llava, out, precision="fp32", backend="onnxruntime", device="cpu"))


@pytest.fixture(scope="module")
def eager(tiny_llava) -> Embedder:
    return Embedder.from_pretrained(tiny_llava)


def _one_line_exit_2(capsys, argv: list[str], match: str) -> str:
    """main(argv) exits 2 (returned or through argparse) with one line on stderr holding `match`."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert match in err and err.count("\n") == 0 and "Traceback" not in err, err
    return err


# ---- 1. EXIF orientation -----------------------------------------------------------------------------------
def _exif_jpeg(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture()
def rotated_jpeg(tmp_path, photos) -> tuple[Path, np.ndarray, np.ndarray]:
    """A 200x100 JPEG whose EXIF says Orientation=6 (turn 90 degrees clockwise to view): (path, the pixels
    as stored, the upright pixels)."""
    data = _exif_jpeg(np.ascontiguousarray(photos["chelsea"][:100, :200]), 6)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(data)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return path, stored, np.ascontiguousarray(np.rot90(stored, k=-1))


def test_exif_orientation_is_applied_to_paths_bytes_and_pil_images(rotated_jpeg):
    path, stored, upright = rotated_jpeg
    assert stored.shape == (100, 200, 3) and upright.shape == (200, 100, 3)
    for source in (path, str(path), path.read_bytes(), Image.open(path)):
        np.testing.assert_array_equal(load_image(source), upright)
    # a requested size is computed from, and applied to, the upright image
    seen = []
    out = load_image(path, size=lambda w, h: seen.append((w, h)) or (50, 80))
    assert seen == [(100, 200)] and out.shape == (80, 50, 3)
    # every orientation: the pixels a viewer shows
    for orientation, turn in {3: 2, 8: 1}.items():
        data = _exif_jpeg(stored, orientation)
        raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(load_image(data), np.rot90(raw, k=turn))
    # a broken EXIF block is no orientation, not an error
    broken = path.read_bytes().replace(b"Exif\x00\x00", b"Exif\x00\x00\xff\xff", 1)
    assert load_image(broken).ndim == 3


def test_stored_image_is_read_as_stored(rotated_jpeg):
    path, stored, _ = rotated_jpeg
    np.testing.assert_array_equal(load_image(StoredImage(path)), stored)
    assert os.fspath(StoredImage(path)) == str(path) and StoredImage(path) == StoredImage(str(path))
    assert Item(image=StoredImage(path)).image.path == str(path)


def test_exif_upright_through_embedder_engine_and_cli(rotated_jpeg, eager, engine, tiny_llava, tmp_path):
    path, stored, upright = rotated_jpeg
    for encoder in (eager, engine):
        got = encoder.encode([Item(image=str(path)), Item(image=path.read_bytes())])
        want = encoder.encode([Item(image=upright)])
        np.testing.assert_allclose(got, np.vstack([want, want]), atol=1e-6)
        assert float(encoder.encode([Item(image=stored)])[0] @ want[0]) < 0.9999
        # what MMEB evaluation reads: the stored pixels, as the official code's plain Image.open
        np.testing.assert_allclose(
            encoder.encode([Item(image=StoredImage(path))]), encoder.encode([Item(image=stored)]), atol=1e-6
        )
    out = tmp_path / "cli.npy"
    assert main(["embed", "--model", tiny_llava, "--image", str(path), "--out", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), eager.encode([Item(image=upright)]), atol=1e-6)


def test_mmeb_reader_reads_images_as_stored(tmp_path, rotated_jpeg):
    from vlm2vec_rt.eval.reader import EvalData

    path, stored, _ = rotated_jpeg
    data = EvalData(
        name="X",
        image_root=path.parent,
        queries=[("q", path.name)],
        candidates=[("c", "")],
        query_index=np.zeros(1, np.int64),
        candidate_index=np.zeros((1, 1), np.int64),
        rows=np.zeros(1, np.int64),
        files=[],
    )
    (item,) = data.items("queries")
    assert isinstance(item.image, StoredImage) and os.fspath(item.image) == str(path)
    np.testing.assert_array_equal(load_image(item.image), stored)


# ---- 2. --debug before the command -------------------------------------------------------------------------
def test_debug_before_or_after_the_command(tmp_path, capsys):
    parser = build_parser()
    assert parser.parse_args(["--debug", "tiny", "--out", "m"]).debug is True
    assert parser.parse_args(["tiny", "--debug", "--out", "m"]).debug is True
    assert parser.parse_args(["tiny", "--out", "m"]).debug is False
    argv = ["embed", "--model", str(tmp_path), "--text", "x", "--out", str(tmp_path / "o.npy")]
    assert main(["--debug", *argv]) == 2
    assert "Traceback" in capsys.readouterr().err
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


# ---- 3. the training log after --resume --------------------------------------------------------------------
def test_resumed_log_keeps_one_line_a_step(tmp_path):
    log = tmp_path / "train_log.jsonl"
    lines = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 5, 4, 5, 6)]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "lo')  # the last cut by a kill
    _truncate_log(log, 5)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
    _truncate_log(tmp_path / "absent.jsonl", 3)  # nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


# ---- 4, 5. encode(None), lone surrogates -------------------------------------------------------------------
@pytest.mark.parametrize("bad", [None, 3, 2.5, b"bytes", {"text": "x"}])
def test_encode_of_a_non_sequence_is_an_input_error(eager, engine, bad):
    for encoder in (eager, engine):
        with pytest.raises(InputError, match="sequence of items"):
            encoder.encode(bad)


def test_lone_surrogates_are_input_errors(eager, engine, tiny_qwen):
    qwen = Embedder.from_pretrained(tiny_qwen)
    for encoder in (eager, engine, qwen):
        with pytest.raises(InputError, match="item 1: Item.text is not valid Unicode"):
            encoder.encode(["fine", "bad \ud800 surrogate"])
        with pytest.raises(InputError, match="Item.instruction is not valid Unicode"):
            encoder.encode([Item(text="x", instruction="\udfff")])


def test_lone_surrogates_on_the_command_line(tmp_path, tiny_llava, capsys):
    out = tmp_path / "o.npy"
    argv = ["embed", "--model", tiny_llava, "--out", str(out)]
    _one_line_exit_2(capsys, [*argv, "--text", "bad \udcff bytes"], "--text is not valid Unicode")
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"text": "bad \\ud800 surrogate"}\n')
    _one_line_exit_2(capsys, [*argv, "--input", str(jsonl)], "line 2: Item.text is not valid Unicode")
    assert not out.exists()


# ---- 6. JSONL encodings ------------------------------------------------------------------------------------
def test_jsonl_must_be_utf8_and_may_have_a_bom(tmp_path, tiny_llava, capsys):
    f = tmp_path / "items.jsonl"
    rows = '{"text": "caf\u00e9"}\n{"text": "na\u00efve"}\n'
    f.write_bytes(rows.encode("utf-8-sig"))
    assert [i.text for i in read_jsonl_items(f)] == ["caf\u00e9", "na\u00efve"]
    f.write_bytes(b'{"text": "ok"}\r\n' + rows.encode("latin-1"))
    with pytest.raises(InputError, match=r"line 2: not UTF-8 text \(byte 0xe9"):
        read_jsonl_items(f)
    f.write_bytes(rows.encode("utf-16"))
    with pytest.raises(InputError, match="line 1: the file is UTF-16"):
        read_jsonl_items(f)
    out = tmp_path / "o.npy"
    _one_line_exit_2(capsys, ["embed", "--model", tiny_llava, "--input", str(f), "--out", str(out)], "UTF-8")


# ---- 7. --out checked before the work ----------------------------------------------------------------------
def test_embed_checks_out_before_encoding(tmp_path, monkeypatch, capsys):
    def no_encoder(args):
        raise AssertionError("the encoder was loaded before --out was checked")

    monkeypatch.setattr(cli, "load_encoder", no_encoder)
    (tmp_path / "a_file").write_text("x")
    base = ["embed", "--model", "m", "--text", "x", "--out"]
    _one_line_exit_2(capsys, [*base, str(tmp_path)], "is a directory")
    _one_line_exit_2(capsys, [*base, ""], "--out is empty")
    _one_line_exit_2(capsys, [*base, str(tmp_path / "a_file" / "o.npy")], "is not a directory")


# ---- 8. devices that are not there -------------------------------------------------------------------------
def test_unusable_devices_are_one_line(tmp_path, tiny_llava, capsys):
    out = str(tmp_path / "o.npy")
    embed = ["embed", "--model", tiny_llava, "--text", "x", "--out", out]
    _one_line_exit_2(capsys, [*embed, "--device", "tpu"], "'tpu'")
    _one_line_exit_2(capsys, [*embed, "--device", "not a device"], "is not a device")
    train = ["train", "--model", tiny_llava, "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    _one_line_exit_2(capsys, [*train, "--device", "tpu"], "'tpu'")
    if not torch.cuda.is_available():
        _one_line_exit_2(capsys, [*embed, "--device", "cuda"], "CUDA is not available")
        _one_line_exit_2(capsys, [*embed, "--device", "cuda:1"], "CUDA is not available")
        build_argv = ["build", "--model", tiny_llava, "--engine", "fp32", "--out", str(tmp_path / "e")]
        _one_line_exit_2(capsys, [*build_argv, "--device", "cuda"], "CUDA is not available")
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "run").exists()


# ---- 9. invalid numbers in training settings ---------------------------------------------------------------
@pytest.mark.parametrize(
    "setting, value",
    [
        ("lr", float("nan")),
        ("lr", float("inf")),
        ("lr", -1e-3),
        ("temperature", float("nan")),
        ("weight_decay", float("nan")),
        ("weight_decay", -1.0),
        ("max_grad_norm", float("inf")),
        ("lora_dropout", 1.5),
        ("lora_dropout", float("nan")),
        ("lora_alpha", float("nan")),
        ("lora_alpha", 0.0),
    ],
)
def test_training_refuses_invalid_numbers(setting, value):
    cfg = TrainConfig(model_dir="m", data_dir="d", out_dir="o", **{setting: value})
    with pytest.raises(InputError, match=setting.replace("_", "-") + " must be a finite number"):
        cfg.check(world=1)


def test_cli_train_lr_nan_is_one_line(tmp_path, tiny_qwen, capsys):
    argv = ["train", "--model", tiny_qwen, "--data", str(tmp_path), "--out", str(tmp_path / "run")]
    for flag, value in (("--lr", "nan"), ("--temperature", "inf"), ("--lora-dropout", "-0.5")):
        _one_line_exit_2(capsys, [*argv, flag, value], "must be a finite number")
    assert not (tmp_path / "run").exists()


# ---- 10. the pixel limit on the command line ---------------------------------------------------------------
def test_cli_max_image_pixels(tmp_path, tiny_llava, photos, capsys):
    image = tmp_path / "small.png"
    Image.fromarray(np.ascontiguousarray(photos["chelsea"][:20, :30])).save(image)
    out = tmp_path / "o.npy"
    argv = ["embed", "--model", tiny_llava, "--image", str(image), "--out", str(out)]
    err = _one_line_exit_2(capsys, [*argv, "--max-image-pixels", "500"], "over the limit of 500")
    assert "--max-image-pixels" in err  # the error names the option that raises the limit
    _one_line_exit_2(capsys, [*argv, "--max-image-pixels", "0"], "expected a positive integer")
    assert main([*argv, "--max-image-pixels", "600"]) == 0 and out.is_file()
    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o"])
    assert args.max_image_pixels == 64_000_000


# ---- 11. what killed builds leave --------------------------------------------------------------------------
def test_a_build_removes_what_killed_builds_of_other_names_left(tmp_path, tiny_llava, monkeypatch, caplog):
    """A killed build of "a" left its lock file and folders: a build into "b" removes them (the free lock
    proves "a" dead). A live build's lock and folders, and folders without a lock, stay."""
    (tmp_path / ".a.lock").write_text("12345\n")
    for name in (".a.abc123de.tmp", ".a.k3j4h5g6.work", ".orphan.abc123de.tmp"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(build, "_build", lambda *args, **kwargs: None)  # the leftovers are what is tested
    with build._build_lock(tmp_path / "c") as locked:
        assert locked
        (tmp_path / ".c.zzz999yy.tmp").mkdir()
        with caplog.at_level("WARNING", logger="vlm2vec_rt"):
            build_engine(tiny_llava, tmp_path / "b", precision="fp32", backend="onnxruntime", device="cpu")
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            ".c.lock",
            ".c.zzz999yy.tmp",
            ".orphan.abc123de.tmp",
        ]
    said = caplog.text
    assert ".a.abc123de.tmp, left by a killed build" in said and ".a.lock, the lock of a killed build" in said


def test_engine_load_puts_back_an_engine_a_killed_build_moved_aside(tmp_path, engine):
    import shutil

    aside = tmp_path / ".eng.abc123de.old"
    aside.mkdir()
    shutil.copytree(engine.path, aside / "x")
    (tmp_path / ".eng.q1w2e3r4.tmp").mkdir()  # the new engine the killed build had not renamed in
    with build._build_lock(tmp_path / "eng"):  # a live build of the same name: it is left to finish
        with pytest.raises(EngineError, match="does not exist"):
            Engine.load(tmp_path / "eng")
        assert aside.is_dir()
    assert Engine.load(tmp_path / "eng").dim == engine.dim
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]


# ---- 12. file modes of published directories ---------------------------------------------------------------
def test_published_directories_have_plain_modes(tmp_path, tiny_llava):
    umask = _umask()
    with atomic_dir(tmp_path / "out") as tmp:
        os.close(os.open(tmp / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600))  # as a temporary file is made
        os.close(os.open(tmp / "tool.sh", os.O_CREAT | os.O_WRONLY, 0o700))
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "data.json").write_text("{}")
        os.chmod(tmp / "sub" / "data.json", 0o600)
    mode = lambda p: (tmp_path / "out" / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("private.bin") == mode("sub/data.json") == 0o666 & ~umask
    assert mode("tool.sh") == (0o666 & ~umask) | (0o100 & ~umask)
    assert mode("sub") == 0o777 & ~umask
    # a model written by the tiny factory (transformers' save_pretrained, as merge does): every file alike
    modes = {f.name: f.stat().st_mode & 0o777 for f in Path(tiny_llava).iterdir() if f.is_file()}
    assert modes["model.safetensors"] == 0o666 & ~umask and len(set(modes.values())) == 1, modes


# ---- 13. the prepared-image window is bounded by bytes -----------------------------------------------------
class _FakePre:
    """prepare_many gives each item `nbytes` of pixels (and records the windows asked for)."""

    def __init__(self, nbytes: int):
        from vlm2vec_rt.models.preprocessors import ImageInputs

        self.image = ImageInputs(np.zeros(nbytes, np.uint8), (1, 1), 1) if nbytes else None
        self.calls: list[tuple[int, int]] = []

    def prepare_many(self, items, offset=0):
        self.calls.append((offset, len(items)))
        return [([1, 2, 3], self.image) for _ in items]


def test_prepare_ahead_closes_a_window_at_its_byte_budget():
    items = list(range(100))
    heavy = _FakePre(1 << 20)  # 1 MiB an item
    windows = list(batching.prepare_ahead(heavy, items, 64, max_bytes=20 << 20, step=16))
    assert [(start, len(p)) for start, p in windows] == [(0, 32), (32, 32), (64, 32), (96, 4)]
    assert heavy.calls[:3] == [(0, 16), (16, 16), (32, 16)]
    light = _FakePre(0)  # text: the byte budget never closes a window early
    windows = list(batching.prepare_ahead(light, items, 64, max_bytes=20 << 20, step=16))
    assert [(start, len(p)) for start, p in windows] == [(0, 64), (64, 36)]
    assert [len(p) for _, p in batching.prepare_ahead(light, items, 64)] == [64, 36]  # no budget: as before


def test_a_byte_bounded_window_gives_the_same_embeddings(engine, photos):
    items = [Item(image=photos["coffee"][: 40 + 7 * k, : 60 + 5 * k], text="x" * k) for k in range(12)]
    items += [Item(text=f"text {k} " * (k + 1)) for k in range(9)]
    want = engine.encode(items, batch_size=4)
    common = dict(dim=engine.dim, batch_size=4, max_tokens=None, call_cost=0, progress=False)
    for window_bytes in (1, 1 << 20, None):
        got = batching.encode_by_length(
            engine.pre, items, engine.run_batch, window_bytes=window_bytes, **common
        )
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert batching.WINDOW_BYTES <= 512 << 20


# ---- 14. a 1M-character text ---------------------------------------------------------------------------------
def test_a_huge_text_is_truncated_before_it_is_tokenized(eager, engine, tiny_qwen, photos, monkeypatch):
    seen: list[int] = []
    real_ids = text_ops._ids
    huge = "hello world, " * 25_000  # 325,000 characters, some 75,000 tokens
    image = np.ascontiguousarray(photos["rocket"][:90, :70])
    items = [Item(text=huge), Item(text=huge, image=image, instruction="Represent the given image.")]
    for pre in (eager.pre, Embedder.from_pretrained(tiny_qwen).pre):
        with monkeypatch.context() as m:
            m.setattr(text_ops, "_ids", lambda tok, text: seen.append(len(text)) or real_ids(tok, text))
            got = [pre.prepare(item)[0] for item in items]
        assert seen and max(seen) < 50_000  # the tokenizer never saw the whole text
        with monkeypatch.context() as m:  # tokenizing it all, as before: the same tokens, image tokens kept
            m.setattr(text_ops, "_tokenize_prefix", lambda tok, text, *a: (real_ids(tok, text), True))
            want = [pre.prepare(item)[0] for item in items]
        assert got == want and len(got[0]) == len(got[1]) == pre.max_length
        seen.clear()
    vecs = engine.encode([huge * 3, "short"])  # a 1M-character text
    assert vecs.shape == (2, engine.dim) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)


def test_text_holding_the_image_token_itself_is_still_refused(eager):
    huge = "word " * 50_000 + eager.pre.image_token
    with pytest.raises(InputError, match="image tokens"):
        eager.pre.prepare(Item(text=huge))
