"""Engines: parity with eager on both backbones, the precision gates, load checks, failed and killed builds,
overwrite and leftover handling, concurrency and close, the CLI. Each engine is built once per module (a
build exports two graphs); builds that test the build's own steps reuse those graphs (fast_export)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vlm2vec_rt import Embedder, Engine, EngineError, InputError, Item, build_engine
from vlm2vec_rt.engine import backends, build, ort
from vlm2vec_rt.engine.manifest import PARITY_THRESHOLDS

# engine key -> (backbone fixture, precision, backend[, profile])
_BUILDS = {
    "qwen_native_fp32": ("tiny_qwen", "fp32", "onnxruntime", "native"),
    "qwen25_fp32": ("tiny_qwen25", "fp32", "onnxruntime"),
    "qwen25_int8": ("tiny_qwen25", "int8", "onnxruntime"),
    "llava_fp32": ("tiny_llava", "fp32", "onnxruntime"),
    "qwen_fp32": ("tiny_qwen", "fp32", "onnxruntime"),
    "qwen_fp16": ("tiny_qwen", "fp16", "onnxruntime"),
    "llava_fp16": ("tiny_llava", "fp16", "onnxruntime"),
    "llava_int8": ("tiny_llava", "int8", "onnxruntime"),
    "qwen_int8": ("tiny_qwen", "int8", "onnxruntime"),
}


@pytest.fixture(scope="module")
def engine_dirs(request, tmp_path_factory) -> dict[str, Path]:
    """Built on first use, once per module."""
    built: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in built:
            model_fixture, precision, backend, *profile = _BUILDS[key]
            model = request.getfixturevalue(model_fixture)
            out = tmp_path_factory.mktemp("engines") / key
            built[key] = build_engine(
                model, out, precision=precision, backend=backend, device="cpu", profile=(profile or [None])[0]
            )
        return built[key]

    return get


@pytest.fixture(scope="module")
def eager(tiny_llava, tiny_qwen, tiny_qwen25) -> dict[str, Embedder]:
    return {
        "llava": Embedder.from_pretrained(tiny_llava),
        "qwen": Embedder.from_pretrained(tiny_qwen),
        "qwen25": Embedder.from_pretrained(tiny_qwen25),
    }


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
@pytest.mark.parametrize("backbone", ["llava", "qwen", "qwen25"])
def test_fp32_engine_matches_eager(backbone, engine_dirs, eager, photos, rng):
    engine = Engine.load(engine_dirs(f"{backbone}_fp32"))
    items = _fresh_items(photos, rng)
    ref = eager[backbone].encode(items, batch_size=4)
    assert engine.dim == eager[backbone].dim
    for batch_size in (1, 3, 7):
        got = engine.encode(items, batch_size=batch_size)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert _min_cos(got, ref) >= 0.99999, batch_size


def test_engine_follows_its_profile(engine_dirs, tiny_qwen, photos, rng):
    """A Qwen2-VL engine built under the native profile (M-RoPE positions from the host side) matches eager
    under that profile, records it, and encodes under no other."""
    folder = engine_dirs("qwen_native_fp32")
    engine = Engine.load(folder)
    assert (
        engine.profile == "native"
        and json.loads((folder / "manifest.json").read_text())["profile"] == "native"
    )
    items = _fresh_items(photos, rng)
    native = Embedder.from_pretrained(tiny_qwen, profile="native").encode(items)
    assert _min_cos(engine.encode(items, batch_size=3), native) >= 0.99999
    with pytest.raises(EngineError, match="built under profile 'native'.*cannot encode under 'vlm2vec'"):
        Engine.load(folder, profile="vlm2vec")
    assert Engine.load(engine_dirs("qwen_fp32")).profile == "vlm2vec"


@pytest.mark.parametrize("key", ["qwen_fp16", "llava_fp16", "llava_int8", "qwen_int8", "qwen25_int8"])
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


def test_only_the_decoder_session_spins(engine_dirs):
    # two thread pools share the cores: the vision pool must sleep while the decoder's works
    def allow_spinning(session) -> str:
        try:
            return session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # not set: onnxruntime's default, spinning on
            return "default"

    runner = Engine.load(engine_dirs("llava_fp32")).runner
    assert allow_spinning(runner.sessions["vision"]) == "0"
    assert allow_spinning(runner.sessions["decoder"]) == "default"


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


@pytest.mark.parametrize("graph", ["vision", "decoder"])
def test_close_from_another_thread_during_encode(graph, engine_dirs, photos):
    """close() while an encode is between graph calls (after the vision call of a batch, or after a
    batch's decoder call): the encode fails with EngineError, not an AttributeError on a None runner."""
    engine = Engine.load(engine_dirs("llava_fp32"))
    runner = engine.runner
    real_run = runner.run

    def run_then_close(name, feeds):
        out = real_run(name, feeds)
        if name == graph:
            closer = threading.Thread(target=engine.close)
            closer.start()
            closer.join()
        return out

    runner.run = run_then_close
    items = [Item(image=photos["chelsea"][:90, :70]), Item(image=photos["coffee"][:50, :80])]
    with pytest.raises(EngineError, match="closed"):
        engine.encode(items, batch_size=1)
    with pytest.raises(EngineError, match="closed"):
        engine.encode(["x"])


def test_failing_model_step_releases_the_worker_and_the_bar(
    engine_dirs, monkeypatch, assert_encode_cleans_up
):
    """When the model step raises, the prepare-ahead worker is shut down and the progress bar closed at once."""
    engine = Engine.load(engine_dirs("llava_fp32"))

    def broken_step(batch):
        raise RuntimeError("model step failed")

    monkeypatch.setattr(engine, "run_batch", broken_step)
    assert_encode_cleans_up(lambda: engine.encode([f"text {k}" for k in range(20)], batch_size=2))


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


def test_load_refuses_engines_built_before_profiles(engine_copy):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    del manifest["profile"]
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="built before pipeline profiles.*rebuild"):
        Engine.load(engine_copy)


def test_load_refuses_an_unknown_profile(engine_copy):
    with pytest.raises(InputError, match="profile must be one of"):
        Engine.load(engine_copy, profile="gme")
    _edit_manifest(engine_copy, profile="gme")
    with pytest.raises(EngineError, match="unknown profile 'gme'"):
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


def test_load_refuses_a_graph_outside_the_engine(engine_copy, tmp_path):
    """A graph file named by a path outside the directory (with its hash listed) is refused before any
    backend reads it, with or without hashing."""
    outside = Path(shutil.copy(engine_copy / "vision.onnx", tmp_path / "elsewhere.onnx"))
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["graphs"]["vision"]["file"] = "../elsewhere.onnx"
    manifest["files"]["../elsewhere.onnx"] = manifest["files"].pop("vision.onnx")
    (engine_copy / "vision.onnx").unlink()
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    for verify in (True, False):
        with pytest.raises(EngineError, match=r"elsewhere\.onnx.*outside the engine directory"):
            Engine.load(engine_copy, verify=verify)
    assert outside.exists()


@pytest.mark.parametrize("name", ["embed_tokens.npy", "image_newline.npy", "decoder.onnx", "preprocessor"])
def test_load_refuses_files_without_a_hash(engine_copy, name):
    """A file the engine reads whose entry was taken out of 'files' (and which was then changed) is refused:
    the graphs, the host's assets and every preprocessor file are covered."""
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    if name == "preprocessor":
        name = next(n for n in manifest["files"] if n.startswith("preprocessor/"))
    del manifest["files"][name]
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    with (engine_copy / name).open("ab") as f:
        f.write(b" ")
    with pytest.raises(EngineError, match=re.escape(name.rsplit("/")[-1]) + ".*(has no sha256|not listed)"):
        Engine.load(engine_copy)


def test_load_refuses_added_files(engine_copy):
    (engine_copy / "preprocessor" / "added_tokens.json").write_text('{"<x>": 5}')
    with pytest.raises(EngineError, match=r"added_tokens\.json.*not listed"):
        Engine.load(engine_copy, verify=False)


# ---- builds that fail, are killed, replace ---------------------------------------------------------------
@pytest.fixture()
def fast_export(engine_dirs, monkeypatch) -> Path:
    """Builds in this test skip the export: the onnxruntime backend re-optimises the llava fp32 graphs."""
    built = engine_dirs("llava_fp32")

    def reuse_export(spec, path):
        return Path(shutil.copy(built / f"{spec.name}.onnx", path))

    monkeypatch.setattr(ort, "export_onnx", reuse_export)
    return built


def _fp32_build(model: str, out: Path, **kwargs) -> Path:
    return build_engine(model, out, precision="fp32", backend="onnxruntime", device="cpu", **kwargs)


def test_failed_parity_gate_writes_nothing(tiny_llava, fast_export, tmp_path, monkeypatch):
    """A gate that cannot pass: the build raises and leaves neither the engine nor its temporary folder."""
    monkeypatch.setitem(build.PARITY_THRESHOLDS, "fp32", 1.5)
    with pytest.raises(EngineError, match="parity gate failed"):
        _fp32_build(tiny_llava, tmp_path / "eng")
    assert list(tmp_path.iterdir()) == []


_BUILD_SCRIPT = """
import os, shutil, signal, sys, time
import vlm2vec_rt as vr
from vlm2vec_rt import atomic
from vlm2vec_rt.engine import build, ort
model, out, stage, graphs = sys.argv[1:5]
if graphs:  # skip the export (as fast_export does)
    ort.export_onnx = lambda spec, path: shutil.copy(os.path.join(graphs, spec.name + ".onnx"), path)
if stage == "gate-passed":  # the real gate runs, then the build waits here to be killed
    real_gate = build.parity_report
    def gate_then_wait(*args, **kwargs):
        report = real_gate(*args, **kwargs)
        open(out + ".gate-passed", "w").close()
        time.sleep(600)
    build.parity_report = gate_then_wait
if stage == "swap":  # killed between atomic_dir's two renames: the old engine aside, the new one not in
    real_replace = os.replace
    def replace(src, dst):
        if os.fspath(dst) == out and os.fspath(src).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    atomic.os.replace = replace
vr.build_engine(model, out, precision="fp32", backend="onnxruntime", device="cpu", overwrite=True)
"""


def _start_build(model: str, out: Path, stage: str, graphs: Path | str = "") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _BUILD_SCRIPT, model, os.fspath(out), stage, os.fspath(graphs)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_killed_build_leaves_nothing_that_loads_and_the_next_build_cleans_up(
    tiny_llava, fast_export, tmp_path
):
    """A real build killed after its parity gate passed (everything written, the manifest not yet
    complete) leaves no directory that loads; the next build into the same place removes what it left.
    Temporary folders of another name are not touched."""
    out = tmp_path / "eng"
    proc = _start_build(tiny_llava, out, "gate-passed")
    marker = tmp_path / "eng.gate-passed"
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    marker.unlink()
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert leftovers and all(p.name.startswith(".eng.") and p.name.endswith(".tmp") for p in leftovers)
    for folder in leftovers:
        assert (folder / "decoder.onnx").exists() and (folder / "manifest.json").exists()
        with pytest.raises(EngineError, match="did not finish"):
            Engine.load(folder)
    other = tmp_path / ".eng.x.abc123de.tmp"  # a build of "eng.x" (a live one, for all we know)
    other.mkdir()
    _fp32_build(tiny_llava, out)
    assert _siblings(tmp_path) == [other.name, "eng"]
    assert Engine.load(out).dim == Engine.load(fast_export).dim


def test_build_killed_while_replacing_puts_the_old_engine_back(tiny_llava, fast_export, tmp_path):
    """--overwrite killed between its two renames (old engine moved aside, new one not yet in place):
    the next build into the same place puts the old engine back before anything else."""
    out = tmp_path / "eng"
    shutil.copytree(fast_export, out)
    created = json.loads((out / "manifest.json").read_text())["created"]
    proc = _start_build(tiny_llava, out, "swap", graphs=fast_export)
    try:
        assert proc.wait(timeout=180) == -signal.SIGKILL  # it kills itself there
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    assert any(p.name.endswith(".old") for p in tmp_path.iterdir())
    with pytest.raises(EngineError, match="already exists"):
        _fp32_build(tiny_llava, out)  # no --overwrite: the engine put back stays
    assert _siblings(tmp_path) == ["eng"]
    assert json.loads((out / "manifest.json").read_text())["created"] == created
    Engine.load(out)


def test_a_live_build_is_never_disturbed(tiny_llava, tmp_path):
    """While a build of out_dir holds its lock, another build into out_dir stops at once and leaves the
    live one's folders alone."""
    out = tmp_path / "eng"
    with build._build_lock(out) as locked:
        assert locked
        live = tmp_path / ".eng.abc123de.tmp"
        live.mkdir()
        with pytest.raises(EngineError, match="another build into .* is running"):
            _fp32_build(tiny_llava, out)
        assert live.is_dir()
    assert _siblings(tmp_path) == [live.name]  # the lock file goes with the build


def test_build_refuses_existing_output_and_bad_arguments(tiny_llava, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.tex").write_text("years of work")
    with pytest.raises(EngineError, match="already exists"):
        _fp32_build(tiny_llava, tmp_path / "taken")
    with pytest.raises(InputError, match="precision"):
        build_engine(tiny_llava, tmp_path / "x", precision="int4")
    with pytest.raises(EngineError, match="int8 engines are built with --backend onnxruntime"):
        build_engine(tiny_llava, tmp_path / "x", precision="int8", backend="aoti", device="cpu")
    assert _siblings(tmp_path) == ["taken"]


def test_overwrite_replaces_only_an_engine_or_an_empty_folder(tiny_llava, fast_export, tmp_path):
    """--overwrite on a folder that is not an engine (or on a file) is refused and deletes nothing; an
    engine, or an empty folder, is replaced."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "thesis.tex").write_text("years of work")
    (tmp_path / "notes.txt").write_text("keep")
    for target in (tmp_path / "taken", tmp_path / "notes.txt"):
        with pytest.raises(EngineError, match="is not an engine directory.*refusing to replace it"):
            _fp32_build(tiny_llava, target, overwrite=True)
    assert (tmp_path / "taken" / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "notes.txt").read_text() == "keep"

    engine = Path(shutil.copytree(fast_export, tmp_path / "engine"))
    (engine / "stale.txt").write_text("from the old engine")
    (tmp_path / "empty").mkdir()
    for target in (engine, tmp_path / "empty"):
        _fp32_build(tiny_llava, target, overwrite=True)
        assert not (target / "stale.txt").exists()
        Engine.load(target)
    assert _siblings(tmp_path) == ["empty", "engine", "notes.txt", "taken"]


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
def test_aoti_cuda_fp32_engine_matches_eager(tiny_llava, eager, photos, rng, tmp_path):
    """An fp32 build exports the reference's own modules; compiling them for cuda must leave the eager
    reference whole on the CPU for the parity gate (review finding: it was moved in place)."""
    if backends.backend_module("aoti").unavailable_reason("cuda") is not None:
        pytest.skip("needs a CUDA GPU")
    folder = build_engine(tiny_llava, tmp_path / "aoti", precision="fp32", backend="aoti", device="cuda")
    items = _fresh_items(photos, rng, n=7)
    got = Engine.load(folder, device="cuda").encode(items, batch_size=3)
    assert _min_cos(got, eager["llava"].encode(items)) >= PARITY_THRESHOLDS["fp32"]


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
