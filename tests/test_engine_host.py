"""Engine pieces that need no build: the host side vs eager, the graph wrappers, the batcher, the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm2vec_rt import EngineError, Item
from vlm2vec_rt.engine.export import graph_specs
from vlm2vec_rt.engine.host import (
    HOSTS,
    MAX_VIEWS_PER_CALL,
    mrope_position_ids,
    vision_position_ids,
    write_host_assets,
)
from vlm2vec_rt.engine.manifest import FORMAT_VERSION, read_manifest, verify_files, write_manifest
from vlm2vec_rt.models.backbones import load_backbone
from vlm2vec_rt.preprocess.batching import token_budget_batches


@pytest.fixture(scope="module")
def backbones(tiny_llava, tiny_qwen):
    return {"llava_next": load_backbone(tiny_llava), "qwen2_vl": load_backbone(tiny_qwen)}


@pytest.fixture(scope="module")
def hosts(backbones, tmp_path_factory):
    out = {}
    for name, bb in backbones.items():
        folder = tmp_path_factory.mktemp(f"host_{name}")
        write_host_assets(bb, folder)
        out[name] = HOSTS[name](bb.pre, folder)
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


@pytest.mark.parametrize("name", ["llava_next", "qwen2_vl"])
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


def test_token_budget_batches_bad_limits():
    from vlm2vec_rt import InputError

    with pytest.raises(InputError, match="max_batch"):
        token_budget_batches([1, 2], max_tokens=10, max_batch=0)
    with pytest.raises(InputError, match="max_tokens"):
        token_budget_batches([1, 2], max_tokens=0, max_batch=4)


# ---- manifest ------------------------------------------------------------------------------------------
def _fake_engine(folder):
    (folder / "graph.onnx").write_bytes(b"graph")
    (folder / "sub").mkdir()
    (folder / "sub" / "table.npy").write_bytes(b"table")
    fields = {"backbone": "llava_next", "precision": "fp32", "backend": "onnxruntime", "graphs": {}, "dim": 4}
    return write_manifest(folder, fields, complete=True)


def test_manifest_round_trip_and_tamper_checks(tmp_path):
    written = _fake_engine(tmp_path)
    assert set(written["files"]) == {"graph.onnx", "sub/table.npy"}
    manifest = read_manifest(tmp_path)
    verify_files(tmp_path, manifest)
    (tmp_path / "sub" / "table.npy").write_bytes(b"tablf")
    with pytest.raises(EngineError, match=r"table\.npy.*sha256"):
        verify_files(tmp_path, manifest)
    (tmp_path / "graph.onnx").unlink()
    with pytest.raises(EngineError, match=r"graph\.onnx.*missing"):
        verify_files(tmp_path, manifest)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), "newer than this vlm2vec-rt reads"),
        (lambda m: m.update(complete=False), "did not finish"),
        (lambda m: m.pop("backend"), "missing field 'backend'"),
        (lambda m: m.update(precision="int4"), "unknown precision"),
        (lambda m: m["files"].update({"../outside": "0" * 64}), "outside the engine directory"),
    ],
)
def test_manifest_problems_are_engine_errors(tmp_path, edit, message):
    manifest = _fake_engine(tmp_path)
    edit(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match=message):
        verify_files(tmp_path, read_manifest(tmp_path))


def test_manifest_unreadable(tmp_path):
    with pytest.raises(EngineError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(EngineError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        read_manifest(tmp_path)
