"""Property-based fuzzing of the input surface, with a bounded budget (CI: the file runs in under a minute).

Over Item fields, image arrays, PIL images of every mode (EXIF orientation included), encoded and broken
image bytes, image paths, JSONL lines and command-line arguments, the contract is: a result of unit-norm
rows, one per input, in input order, or an InputError / EngineError; on the command line exit 0 with the
file written, or exit 2 with one line. Anything else (another exception, exit 1) is a bug.

The examples are derandomized, so CI sees the same cases every run; VLM2VEC_FUZZ_EXAMPLES=N multiplies
every test's budget by N and VLM2VEC_FUZZ_RANDOM=1 draws fresh cases, for a longer local hunt.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vlm2vec_rt import Embedder, Engine, EngineError, InputError, Item, build_engine
from vlm2vec_rt.cli import main
from vlm2vec_rt.preprocess.images import StoredImage, load_image
from vlm2vec_rt.preprocess.items import MMEB_IMAGE_PLACEHOLDER, read_jsonl_items

_SCALE = max(1, int(os.environ.get("VLM2VEC_FUZZ_EXAMPLES", "1")))


def budget(examples: int):
    """Hypothesis settings for a test of `examples` cases: no per-example deadline (a shared CI machine's
    timings vary), no example database, the same cases every run unless VLM2VEC_FUZZ_RANDOM is set."""
    return settings(
        max_examples=examples * _SCALE,
        deadline=None,
        database=None,
        derandomize=not os.environ.get("VLM2VEC_FUZZ_RANDOM"),
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


# ---- the encoders (one engine for the whole file) ---------------------------------------------------------
@pytest.fixture(scope="module")
def llava(tiny_llava) -> Embedder:
    return Embedder.from_pretrained(tiny_llava)


@pytest.fixture(scope="module")
def qwen(tiny_qwen) -> Embedder:
    return Embedder.from_pretrained(tiny_qwen)


@pytest.fixture(scope="module")
def engine(tiny_llava, tmp_path_factory) -> Engine:
    out = tmp_path_factory.mktemp("fuzz") / "engine"
    return Engine.load(build_engine(tiny_llava, out, precision="fp32", backend="onnxruntime", device="cpu"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Image paths of every kind: good, EXIF-rotated, empty, not an image, a folder, missing."""
    root = tmp_path_factory.mktemp("fuzz_files")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)).save(root / "good.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(root / "rot.jpg", exif=exif)
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    (root / "folder.png").mkdir()
    return {p.name: str(p) for p in root.iterdir()} | {"missing.png": str(root / "missing.png")}


def check_contract(encoder, make_items, batch_size: int = 4) -> np.ndarray | None:
    """Build the items and encode them: unit-norm float32 rows, one per item, or InputError/EngineError."""
    try:
        items = make_items()
        out = encoder.encode(items, batch_size=batch_size)
    except (InputError, EngineError) as e:
        assert str(e).strip(), "an error without a message"
        return None
    assert out.dtype == np.float32 and out.shape == (len(items), encoder.dim)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)
    return out


# ---- strategies -------------------------------------------------------------------------------------------
# every code point, lone surrogates included, and the strings that mean something to the pipeline
_SPECIAL = [
    MMEB_IMAGE_PLACEHOLDER,
    "<image>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<s>",
    "</s>",
    "\x00",
    "\n",
]
_LONG = "long text " * 2500  # some 5,000 tokens: over the tiny models' 4096 (truncated, with a warning)
texts = st.one_of(
    st.none(),
    st.text(st.characters(codec=None, categories=None), max_size=40),
    st.lists(st.sampled_from(_SPECIAL) | st.text(max_size=8), max_size=6).map("".join),
    st.sampled_from([_LONG] + ["a few plain words"] * 5),
)

_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F", "LA", "PA", "RGBX"]


@st.composite
def pil_images(draw) -> Image.Image:
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    mode = draw(st.sampled_from(_MODES))
    img = Image.fromarray(pixels)
    if mode in ("I", "I;16", "F"):
        img = (
            img.convert("L").convert(mode)
            if mode != "I;16"
            else Image.fromarray(pixels[..., 0].astype("<u2") * 257)
        )
    elif mode == "PA":
        img = img.convert("P").convert("PA")
    else:
        img = img.convert(mode)
    if draw(st.booleans()) and mode in ("P", "L", "RGB"):
        img.info["transparency"] = draw(st.integers(0, 255)) if mode != "RGB" else (0, 0, 0)
    return img


@st.composite
def image_bytes(draw) -> bytes:
    img = draw(pil_images())
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]))
    buf = io.BytesIO()
    kwargs = {}
    if fmt == "JPEG" and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 10))  # 1-8 are orientations; 0, 9, 10 are not
        kwargs["exif"] = exif.tobytes()
    try:
        img.save(buf, format=fmt, **kwargs)
    except (OSError, ValueError, KeyError):  # a mode the format cannot store: store it as RGB
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format=fmt, **kwargs)
    data = buf.getvalue()
    damage = draw(st.sampled_from(["none"] * 5 + ["truncate", "flip", "garbage"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
    elif damage == "garbage":
        data = draw(st.binary(max_size=64))
    return data


arrays = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.int32, np.bool_, np.int8]),
    shape=st.one_of(hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=24),
                    st.tuples(st.integers(0, 24), st.integers(0, 24), st.integers(0, 5))),
)  # fmt: skip


good_arrays = hnp.arrays(np.uint8, st.tuples(st.integers(1, 30), st.integers(1, 30), st.just(3)))


def image_sources(files: dict[str, str]):
    """Mostly images that load (so the encoders run), and every kind of bad one."""
    good = ["good.png", "rot.jpg"]
    return st.one_of(
        st.none(),
        good_arrays,
        pil_images(),
        image_bytes(),
        st.sampled_from(good).map(lambda name: files[name]),
        arrays,
        st.sampled_from(sorted(files)).map(lambda name: files[name]),
        st.sampled_from(sorted(files)).map(lambda name: StoredImage(files[name])),
        st.sampled_from([3, 2.5, ["a"], b"", bytearray(b"\x89PNG")]),
    )


def items_of(files):
    return st.builds(lambda t, im, ins: (t, im, ins), texts, image_sources(files), texts)


def _make(fields) -> list:
    return [Item(text=t, image=im, instruction=ins) for t, im, ins in fields]


# ---- Item fields and images through the encoders ----------------------------------------------------------
def test_items_llava(llava, files):
    @budget(30)
    @given(st.lists(items_of(files), min_size=1, max_size=3))
    def run(fields):
        check_contract(llava, lambda: _make(fields))

    run()


def test_items_qwen(qwen, files):
    @budget(20)
    @given(st.lists(items_of(files), min_size=1, max_size=3))
    def run(fields):
        check_contract(qwen, lambda: _make(fields))

    run()


def test_items_engine(engine, files):
    @budget(20)
    @given(st.lists(items_of(files), min_size=1, max_size=3))
    def run(fields):
        check_contract(engine, lambda: _make(fields))

    run()


def test_results_come_back_in_input_order(llava, engine, files):
    """Good items of mixed kinds and lengths: each row is the item's own, whatever the batching."""
    good = st.one_of(
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=30).filter(str.strip),
        st.builds(lambda t, im: Item(text=t, image=im), st.one_of(st.none(), st.text(max_size=10)),
                  st.sampled_from([files["good.png"], files["rot.jpg"]]) | pil_images()),
    )  # fmt: skip

    @budget(8)
    @given(st.lists(good, min_size=2, max_size=7), st.integers(1, 3))
    def run(items, batch_size):
        for encoder in (llava, engine):
            out = check_contract(encoder, lambda: items, batch_size=batch_size)
            assert out is not None
            backwards = encoder.encode(items[::-1], batch_size=batch_size)
            np.testing.assert_allclose(backwards[::-1], out, atol=1e-4)

    run()


def test_encode_arguments(llava, engine):
    """What encode is given as a whole: non-sequences, odd members, batch sizes."""
    members = st.one_of(st.text(max_size=5), st.none(), st.integers(), st.binary(max_size=4), pil_images())
    inputs = st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(members, max_size=4),
                       st.tuples(members), st.dictionaries(st.text(max_size=3), st.text(max_size=3)))  # fmt: skip

    @budget(20)
    @given(inputs, st.integers(-2, 5))
    def run(items, batch_size):
        for encoder in (llava, engine):
            check_contract(encoder, lambda: items, batch_size=batch_size)

    run()


def test_load_image(files):
    """Every image source alone: a uint8 HxWx3 array, or an InputError."""

    @budget(150)
    @given(image_sources(files).filter(lambda x: x is not None), st.one_of(st.none(), st.tuples(
        st.integers(1, 50), st.integers(1, 50))))  # fmt: skip
    def run(source, size):
        try:
            out = load_image(source, size=size, max_pixels=1200)
        except InputError:
            return
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.flags.c_contiguous
        if size is not None:
            assert out.shape[:2] == (size[1], size[0])

    run()


# ---- JSONL files ------------------------------------------------------------------------------------------
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(codec=None, categories=None)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_rows = st.dictionaries(
    st.sampled_from(["text", "image", "instruction", "extra"]),
    _json_values | st.sampled_from(["good.png", "rot.jpg", "missing.png", "folder.png", "", "\x00"]),
    max_size=3,
)
_lines = st.one_of(
    _rows.map(lambda r: json.dumps(r).encode()),
    _rows.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=30),
    st.sampled_from(
        [b"", b"   ", b"{", b'{"text": "a"', b"\xef\xbb\xbf", b"\xff\xfe{", "é".encode("latin-1")]
    ),
)


def _write_jsonl(folder: Path, lines: list[bytes], bom: bool) -> Path:
    path = folder / "items.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines))
    return path


def test_jsonl_reader(files):
    folder = Path(files["good.png"]).parent

    @budget(120)
    @given(st.lists(_lines, max_size=5), st.booleans())
    def run(lines, bom):
        try:
            items = read_jsonl_items(_write_jsonl(folder, lines, bom))
        except InputError as e:
            assert str(e).strip()
            return
        assert items and all(isinstance(i, Item) for i in items)

    run()


# ---- the command line --------------------------------------------------------------------------------------
def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) -> (exit status, stderr); an argparse exit counts as its status."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def check_cli(argv: list[str], capsys, out: Path) -> None:
    code, err = run_cli(argv, capsys)
    # progress bars (tqdm, on stderr) are not error lines
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "encode:" not in line]
    if code == 0:
        vecs = np.load(out, allow_pickle=False)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
        return
    assert code == 2, f"exit {code}: {err}"
    assert len(lines) == 1 and lines[0].startswith("vlm2vec-rt"), err
    assert "Traceback" not in err and "internal error" not in err


@pytest.fixture()
def cached_loads(monkeypatch):
    """Embedder.from_pretrained and Engine.load keep what they loaded, by arguments, for this test: the
    command line still parses, checks and calls them, without reloading a model for every example."""
    for owner, name in ((Embedder, "from_pretrained"), (Engine, "load")):
        real = getattr(owner, name)
        cache: dict = {}

        def cached(path, *, _real=real, _cache=cache, **kwargs):
            key = (os.fspath(path), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
            if key not in _cache:
                _cache[key] = _real(path, **kwargs)
            return _cache[key]

        monkeypatch.setattr(owner, name, staticmethod(cached))


@st.composite
def embed_flags(draw, files: dict[str, str], jsonl: str) -> list[str]:
    """Some of embed's options, each once, mostly with values that pass argparse (so the run gets further)."""
    text = st.text(st.characters(codec=None, categories=None, exclude_characters="\x00"), max_size=12)
    values = {
        "--text": text | st.sampled_from(["a red car", MMEB_IMAGE_PLACEHOLDER, "<image>", _LONG]),
        "--instruction": text | st.just("Represent the given image."),
        "--image": st.sampled_from(sorted(files.values())) | text,
        "--input": st.sampled_from([jsonl] * 4 + [files["good.png"], files["folder.png"], ""]),
        "--batch-size": st.sampled_from(["1", "4", "16", "0", "-3", "x"]),
        "--device": st.sampled_from(["cpu", "cpu", "cuda", "cuda:1", "tpu", "meta", ""]),
        "--dtype": st.sampled_from(["float32", "float16", "bfloat16"]),
        "--image-resolution": st.just("high"),
        "--max-image-pixels": st.sampled_from(["1", "500", "64000000", "0", "1e3"]),
        "--profile": st.sampled_from(["vlm2vec", "vlm2vec-v2", "native", "gme"]),
    }
    # what to embed first (nearly always something), then a few other options
    inputs = draw(
        st.sampled_from([["--text"], ["--image"], ["--text", "--image"], ["--input"], ["--input"], []])
    )
    others = draw(st.lists(st.sampled_from(sorted(values)), unique=True, max_size=3))
    argv: list[str] = []
    for flag in dict.fromkeys(inputs + others):
        argv += [flag, draw(values[flag])]
    return argv


def test_cli_embed(tiny_llava, engine, files, capsys, cached_loads, tmp_path):
    jsonl = tmp_path / "items.jsonl"
    (tmp_path / "good.png").write_bytes(Path(files["good.png"]).read_bytes())
    sources = [["--model", tiny_llava], ["--engine", os.fspath(engine.path)], ["--model", "/no/such/dir"]]

    @budget(25)
    @given(
        st.sampled_from(sources),
        embed_flags(files, os.fspath(jsonl)),
        st.lists(_lines, max_size=3),
        st.sampled_from(["o.npy"] * 8 + ["sub/dir/o.npy", "", ".", "good.png/o.npy"]),
    )
    def run(source, flags, lines, out_name):
        _write_jsonl(tmp_path, lines, False)
        out = tmp_path / out_name
        if out.is_file():  # what an earlier example wrote
            out.unlink()
        check_cli(["embed", *source, *flags, "--out", os.fspath(out) if out_name else ""], capsys, out)

    run()


def test_cli_train_settings(tiny_qwen, capsys, tmp_path):
    numbers = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e-3", "2", "1e400", "0.5", "x"])
    flags = ["--lr", "--temperature", "--weight-decay", "--max-grad-norm", "--lora-dropout", "--lora-alpha",
             "--steps", "--batch-size", "--gc-chunk", "--warmup-steps", "--lora-r", "--max-image-pixels"]  # fmt: skip

    @budget(25)
    @given(
        st.lists(st.tuples(st.sampled_from(flags), numbers), max_size=4),
        st.sampled_from(["cpu", "tpu", "cuda"]),
    )
    def run(pairs, device):
        argv = [
            "train",
            "--model",
            tiny_qwen,
            "--data",
            str(tmp_path / "no-data"),
            "--out",
            str(tmp_path / "run"),
        ]
        argv += ["--device", device]
        for flag, value in pairs:
            argv += [flag, value]
        code, err = run_cli(argv, capsys)
        assert code == 2, f"exit {code}: {err}"  # no data: whatever else, this run cannot start
        assert err.strip().count("\n") == 0 and "Traceback" not in err, err
        assert not (tmp_path / "run").exists()

    run()
