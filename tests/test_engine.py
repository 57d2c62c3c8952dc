"""Engines: parity with eager on both backbones, the precision gates, load checks, failed and killed builds,
concurrency, the CLI. Each engine is built once per module (a build exports two graphs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vlm2vec_rt import Embedder, Engine, EngineError, InputError, Item, build_engine
from vlm2vec_rt.engine import backends, build, ort
from vlm2vec_rt.engine.manifest import PARITY_THRESHOLDS

# engine key -> (backbone fixture, precision, backend)
_BUILDS = {
    "llava_fp32": ("tiny_llava", "fp32", "onnxruntime"),
    "qwen_fp32": ("tiny_qwen", "fp32", "onnxruntime"),
    "qwen_fp16": ("tiny_qwen", "fp16", "onnxruntime"),
    "llava_int8": ("tiny_llava", "int8", "onnxruntime"),
}


@pytest.fixture(scope="module")
def engine_dirs(request, tmp_path_factory) -> dict[str, Path]:
    """Built on first use, once per module."""
    built: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in built:
            model_fixture, precision, backend = _BUILDS[key]
            model = request.getfixturevalue(model_fixture)
            out = tmp_path_factory.mktemp("engines") / key
            built[key] = build_engine(model, out, precision=precision, backend=backend, device="cpu")
        return built[key]

    return get


@pytest.fixture(scope="module")
def eager(tiny_llava, tiny_qwen) -> dict[str, Embedder]:
    return {"llava": Embedder.from_pretrained(tiny_llava), "qwen": Embedder.from_pretrained(tiny_qwen)}


def _fresh_items(photos, rng, n: int = 11) -> list[Item]:
    """Text, image and image+text items: random photo crops (odd sizes) and random word strings."""
    words = [
        "a",
        "photo",
        "of",
        "the",
        "dog",
        "cat",
        "red",
        "street",
        "river",
        "rocket",
        "cup",
        "moon",
        "tower",
    ]
    names = ["chelsea", "coffee", "astronaut", "rocket", "camera", "coins", "china", "flower"]
    items = []
    for k in range(n):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 30))))
        kind = k % 3
        if kind == 0:
            items.append(
                Item(text=text, instruction="Find me an everyday image that matches the given caption: ")
            )
            continue
        img = photos[names[int(rng.integers(len(names)))]]
        h, w = int(rng.integers(9, img.shape[0])), int(rng.integers(9, img.shape[1]))
        crop = np.ascontiguousarray(img[:h, img.shape[1] - w :])
        items.append(
            Item(image=crop, text=text if kind == 2 else None, instruction="Represent the given image.")
        )
    return items


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == np.float32
    return float((a * b).sum(1).min())


# ---- parity ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["llava", "qwen"])
def test_fp32_engine_matches_eager(backbone, engine_dirs, eager, photos, rng):
    engine = Engine.load(engine_dirs(f"{backbone}_fp32"))
    items = _fresh_items(photos, rng)
    ref = eager[backbone].encode(items, batch_size=4)
    assert engine.dim == eager[backbone].dim
    for batch_size in (1, 3, 7):
        got = engine.encode(items, batch_size=batch_size)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert _min_cos(got, ref) >= 0.99999, batch_size


@pytest.mark.parametrize("key", ["qwen_fp16", "llava_int8"])
def test_reduced_precision_engines_pass_their_gates(key, engine_dirs, eager, photos, rng):
    folder = engine_dirs(key)
    manifest = json.loads((folder / "manifest.json").read_text())
    precision = manifest["precision"]
    threshold = PARITY_THRESHOLDS[precision]
    assert manifest["complete"] and manifest["parity"]["threshold"] == threshold
    assert manifest["parity"]["min_cosine"] >= threshold
    # and on inputs the gate never saw
    items = _fresh_items(photos, rng, n=7)
    got = Engine.load(folder).encode(items, batch_size=5)
    assert _min_cos(got, eager[key.split("_")[0]].encode(items)) >= threshold


def test_encode_contract(engine_dirs, photos):
    from PIL import Image

    engine = Engine.load(engine_dirs("llava_fp32"))
    assert engine.encode([]).shape == (0, engine.dim)
    got = engine.encode(["plain text", Image.fromarray(photos["chelsea"])])
    assert got.shape == (2, engine.dim) and got.dtype == np.float32
    with pytest.raises(InputError, match="batch_size"):
        engine.encode(["x"], batch_size=0)
    with pytest.raises(InputError, match="item 1"):
        engine.encode(["fine", Item(image=b"not an image")])
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.encode(["x"])


def test_fingerprint_identifies_the_engine(engine_dirs, eager):
    a = Engine.load(engine_dirs("llava_fp32"))
    assert a.fingerprint == Engine.load(engine_dirs("llava_fp32")).fingerprint
    assert a.fingerprint != Engine.load(engine_dirs("llava_int8")).fingerprint
    assert a.fingerprint != eager["llava"].fingerprint
    assert a.fingerprint != Engine.load(engine_dirs("llava_fp32"), image_resolution="high").fingerprint


def test_concurrent_encode_equals_one_thread(engine_dirs, photos, rng):
    engine = Engine.load(engine_dirs("llava_fp32"))
    items = _fresh_items(photos, rng, n=9)
    expected = engine.encode(items, batch_size=4)
    results, errors = [None] * 8, []

    def work(k: int) -> None:
        try:
            results[k] = engine.encode(items, batch_size=4)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got in results:
        np.testing.assert_allclose(got, expected, atol=1e-6)


# ---- load checks ---------------------------------------------------------------------------------------
@pytest.fixture()
def engine_copy(engine_dirs, tmp_path) -> Path:
    return Path(shutil.copytree(engine_dirs("llava_fp32"), tmp_path / "engine"))


def _edit_manifest(folder: Path, **changes) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_load_missing_file(engine_copy):
    (engine_copy / "decoder.onnx").unlink()
    with pytest.raises(EngineError, match=r"decoder\.onnx.*missing"):
        Engine.load(engine_copy)


def test_load_tampered_file(engine_copy):
    table = engine_copy / "embed_tokens.npy"
    data = bytearray(table.read_bytes())
    data[-1] ^= 1
    table.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"embed_tokens\.npy.*sha256"):
        Engine.load(engine_copy)


def test_load_future_format(engine_copy):
    _edit_manifest(engine_copy, format_version=99)
    with pytest.raises(EngineError, match="format version 99 is newer"):
        Engine.load(engine_copy)


def test_load_backend_not_installed(engine_copy, monkeypatch):
    monkeypatch.setattr(
        ort, "unavailable_reason", lambda device: "onnxruntime is not installed: pip install x"
    )
    with pytest.raises(EngineError, match="onnxruntime backend is not available.*pip install"):
        Engine.load(engine_copy)


def test_load_tensorrt_engine_without_tensorrt(engine_copy):
    if backends.backend_module("tensorrt").unavailable_reason("cuda") is None:
        pytest.skip("TensorRT is installed here")
    _edit_manifest(engine_copy, backend="tensorrt", device="cuda")
    with pytest.raises(EngineError, match=r"tensorrt.*pip install 'vlm2vec-rt\[trt\]'"):
        Engine.load(engine_copy, device="cuda")


# ---- builds that fail ----------------------------------------------------------------------------------
def test_failed_parity_gate_writes_nothing(tiny_llava, engine_dirs, tmp_path, monkeypatch):
    """A gate that cannot pass: the build raises and leaves neither the engine nor its temporary folder."""
    built = engine_dirs("llava_fp32")

    def reuse_export(spec, path):  # skip the export: re-optimise the already built graph
        return Path(shutil.copy(built / f"{spec.name}.onnx", path))

    monkeypatch.setattr(ort, "export_onnx", reuse_export)
    monkeypatch.setitem(build.PARITY_THRESHOLDS, "fp32", 1.5)
    with pytest.raises(EngineError, match="parity gate failed"):
        build_engine(tiny_llava, tmp_path / "eng", precision="fp32", backend="onnxruntime", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_killed_build_leaves_nothing_that_loads(tiny_llava, tmp_path):
    out = tmp_path / "eng"
    script = textwrap.dedent(
        f"""
        import vlm2vec_rt as vr
        vr.build_engine({str(tiny_llava)!r}, {str(out)!r}, precision="fp32", backend="onnxruntime", device="cpu")
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        # kill once the build has started writing into its temporary directory
        while not any(p.name.endswith(".tmp") and any(p.iterdir()) for p in tmp_path.iterdir()):
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert leftovers  # the killed build's temporary folders (nothing could clean them up)
    for folder in leftovers:
        with pytest.raises(EngineError):
            Engine.load(folder)


def test_build_refuses_existing_output_and_bad_arguments(tiny_llava, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(EngineError, match="already exists"):
        build_engine(tiny_llava, tmp_path / "taken", precision="fp32", backend="onnxruntime", device="cpu")
    with pytest.raises(InputError, match="precision"):
        build_engine(tiny_llava, tmp_path / "x", precision="int4")
    with pytest.raises(EngineError, match="int8 engines are built with --backend onnxruntime"):
        build_engine(tiny_llava, tmp_path / "x", precision="int8", backend="aoti", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_tensorrt_missing_is_a_clear_error(tiny_llava, tmp_path):
    if backends.backend_module("tensorrt").unavailable_reason("cuda") is None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(EngineError, match=r"pip install 'vlm2vec-rt\[trt\]'"):
        build_engine(tiny_llava, tmp_path / "x", precision="fp16", backend="tensorrt", device="cuda")


def test_auto_picks_onnxruntime_on_cpu():
    assert backends.pick_auto("fp32", "cpu") == "onnxruntime"
    assert backends.pick_auto("int8", "cpu") == "onnxruntime"


# ---- other backends ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_aoti_engine_matches_eager(tiny_llava, eager, photos, rng, tmp_path):
    folder = build_engine(tiny_llava, tmp_path / "aoti", precision="fp32", backend="aoti", device="cpu")
    items = _fresh_items(photos, rng, n=7)
    got = Engine.load(folder).encode(items, batch_size=3)
    assert _min_cos(got, eager["llava"].encode(items)) >= 0.99999


@pytest.mark.gpu
def test_tensorrt_engine_matches_eager(tiny_llava, eager, photos, rng, tmp_path):
    pytest.importorskip("tensorrt")
    if backends.backend_module("tensorrt").unavailable_reason("cuda") is not None:
        pytest.skip("TensorRT needs a CUDA GPU")
    folder = build_engine(tiny_llava, tmp_path / "trt", precision="fp16", backend="tensorrt", device="cuda")
    items = _fresh_items(photos, rng, n=7)
    got = Engine.load(folder, device="cuda").encode(items, batch_size=3)
    assert _min_cos(got, eager["llava"].encode(items)) >= PARITY_THRESHOLDS["fp16"]


# ---- CLI -----------------------------------------------------------------------------------------------
def test_cli_embed_with_an_engine(engine_dirs, tmp_path, capsys):
    from vlm2vec_rt.cli import main

    folder = engine_dirs("llava_fp32")
    out = tmp_path / "vecs.npy"
    assert main(["embed", "--engine", str(folder), "--text", "a cat", "--out", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), Engine.load(folder).encode(["a cat"]), atol=1e-6)


def test_cli_build_errors_are_one_line(tiny_llava, tmp_path, capsys):
    from vlm2vec_rt.cli import main

    (tmp_path / "taken").mkdir()
    args = ["build", "--model", tiny_llava, "--engine", "fp32", "--backend", "onnxruntime"]
    assert main([*args, "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm2vec-rt build: error:") and "already exists" in err and "\n" not in err
