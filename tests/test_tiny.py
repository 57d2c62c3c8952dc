"""make_tiny_model: complete HF-format directories of the real architectures, sized by keywords."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from vlm2vec_rt import InputError, make_tiny_model
from vlm2vec_rt.models.preprocessors import load_preprocessor


def _num_params(path) -> int:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)


def test_every_backbone_has_a_tiny_fixture():
    from conftest import TINY_FIXTURES

    from vlm2vec_rt.backbones import NAMES

    assert set(TINY_FIXTURES) == set(NAMES)


def test_default_sizes_are_under_a_million(tiny_llava, tiny_qwen, tiny_qwen25):
    for path in (Path(tiny_llava), Path(tiny_qwen), Path(tiny_qwen25)):
        files = {p.name for p in path.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
        assert "preprocessor_config.json" in files
        assert 100_000 < _num_params(path) < 1_000_000


def test_llava_processor_goes_up_to_1344(tiny_llava):
    pre = load_preprocessor(tiny_llava)
    assert [1344, 1344] in pre.grid_pinpoints and pre.crop_size == 336
    assert pre.tokenizer.convert_ids_to_tokens(pre.image_token_id) == "<image>"
    # Llama tokenizers prepend <s>
    assert pre.tokenizer("hi")["input_ids"][0] == pre.tokenizer.bos_token_id


def test_qwen_tokenizer_knows_the_vision_tokens(tiny_qwen):
    pre = load_preprocessor(tiny_qwen)
    for tok in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert tok in pre.tokenizer.get_vocab()
    assert pre.tokenizer.convert_ids_to_tokens(pre.image_token_id) == "<|image_pad|>"
    config = json.loads((Path(tiny_qwen) / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"


def test_sizes_are_keywords(tmp_path):
    path = make_tiny_model(
        tmp_path / "m", "qwen2_vl", hidden_size=96, num_layers=3, num_heads=6, vocab_size=600
    )
    cfg = json.loads((path / "config.json").read_text())["text_config"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["vocab_size"]) == (
        96,
        3,
        6,
        600,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backbone="bert"), "backbone must be one of"),
        (dict(hidden_size=0), "positive int"),
        (dict(hidden_size=65, num_heads=4), "multiple of num_heads"),
        (dict(vocab_size=100), "vocab_size must be at least"),
        (dict(image_size=300, patch_size=56), "multiple of patch_size"),
        (dict(vision_layers=1), "vision_layers"),
        (dict(depth=3), "unknown size keyword"),
        (dict(patch_size=0), "patch_size must be a positive int"),
        (dict(vision_heads=0), "vision_heads must be a positive int"),
        (dict(intermediate_size=-1), "intermediate_size must be a positive int"),
        (dict(num_layers=2.5), "num_layers must be a positive int"),
    ],
)
def test_bad_sizes(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        make_tiny_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        make_tiny_model(tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"


# published sizes of the checkpoints the presets copy (parameters, with the LM head; tied heads counted once)
PUBLISHED = {
    ("llava_next", "llava-next-7b"): 7.57e9,
    ("qwen2_vl", "qwen2-vl-2b"): 2.21e9,
    ("qwen2_vl", "qwen2-vl-7b"): 8.29e9,
    ("qwen2_5_vl", "qwen2.5-vl-3b"): 3.75e9,
    ("qwen2_5_vl", "qwen2.5-vl-7b"): 8.29e9,
}


@pytest.mark.parametrize("backbone, preset", sorted(PUBLISHED))
def test_presets_have_the_real_shapes(backbone, preset):
    """Each preset builds (on the meta device: no memory) a model of its checkpoint's parameter count."""
    import torch

    from vlm2vec_rt.backbones import REGISTRY
    from vlm2vec_rt.models.tiny import _build_tokenizer, tiny_options

    spec = REGISTRY[backbone].tiny
    opts = tiny_options(backbone, size=preset)
    with torch.device("meta"):
        model, _ = spec.build(_build_tokenizer(spec, 600), opts)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PUBLISHED[backbone, preset]) / PUBLISHED[backbone, preset] < 0.005
    text = model.config.text_config
    assert text.num_key_value_heads < text.num_attention_heads  # grouped-query attention, as the real ones


def test_every_preset_is_listed():
    from vlm2vec_rt.backbones import REGISTRY

    listed = {(name, p) for name, e in REGISTRY.items() for p in e.tiny.presets}
    assert {k for k in listed if k[0] != "phi3_v"} == set(PUBLISHED)


def test_grouped_query_attention_and_tied_embeddings(tmp_path, photos):
    from vlm2vec_rt import Embedder, Item

    path = make_tiny_model(
        tmp_path / "m",
        "qwen2_vl",
        num_key_value_heads=2,
        tie_word_embeddings=True,
        vision_intermediate_size=64,
    )
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["text_config"]["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is True
    assert cfg["vision_config"]["mlp_ratio"] == 2  # 64 / 32: its own width, not the decoder's
    vecs = Embedder.from_pretrained(path).encode([Item(text="a cat"), Item(image=photos["chelsea"])])
    assert vecs.shape == (2, 64)
    with pytest.raises(InputError, match="multiple of num_key_value_heads"):
        make_tiny_model(tmp_path / "bad", "qwen2_vl", num_key_value_heads=3)
    with pytest.raises(InputError, match="unknown size 'qwen9'.*known: qwen2-vl-2b"):
        make_tiny_model(tmp_path / "bad", "qwen2_vl", size="qwen9")
