"""Engine pieces that need no build: the host side vs eager, the graph wrappers, the batcher, the manifest,
the parity gate's arithmetic, the AOTInductor build's device handling, the atomic replace."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm2vec_rt import EngineError, InputError, Item
from vlm2vec_rt.backbones.base import MAX_VIEWS_PER_CALL, mrope_position_ids, vision_position_ids
from vlm2vec_rt.engine.export import graph_specs
from vlm2vec_rt.engine.host import HOSTS, write_host_assets
from vlm2vec_rt.engine.manifest import FORMAT_VERSION, read_manifest, verify_files, write_manifest
from vlm2vec_rt.engine.parity import MAX_NORM_ERROR, parity_items, parity_report
from vlm2vec_rt.models.backbones import load_backbone
from vlm2vec_rt.preprocess.batching import token_budget_batches


@pytest.fixture(scope="module")
def backbones(tiny_llava, tiny_qwen, tiny_qwen25):
    return {
        "llava_next": load_backbone(tiny_llava),
        "qwen2_vl": load_backbone(tiny_qwen),
        "qwen2_vl native": load_backbone(tiny_qwen, profile="native"),
        "qwen2_5_vl": load_backbone(tiny_qwen25),
        "qwen2_5_vl native": load_backbone(tiny_qwen25, profile="native"),
    }


@pytest.fixture(scope="module")
def hosts(backbones, tmp_path_factory):
    out = {}
    for name, bb in backbones.items():
        folder = tmp_path_factory.mktemp(f"host_{name.replace(' ', '_')}")
        write_host_assets(bb, folder)
        out[name] = HOSTS[bb.name](bb.pre, folder)
    return out


def _items(photos, rng) -> list[Item]:
    """Random crops of real photos (odd sizes, wide and tall), text-only rows, image+text rows."""
    names = ["chelsea", "coffee", "astronaut", "rocket", "camera"]
    items = [Item(text="a dog running on the beach"), Item(text="plane", instruction="Find it: ")]
    for name in rng.choice(names, size=4, replace=False):
        img = photos[name]
        h = int(rng.integers(17, img.shape[0]))
        w = int(rng.integers(13, img.shape[1]))
        y, x = int(rng.integers(0, img.shape[0] - h + 1)), int(rng.integers(0, img.shape[1] - w + 1))
        text = None if rng.random() < 0.5 else "what is shown here?"
        items.append(Item(image=np.ascontiguousarray(img[y : y + h, x : x + w]), text=text))
    return items


@pytest.mark.parametrize(
    "name", ["llava_next", "qwen2_vl", "qwen2_vl native", "qwen2_5_vl", "qwen2_5_vl native"]
)
def test_host_side_equals_eager(name, backbones, hosts, photos, rng):
    """Vision feeds -> pack -> inputs_embeds and positions, in numpy, match the Backbone's torch methods."""
    bb, host = backbones[name], hosts[name]
    items = _items(photos, rng)
    batch = bb.pre.collate([bb.pre.prepare(it) for it in items])
    tb = bb.to_device(batch)
    with torch.no_grad():
        eager_embeds = bb.inputs_embeds(tb).numpy()
        eager_positions = bb.position_ids(tb).numpy()
        # the vision graph wrapper (what gets exported), run eagerly per feed
        vision = graph_specs(bb)["vision"].module
        outputs = [
            vision(*(torch.from_numpy(v) for v in feed.values())).numpy() for feed in host.vision_feeds(batch)
        ]
    ours = host.inputs_embeds(batch.input_ids, host.pack(outputs, batch))
    np.testing.assert_allclose(ours, eager_embeds, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(host.position_ids(batch), eager_positions)


def test_llava_views_split_across_vision_calls(tiny_llava, tmp_path, photos):
    """High resolution: 17 views per image, more than one vision call per batch; packing still matches."""
    bb = load_backbone(tiny_llava, image_resolution="high")
    write_host_assets(bb, tmp_path)
    host = HOSTS["llava_next"](bb.pre, tmp_path)
    items = [Item(image=photos["chelsea"]), Item(image=photos["coffee"][:100], text="cup")]
    batch = bb.pre.collate([bb.pre.prepare(it) for it in items])
    feeds = host.vision_feeds(batch)
    assert len(feeds) == 2 and sum(len(f["pixel_values"]) for f in feeds) == 34 > MAX_VIEWS_PER_CALL
    tb = bb.to_device(batch)
    with torch.no_grad():
        outputs = [bb.encode_views(torch.from_numpy(f["pixel_values"]), None).numpy() for f in feeds]
        eager = bb.inputs_embeds(tb).numpy()
    np.testing.assert_allclose(
        host.inputs_embeds(batch.input_ids, host.pack(outputs, batch)), eager, atol=1e-5
    )


@pytest.mark.parametrize("grid", [(1, 4, 4), (1, 6, 10), (1, 14, 8), (2, 4, 6)])
def test_qwen_vision_positions_equal_transformers(grid):
    from transformers.vision_utils import get_vision_position_ids

    ref = get_vision_position_ids(torch.tensor([grid]), 2).numpy()
    np.testing.assert_array_equal(vision_position_ids(grid, 2), ref)


def test_mrope_positions_with_padding_and_several_images(backbones):
    """Rows with two images, one, none; left padding; against transformers' get_rope_index."""
    bb = backbones["qwen2_vl"]
    img, start, end = bb.image_token_id, bb.config.vision_start_token_id, bb.config.vision_end_token_id
    grids = [(1, 4, 6), (1, 8, 4), (1, 6, 6)]
    tokens = lambda g: [start] + [img] * (g[0] * g[1] * g[2] // 4) + [end]  # noqa: E731
    rows = [[11, 12, *tokens(grids[0]), 13, *tokens(grids[1]), 14], [15, *tokens(grids[2])], [16, 17, 18]]
    width = max(map(len, rows))
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    ours = mrope_position_ids(ids, mask, grids, img, 2)
    t_ids = torch.from_numpy(ids)
    ref, _ = bb.inner.get_rope_index(
        t_ids, (t_ids == img).int(), image_grid_thw=torch.tensor(grids), attention_mask=torch.from_numpy(mask)
    )
    np.testing.assert_array_equal(ours, ref.numpy())


def test_qwen_vision_graph_per_image_equals_eager(backbones, photos):
    """The exported wrapper (one image, positions passed in) equals the eager tower on that image."""
    bb = backbones["qwen2_vl"]
    vision = graph_specs(bb)["vision"].module
    image = bb.pre.preprocess_image(photos["rocket"][:90, :130])
    with torch.no_grad():
        ours = vision(
            torch.from_numpy(image.pixel_values), torch.from_numpy(vision_position_ids(image.meta, 2))
        )
        ref = bb.encode_views(torch.from_numpy(image.pixel_values), torch.tensor([image.meta]))
    torch.testing.assert_close(ours, ref)


def test_embedding_lookup_rejects_out_of_range_ids(hosts):
    host = hosts["llava_next"]
    with pytest.raises(EngineError, match="token id"):
        host.inputs_embeds(np.array([[1, host.embed_tokens.shape[0]]]), [])


# ---- token-budget batcher ----------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 300), max_size=60),
    max_tokens=st.integers(1, 1000),
    max_batch=st.integers(1, 17),
)
def test_token_budget_batches_cover_and_respect_limits(lengths, max_tokens, max_batch):
    batches = token_budget_batches(lengths, max_tokens=max_tokens, max_batch=max_batch)
    flat = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert sorted(flat.tolist()) == list(range(len(lengths)))  # every item exactly once
    for b in batches:
        longest = max(max(lengths[i] for i in b), 1)
        assert len(b) <= max_batch
        assert len(b) == 1 or len(b) * longest <= max_tokens
    ordered = [lengths[i] for i in flat]
    assert ordered == sorted(ordered, reverse=True)  # longest first


def _plan_cost(lengths, batches, call_cost):
    """(padded tokens + call costs, calls): the batcher's objective, fewest calls breaking ties."""
    return sum(len(b) * max(max(lengths[i] for i in b), 1) + call_cost for b in batches), len(batches)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 80), min_size=1, max_size=9),
    max_tokens=st.integers(1, 300),
    max_batch=st.integers(1, 9),
    call_cost=st.integers(0, 200),
)
def test_token_budget_batches_least_work(lengths, max_tokens, max_batch, call_cost):
    """The plan's padded tokens + call costs equal the best of every split of the length-sorted items, and
    no plan of that cost has fewer batches."""
    batches = token_budget_batches(
        lengths, max_tokens=max_tokens, max_batch=max_batch, call_cost_tokens=call_cost
    )
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = (float("inf"), 0)
    for cuts in itertools.product([False, True], repeat=len(order) - 1):  # every split into runs
        runs, start = [], 0
        for k, cut in enumerate([*cuts, True]):
            if cut:
                runs.append(order[start : k + 1])
                start = k + 1
        longest = [max(max(lengths[i] for i in r), 1) for r in runs]
        if all(
            len(r) <= max_batch and (len(r) == 1 or len(r) * m <= max_tokens) for r, m in zip(runs, longest)
        ):
            best = min(best, _plan_cost(lengths, runs, call_cost))
    assert _plan_cost(lengths, batches, call_cost) == best


def test_token_budget_batches_split_by_call_cost():
    lengths = [60, 12, 58, 10, 61, 11]
    one = token_budget_batches(lengths, max_tokens=8192, max_batch=8, call_cost_tokens=10_000)
    assert [sorted(b.tolist()) for b in one] == [[0, 1, 2, 3, 4, 5]]  # a call dearer than all the padding
    two = token_budget_batches(lengths, max_tokens=8192, max_batch=8, call_cost_tokens=32)
    assert [sorted(b.tolist()) for b in two] == [[0, 2, 4], [1, 3, 5]]
    with pytest.raises(InputError, match="call_cost_tokens"):
        token_budget_batches(lengths, max_tokens=10, max_batch=4, call_cost_tokens=-1)


def test_token_budget_batches_bad_limits():

    with pytest.raises(InputError, match="max_batch"):
        token_budget_batches([1, 2], max_tokens=10, max_batch=0)
    with pytest.raises(InputError, match="max_tokens"):
        token_budget_batches([1, 2], max_tokens=0, max_batch=4)


# ---- manifest ------------------------------------------------------------------------------------------
def _fake_engine(folder):
    (folder / "vision.onnx").write_bytes(b"vision")
    (folder / "sub").mkdir()
    (folder / "sub" / "decoder.onnx").write_bytes(b"decoder")
    (folder / "sub" / "table.npy").write_bytes(b"table")
    graphs = {"vision": {"file": "vision.onnx"}, "decoder": {"file": "sub/decoder.onnx"}}
    fields = {
        "backbone": "llava_next",
        "precision": "fp32",
        "backend": "onnxruntime",
        "graphs": graphs,
        "dim": 4,
    }
    return write_manifest(folder, fields, complete=True)


def _rewrite(folder, manifest) -> dict:
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return read_manifest(folder)


def test_manifest_round_trip_and_tamper_checks(tmp_path):
    written = _fake_engine(tmp_path)
    assert set(written["files"]) == {"vision.onnx", "sub/decoder.onnx", "sub/table.npy"}
    manifest = read_manifest(tmp_path)
    verify_files(tmp_path, manifest, required=["sub/table.npy"])
    (tmp_path / "sub" / "table.npy").write_bytes(b"tablf")
    with pytest.raises(EngineError, match=r"table\.npy.*sha256"):
        verify_files(tmp_path, manifest)
    verify_files(tmp_path, manifest, hashes=False)  # a trusted engine: layout only
    (tmp_path / "vision.onnx").unlink()
    with pytest.raises(EngineError, match=r"vision\.onnx.*missing"):
        verify_files(tmp_path, manifest, hashes=False)


def test_verified_files_are_not_hashed_again_and_a_changed_byte_still_is(tmp_path, monkeypatch):
    from vlm2vec_rt.engine import manifest as manifest_module

    monkeypatch.setenv("VLM2VEC_RT_CACHE_DIR", str(tmp_path / "cache"))
    engine = tmp_path / "engine"
    engine.mkdir()
    _fake_engine(engine)
    manifest = read_manifest(engine)
    hashed = []
    real_sha = manifest_module.sha256_file
    monkeypatch.setattr(
        manifest_module, "sha256_file", lambda path: hashed.append(Path(path).name) or real_sha(path)
    )
    verify_files(engine, manifest)
    assert sorted(hashed) == ["decoder.onnx", "table.npy", "vision.onnx"]
    hashed.clear()
    verify_files(engine, manifest)  # stamped: nothing read again
    assert hashed == []
    # a changed byte with the size and mtime put back is still found (its ctime moved)
    table = engine / "sub" / "table.npy"
    before = table.stat()
    table.write_bytes(b"tablf")
    os.utime(table, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(EngineError, match=r"table\.npy.*sha256"):
        verify_files(engine, manifest)
    assert hashed == ["table.npy"]  # only the file whose stamp no longer holds
    # a cache that cannot be written only costs the hashing
    table.write_bytes(b"table")
    monkeypatch.setenv("VLM2VEC_RT_CACHE_DIR", str(table))  # a file: no folder can be made under it
    verify_files(engine, manifest)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), "newer than this vlm2vec-rt reads"),
        (lambda m: m.update(complete=False), "did not finish"),
        (lambda m: m.pop("backend"), "missing field 'backend'"),
        (lambda m: m.update(precision="int4"), "unknown precision"),
        (lambda m: m["files"].update({"../outside": "0" * 64}), "outside the engine directory"),
        (lambda m: m["files"].update({"x": "not a hash"}), "sha256 hashes"),
    ],
)
def test_manifest_problems_are_engine_errors(tmp_path, edit, message):
    manifest = _fake_engine(tmp_path)
    edit(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=message):
        verify_files(tmp_path, read_manifest(tmp_path))


def _redirect_graph(folder, m, target):
    m["graphs"]["vision"]["file"] = target


@pytest.mark.parametrize(
    "edit, message",
    [
        # the review's case: nothing listed, a graph file outside the directory
        (lambda f, m: (m.update(files={}), _redirect_graph(f, m, "../../etc/passwd")), "outside the engine"),
        (lambda f, m: _redirect_graph(f, m, "/etc/passwd"), "outside the engine"),
        (lambda f, m: _redirect_graph(f, m, "./vision.onnx"), "outside the engine"),
        (lambda f, m: m["files"].update({"sub/../vision.onnx": "0" * 64}), "outside the engine"),
        (lambda f, m: m["files"].update({"/etc/passwd": "0" * 64}), "outside the engine"),
        (lambda f, m: m.update(files={}), "vision.onnx' is loaded by the engine but has no sha256"),
        (lambda f, m: m["files"].pop("sub/decoder.onnx"), "decoder.onnx' is loaded by the engine but has no"),
        (lambda f, m: m["files"].pop("sub/table.npy"), "table.npy' is loaded by the engine but has no"),
        (lambda f, m: (f / "sub" / "extra.json").write_text("{}"), r"extra\.json.*not listed"),
        (lambda f, m: (f / "sub" / "link").symlink_to("/etc"), "links"),
        (lambda f, m: (f / "alias.onnx").symlink_to(f / "vision.onnx"), "links"),
        (lambda f, m: m.update(graphs=[]), "field 'graphs'"),
        (lambda f, m: m["graphs"].pop("decoder"), "field 'graphs'"),
        (lambda f, m: m["graphs"].update(vision="vision.onnx"), "graph 'vision' must be an object"),
        (lambda f, m: m["graphs"]["vision"].update(file=3), "graph 'vision' must be an object"),
    ],
)
def test_everything_loaded_is_listed_and_inside(tmp_path, edit, message):
    """The files in the directory are exactly the listed ones and every path the manifest names (graphs,
    the host's assets) is among them, inside the directory: no file is read that no hash covers."""
    engine = tmp_path / "engine"
    engine.mkdir()
    manifest = _fake_engine(engine)
    edit(engine, manifest)
    with pytest.raises(EngineError, match=message):
        verify_files(engine, _rewrite(engine, manifest), required=["sub/table.npy"], hashes=False)


def test_manifest_unreadable(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(EngineError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        read_manifest(tmp_path)


# ---- parity gate ---------------------------------------------------------------------------------------
class _FixedEncoder:
    def __init__(self, rows: np.ndarray):
        self.rows = rows

    def encode(self, items, batch_size):
        assert len(items) == len(self.rows)
        return self.rows


@pytest.fixture(scope="module")
def unit_rows() -> np.ndarray:
    rows = np.random.default_rng(7).normal(size=(len(parity_items()), 24)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_parity_gate_takes_true_cosines(unit_rows):
    """Rows twice as long point the right way but are not unit: the gate fails on the norm, not passing
    on a dot product of 2; a row slightly long by less than the allowed error passes with cosine <= 1."""
    reference = unit_rows  # the eager reference's embeddings, computed before the build freed the model
    with pytest.raises(EngineError, match="norm 2.0"):
        parity_report(_FixedEncoder(2 * unit_rows), reference, 0.999)
    off = unit_rows.copy()
    off[3] = 1.5 * (0.9 * unit_rows[3] + 0.45 * unit_rows[4])  # dot product > 1, cosine < 0.99
    assert (off[3] * unit_rows[3]).sum() > 1
    with pytest.raises(EngineError, match=r"cosine to eager fp32 is 0\.\d+ on parity item 3"):
        parity_report(_FixedEncoder(off), reference, 0.99)
    report = parity_report(_FixedEncoder(unit_rows * np.float32(1 + 5e-4)), reference, 0.9999)
    assert report["min_cosine"] <= 1.0 and report["min_cosine"] >= 0.9999
    assert 4e-4 < report["max_norm_error"] <= MAX_NORM_ERROR
    zero = unit_rows.copy()
    zero[0] = 0
    with pytest.raises(EngineError, match="parity item 0"):
        parity_report(_FixedEncoder(zero), reference, 0.99)
    with pytest.raises(EngineError, match="reference embeddings for"):
        parity_report(_FixedEncoder(unit_rows), unit_rows[:-1], 0.99)


# ---- AOTInductor build on another device ----------------------------------------------------------------
def test_aoti_build_never_moves_the_reference(tiny_model, monkeypatch, tmp_path):
    """fp32 builds export the reference backbone's own modules: compiling them for another device must
    work on copies, leaving the eager reference (image_newline included) whole on its device for the gate.
    "meta" stands in for cuda here; export and compilation are stubbed."""
    import torch._inductor

    from vlm2vec_rt.engine import aoti

    bb = load_backbone(tiny_model)
    exported = {}

    def fake_export(spec):
        exported[spec.name] = {t.device.type for t in spec.module.parameters()}
        return spec.name

    monkeypatch.setattr(aoti, "export_program", fake_export)
    monkeypatch.setattr(
        torch._inductor, "aoti_compile_and_package", lambda program, package_path: Path(package_path).touch()
    )
    files = aoti.build(graph_specs(bb), tmp_path, precision="fp32", device="meta", work_dir=tmp_path)
    assert files == {"vision": "vision.pt2", "decoder": "decoder.pt2"}
    assert exported == {"vision": {"meta"}, "decoder": {"meta"}}
    assert {t.device.type for t in [*bb.model.parameters(), *bb.model.buffers()]} == {"cpu"}
    # and on the build's own device nothing is copied
    specs = graph_specs(bb)
    assert aoti.module_on(specs["decoder"].module, "cpu") is specs["decoder"].module


# ---- atomic replace ------------------------------------------------------------------------------------
def test_atomic_dir_puts_the_old_directory_back_when_the_swap_fails(tmp_path, monkeypatch):
    """overwrite=True moves the old directory aside, then renames the new one in: if that second rename
    fails, the old one is back in place and nothing is left beside it."""
    from vlm2vec_rt import atomic

    target = tmp_path / "engine"
    target.mkdir()
    (target / "keep.txt").write_text("saved before")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == target and Path(src).name.endswith(".tmp"):
            raise OSError("disk trouble")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk trouble"), atomic.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert (target / "keep.txt").read_text() == "saved before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
