"""Embedder: round trip, batch invariance, pooling against transformers, adapters, bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import TINY_FIXTURES

from vlm2vec_rt import Embedder, InputError, Item, make_tiny_model

QUESTION = "Represent the given image with the following question: "


def _mixed_items(photos) -> list[Item]:
    """Seven items of different kinds and lengths: text, image, image+text, long text, tiny image."""
    return [
        Item(
            text="a dog running on the beach",
            instruction="Find me an everyday image that matches the given caption: ",
        ),
        Item(image=photos["chelsea"], instruction="Represent the given image."),
        Item(image=photos["coffee"][:150, :400], text="What is in the cup?", instruction=QUESTION),
        Item(text="plane"),
        Item(
            image=photos["astronaut"][::4, ::4], instruction="Represent the given image for classification."
        ),
        Item(text=" ".join(["the quick brown fox jumps over the lazy dog"] * 12)),
        Item(image=photos["rocket"][:31, :17], text="odd sized crop"),
    ]


@pytest.fixture(scope="module")
def embedders(request) -> dict[str, Embedder]:
    return {name: Embedder.from_pretrained(request.getfixturevalue(f)) for name, f in TINY_FIXTURES.items()}


@pytest.fixture(params=list(TINY_FIXTURES))
def emb(request, embedders) -> Embedder:
    return embedders[request.param]


def test_round_trip_unit_norm(emb, photos):
    vecs = emb.encode(_mixed_items(photos), batch_size=3)
    assert vecs.shape == (7, emb.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    # a random model still separates inputs: embeddings must not collapse (a guard for the tests below)
    cos = vecs @ vecs.T
    assert cos[np.triu_indices(7, 1)].max() < 0.99


def test_batch_invariance(emb, photos):
    items = _mixed_items(photos)
    batched = emb.encode(items, batch_size=7)
    alone = np.stack([emb.encode([it])[0] for it in items])
    assert (batched * alone).sum(1).min() >= 0.99999


@pytest.mark.parametrize("backbone", list(TINY_FIXTURES))
def test_deterministic_for_a_seed(tmp_path, backbone, photos):
    items = [Item(text="a cat"), Item(image=photos["chelsea"], text="cat")]
    a = make_tiny_model(tmp_path / "a", backbone, seed=7)
    b = make_tiny_model(tmp_path / "b", backbone, seed=7)
    c = make_tiny_model(tmp_path / "c", backbone, seed=8)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    va, vb, vc = (Embedder.from_pretrained(p).encode(items) for p in (a, b, c))
    np.testing.assert_array_equal(va, vb)
    assert not np.allclose(va, vc, atol=1e-3)


def test_pooling_matches_plain_transformers_forward(emb, photos):
    """The embedding is the model's own final hidden state at the last real token, L2-normalised."""
    items = _mixed_items(photos)
    ours = emb.encode(items, batch_size=7)
    bb = emb.backbone
    batch = bb.to_device(emb.pre.collate([emb.prepare(it) for it in items]))
    kwargs = dict(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values
    )
    if bb.name in ("llava_next", "phi3_v"):
        kwargs["image_sizes"] = batch.image_meta
    else:
        kwargs["image_grid_thw"] = batch.image_meta
        # the default profile's positions (the official VLM2Vec inputs): each real token's index, alike in
        # all three M-RoPE sections (the native profile's M-RoPE is checked in test_fidelity.py)
        positions = torch.zeros((3, *batch.input_ids.shape), dtype=torch.long)
        for row, mask in enumerate(batch.attention_mask.bool()):
            positions[:, row, mask] = torch.arange(int(mask.sum()))
        kwargs["position_ids"] = positions
    with torch.no_grad():
        hidden = bb.inner(**kwargs).last_hidden_state
    # left padding: the last real token of every row is the last position
    assert bool(batch.attention_mask[:, -1].all())
    ref = torch.nn.functional.normalize(hidden[:, -1].float(), dim=-1).numpy()
    assert (ours * ref).sum(1).min() >= 0.99999


def test_high_resolution_gives_17_views(tiny_llava, photos):
    emb = Embedder.from_pretrained(tiny_llava, image_resolution="high")
    _, image = emb.prepare(Item(image=photos["chelsea"]))
    assert image.pixel_values.shape[0] == 17 and image.meta == (1344, 1344)
    assert emb.encode([Item(image=photos["chelsea"])]).shape == (1, emb.dim)
    with pytest.raises(InputError, match="image_resolution"):
        Embedder.from_pretrained(tiny_llava, image_resolution="huge")


def test_overlong_text_is_truncated_keeping_image_tokens(emb, photos, caplog):
    pre = emb.pre
    long_text = "word " * (pre.max_length + 50)
    with caplog.at_level(logging.WARNING, logger="vlm2vec_rt"):
        ids, image = emb.prepare(Item(image=photos["chelsea"], text=long_text))
    assert len(ids) == pre.max_length
    assert sum(t == pre.image_token_id for t in ids) == image.num_tokens
    assert "truncated" in caplog.text
    vec = emb.encode([Item(image=photos["chelsea"], text=long_text)])
    assert np.isfinite(vec).all()


def test_bad_image_in_a_batch_names_the_item(emb, tmp_path, photos):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    items = [Item(text="fine"), Item(image=photos["coins"]), Item(image=bad)]
    with pytest.raises(InputError, match=r"item 2: .*broken\.jpg"):
        emb.encode(items, batch_size=2)
    items = [Item(text=f"fine {k}") for k in range(5)] + [Item(image=bad)]  # in a later window
    with pytest.raises(InputError, match=r"item 5: .*broken\.jpg"):
        emb.encode(items, batch_size=1)


def test_failing_model_step_releases_the_worker_and_the_bar(emb, monkeypatch, assert_encode_cleans_up):
    """When the model raises, the prepare-ahead worker is shut down and the progress bar closed at once."""

    def broken_forward(batch):
        raise RuntimeError("model step failed")

    monkeypatch.setattr(emb.backbone, "forward", broken_forward)
    assert_encode_cleans_up(lambda: emb.encode([f"text {k}" for k in range(9)], batch_size=2))


def test_max_tokens_caps_a_call(emb, monkeypatch):
    """No token cap by default (a call holds up to batch_size items); max_tokens bounds padded tokens a call."""
    items = [f"word {'x ' * k}" for k in range(12)]
    sizes, real = [], emb.backbone.forward

    def counting_forward(batch):
        sizes.append(tuple(batch.input_ids.shape))
        return real(batch)

    monkeypatch.setattr(emb.backbone, "forward", counting_forward)
    want = emb.encode(items, batch_size=12)
    assert sum(b for b, _ in sizes) == 12
    sizes.clear()
    got = emb.encode(items, batch_size=12, max_tokens=40)
    assert all(b == 1 or b * s <= 40 for b, s in sizes) and sum(b for b, _ in sizes) == 12
    assert (got * want).sum(1).min() >= 0.99999


def test_unsupported_model_directories(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Embedder.from_pretrained(tmp_path / "nope")
    with pytest.raises(InputError, match="no config.json"):
        Embedder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(InputError, match="not a supported backbone"):
        Embedder.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(InputError, match="not valid JSON"):
        Embedder.from_pretrained(tmp_path)


def test_empty_inputs(emb):
    assert emb.encode([]).shape == (0, emb.dim)
    with pytest.raises(InputError, match="neither text nor image"):
        emb.encode([Item(text="ok"), ""])
    with pytest.raises(InputError, match="batch_size"):
        emb.encode(["x"], batch_size=0)


def test_progress_bar(emb, capsys):
    emb.encode(["a", "b", "c"], batch_size=2, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_adapter_is_applied(tmp_path, tiny_llava, photos):
    """A peft LoRA adapter directory changes the embeddings exactly as the unmerged peft model does."""
    from peft import LoraConfig, get_peft_model

    from vlm2vec_rt.models.backbones import load_backbone

    bb = load_backbone(tiny_llava)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    peft_model = get_peft_model(bb.model, config)
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # peft initialises B to zero: make the adapter do something
    peft_model.save_pretrained(tmp_path / "adapter")

    items = [Item(text="a cat"), Item(image=photos["chelsea"], instruction="Represent the given image.")]
    base = Embedder.from_pretrained(tiny_llava).encode(items)
    adapted = Embedder.from_pretrained(tiny_llava, adapter=tmp_path / "adapter")
    got = adapted.encode(items)
    # reference: the same backbone with the unmerged adapter in its forward
    unmerged = Embedder(bb)
    want = unmerged.encode(items)
    assert (got * want).sum(1).min() >= 0.99999
    assert (got * base).sum(1).min() < 0.999
    assert adapted.fingerprint != Embedder.from_pretrained(tiny_llava).fingerprint
    with pytest.raises(InputError, match="adapter_config.json"):
        Embedder.from_pretrained(tiny_llava, adapter=tmp_path)


def test_adapter_of_another_model_is_a_clear_error(tmp_path, tiny_llava):
    from peft import LoraConfig, get_peft_model

    from vlm2vec_rt.models.backbones import load_backbone

    other = make_tiny_model(tmp_path / "other", "llava_next", hidden_size=32, num_heads=2)
    config = LoraConfig(r=2, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    get_peft_model(load_backbone(other).model, config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(InputError, match="does not fit the model") as e:
        Embedder.from_pretrained(tiny_llava, adapter=tmp_path / "adapter")
    assert "\n" not in str(e.value)


def test_prepare_many_tiles_together_and_names_the_bad_item(emb, photos):
    pre = emb.pre
    items = [Item(text="x"), Item(image=photos["chelsea"]), Item(image=photos["coins"][:50, :77], text="y")]
    together = pre.prepare_many(items)
    for (ids_a, im_a), item in zip(together, items):
        ids_b, im_b = pre.prepare(item)
        assert ids_a == ids_b
        assert (im_a is None) == (im_b is None)
        if im_a is not None:
            np.testing.assert_array_equal(im_a.pixel_values, im_b.pixel_values)
            assert im_a.meta == im_b.meta
    if pre.name == "qwen2_vl":  # Qwen2-VL refuses aspect ratios over 200
        bad = [Item(image=photos["chelsea"]), Item(image=np.zeros((2, 500, 3), np.uint8))]
        with pytest.raises(InputError, match="item 6: "):
            pre.prepare_many(bad, offset=5)


def test_unusable_device_is_an_input_error(tiny_llava):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            Embedder.from_pretrained(tiny_llava, device="cuda")
    with pytest.raises(InputError, match="is not a device"):
        Embedder.from_pretrained(tiny_llava, device="gpu please")
