"""Phi-3.5-V (phi3_v): the official pipeline, written here from the official code, against vlm2vec-rt.

The reference side reads the directory as the official code does and uses none of vlm2vec_rt's model code:
  processor: `Phi3VProcessor._convert_images_texts_to_inputs`: the text split at `<|image_N|>`, each chunk
             tokenised with the tokenizer's defaults (its own `<s>`), `-N` repeated num_img_tokens times
             between; images `convert_to_rgb` + the plain-Python Phi3VImageProcessor (phi3v_reference), all
             num_crops + 1 views (zero views included) through the tower;
  image:     `Phi3ImageEmbedding`: CLIPVisionModel hidden_states[layer_idx], CLS dropped;
             `hd_feature_transform`: 2x2 merge, sub_GN after each row, [crops, glb_GN, global view], then
             img_projection of the concatenation; `index_put` at the negative ids (clamped to 0 for the lookup);
  decoder:   the official Phi3DecoderLayer maths (qkv_proj split, Su-scaled RoPE, eager causal attention,
             gate_up_proj chunked, RMSNorm), one unpadded item at a time;
  pool:      the final norm's state at the last token, L2-normalised.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open

from vlm2vec_rt import Embedder, Engine, InputError, Item, build_engine, make_tiny_model
from vlm2vec_rt.backbones import phi3_v
from vlm2vec_rt.preprocess.phi3v import phi3v_reference

ROWS = {  # MMEB-eval rows: instruction and placeholder already in the text
    "image+text": "<|image_1|>\nRepresent the given image with the following question: What is in the image?\n",
    "image": "<|image_1|>\nRepresent the given image.\n",
    "text": "Find me an everyday image that matches the given caption: A cat sitting on a table.\n",
}
PATTERN = r"<\|image_\d+\|>"


@pytest.fixture(scope="module")
def model_dir(tiny_phi3v) -> str:
    return tiny_phi3v


@pytest.fixture(scope="module")
def images(tmp_path_factory, photos) -> dict[str, str]:
    """Palette, grey (tall: a 2x1 grid of crops), tiny, wide, photo and 1344x1344 files."""
    folder = tmp_path_factory.mktemp("phi_images")
    photo = Image.fromarray(photos["chelsea"])
    made = {
        "photo.jpg": photo,
        "palette.png": photo.resize((173, 131)).quantize(colors=37),
        "grey.png": photo.convert("L").resize((97, 150)),
        "tiny.png": photo.resize((20, 20)),
        "wide.png": photo.resize((300, 40)),  # a 1x4 grid of crops
        "big.jpg": photo.resize((1344, 1344)),
    }
    for name, img in made.items():
        img.save(folder / name)
    return {name: str(folder / name) for name in made}


@pytest.fixture(scope="module")
def emb(model_dir) -> Embedder:
    return Embedder.from_pretrained(model_dir)


# ---- the official pipeline ---------------------------------------------------------------------------
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Official:
    """The official Phi-3.5-V processor and model on a directory (weights read as the checkpoint stores them)."""

    def __init__(self, model_dir: str, num_crops: int | None = None):
        d = Path(model_dir)
        self.c = json.loads((d / "config.json").read_text())
        proc = json.loads((d / "preprocessor_config.json").read_text())
        self.num_crops = num_crops or proc["num_crops"]
        self.mean, self.std = proc["image_mean"], proc["image_std"]
        self.tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            self.w = {k: f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
        img = self.c["img_processor"]
        self.clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**img["clip_vision_config"]))
        prefix = "model.vision_embed_tokens.img_processor.vision_model."
        self.clip.load_state_dict({k[len(prefix) :]: v for k, v in self.w.items() if k.startswith(prefix)})
        self.clip.eval()
        self.layer_idx = img.get("layer_idx", -2)
        self.features: dict[str, torch.Tensor] = {}  # image path -> image_features (the tests share them)

    # processor
    def inputs(self, text: str, image_path: str | None):
        """(input_ids with -1 at image slots, pixel_values [num_crops + 1, 3, 336, 336], image_size)."""
        if image_path is None:
            return self.tokenizer(text)["input_ids"], None, None
        from transformers.image_transforms import convert_to_rgb

        rgb = np.asarray(convert_to_rgb(Image.open(image_path)))
        pixel_values, size, num_tokens = phi3v_reference(
            rgb, num_crops=self.num_crops, mean=self.mean, std=self.std
        )
        chunks = [self.tokenizer(chunk)["input_ids"] for chunk in re.split(PATTERN, text)]
        tags = [int(s.split("|")[1].split("_")[-1]) for s in re.findall(PATTERN, text)]
        pads = [[-tag] * num_tokens for tag in tags]
        if len(chunks) > len(pads):
            pads.append([])
        ids = [t for pair in zip(chunks, pads) for part in pair for t in part]
        return ids, pixel_values, size

    # Phi3ImageEmbedding
    def _merge(self, feats: torch.Tensor, h_crop: int, w_crop: int) -> torch.Tensor:
        n, length, c = feats.shape
        side = int(length**0.5)
        num_images = n // (h_crop * w_crop)
        return (
            feats.reshape(n, side, side, c)
            .reshape(n, side // 2, 2, side // 2, 2, c)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(n, -1, 4 * c)
            .reshape(num_images, h_crop, w_crop, side // 2, side // 2, -1)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(num_images, h_crop * side // 2, w_crop * side // 2, 4 * c)
        )

    def _newline(self, hd: torch.Tensor) -> torch.Tensor:
        n, h, w, dim = hd.shape
        newline = self.w["model.vision_embed_tokens.sub_GN"].expand(n, h, -1, -1)
        return torch.cat([hd, newline], dim=2).reshape(n, -1, dim)

    @torch.no_grad()
    def image_features(self, pixel_values: np.ndarray, size) -> torch.Tensor:
        out = self.clip(torch.from_numpy(pixel_values), output_hidden_states=True)
        feats = out.hidden_states[self.layer_idx][:, 1:][None]  # (1, num_crops + 1, 576, C)
        glb = self._newline(self._merge(feats[:, 0], 1, 1))
        h_crop, w_crop = size[0] // 336, size[1] // 336
        sub = self._newline(self._merge(feats[0, 1 : 1 + h_crop * w_crop], h_crop, w_crop))
        seq = torch.cat([sub.squeeze(0), self.w["model.vision_embed_tokens.glb_GN"].squeeze(0), glb[0]])
        p = "model.vision_embed_tokens.img_projection."
        x = torch.nn.functional.linear(seq, self.w[p + "0.weight"], self.w[p + "0.bias"])
        return torch.nn.functional.linear(
            torch.nn.functional.gelu(x), self.w[p + "2.weight"], self.w[p + "2.bias"]
        )

    # Phi3VModel with Phi3DecoderLayer (eager attention), one unpadded sequence
    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> np.ndarray:
        c, w = self.c, self.w
        heads = c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or heads
        head_dim = c["hidden_size"] // heads
        length = x.shape[0]
        # Phi3SuScaledRotaryEmbedding: seq_len = max(position_ids) + 1
        original = c["original_max_position_embeddings"]
        rs = c["rope_scaling"]
        ext = torch.tensor(
            rs["long_factor"] if length > original else rs["short_factor"], dtype=torch.float32
        )
        inv_freq = 1.0 / (ext * c["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs = torch.arange(length).float()[:, None] * inv_freq[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = c["max_position_embeddings"] / original
        factor = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(original))
        cos, sin = emb.cos() * factor, emb.sin() * factor
        mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
        eps = c["rms_norm_eps"]
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            residual, h = x, _rms(x, w[p + "input_layernorm.weight"], eps)
            qkv = h @ w[p + "self_attn.qkv_proj.weight"].T
            q = qkv[:, : heads * head_dim].view(length, heads, head_dim).transpose(0, 1)
            k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(length, kv_heads, head_dim)
            v = qkv[:, (heads + kv_heads) * head_dim :].view(length, kv_heads, head_dim)
            k, v = k.transpose(0, 1), v.transpose(0, 1)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            k, v = k.repeat_interleave(heads // kv_heads, 0), v.repeat_interleave(heads // kv_heads, 0)
            attn = torch.softmax(
                q @ k.transpose(1, 2) / math.sqrt(head_dim) + mask, dim=-1, dtype=torch.float32
            )
            out = (attn @ v).transpose(0, 1).reshape(length, -1) @ w[p + "self_attn.o_proj.weight"].T
            x = residual + out
            residual, h = x, _rms(x, w[p + "post_attention_layernorm.weight"], eps)
            gate, up = (h @ w[p + "mlp.gate_up_proj.weight"].T).chunk(2, dim=-1)
            x = residual + (up * torch.nn.functional.silu(gate)) @ w[p + "mlp.down_proj.weight"].T
        x = _rms(x, w["model.norm.weight"], eps)
        return torch.nn.functional.normalize(x[-1], dim=-1).numpy()

    def embed(self, text: str, image_path: str | None) -> np.ndarray:
        ids, pixel_values, size = self.inputs(text, image_path)
        ids = torch.tensor(ids)
        x = self.w["model.embed_tokens.weight"][ids.clamp_min(0)]
        if pixel_values is not None:
            if image_path not in self.features:
                self.features[image_path] = self.image_features(pixel_values, size)
            x = x.index_put(torch.nonzero(ids < 0, as_tuple=True), self.features[image_path])
        return self.decode(x)


@pytest.fixture(scope="module")
def official(model_dir) -> Official:
    return Official(model_dir)


def _items(images: dict[str, str]) -> tuple[list[Item], list[tuple[str, str | None]]]:
    items, rows = [Item(text=ROWS["text"])], [(ROWS["text"], None)]
    for k, path in enumerate(images.values()):
        row = ROWS["image+text"] if k % 2 else ROWS["image"]
        items.append(Item(text=row, image=path))
        rows.append((row, path))
    return items, rows


# ---- fidelity --------------------------------------------------------------------------------------------
def test_token_ids_and_pixels_follow_the_official_processor(emb, official, images):
    for item, (row, path) in zip(*_items(images)):
        ids, image = emb.prepare(item)
        want, pixel_values, size = official.inputs(row, path)
        assert ids == [emb.pre.image_token_id if t < 0 else t for t in want], path
        if path is None:
            assert ids[0] == emb.pre.tokenizer.bos_token_id and image is None
            continue
        # <s>, the image's slots, <s> again before the text after the image
        bos = emb.pre.tokenizer.bos_token_id
        assert ids[0] == bos and ids[image.num_tokens + 1] == bos
        assert image.num_tokens == sum(t < 0 for t in want) and image.meta == tuple(size)
        views = image.pixel_values.shape[0]
        assert views == 1 + (size[0] // 336) * (size[1] // 336)
        np.testing.assert_allclose(image.pixel_values, pixel_values[:views], atol=2e-2)
        assert not pixel_values[views:].any()  # what is left out is the processor's zero padding


def test_image_features_equal_the_official_hd_transform(emb, official, images):
    bb = emb.backbone
    for name in ("grey.png", "wide.png", "big.jpg"):
        _, pixel_values, size = official.inputs(ROWS["image"], images[name])
        views = 1 + (size[0] // 336) * (size[1] // 336)
        with torch.no_grad():
            feats = bb.encode_views(torch.from_numpy(pixel_values[:views]), None)
            ours = bb.pack(feats, torch.tensor([size]), [views])[0]
        if images[name] not in official.features:
            official.features[images[name]] = official.image_features(pixel_values, size)
        want = official.features[images[name]]
        assert ours.shape == want.shape
        torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-4)


def test_embeddings_equal_the_official_pipeline(emb, official, images):
    items, rows = _items(images)
    got = emb.encode(items, batch_size=3)  # batched and padded: positions and pooling must still match
    for vector, (row, path) in zip(got, rows):
        cosine = float(vector @ official.embed(row, path))
        assert cosine >= 0.99999, f"{path or 'text'}: cosine {cosine}"


def test_num_crops_is_read_and_overridable(model_dir, images):
    assert json.loads((Path(model_dir) / "preprocessor_config.json").read_text())["num_crops"] == 4
    emb = Embedder(phi3_v.Phi3V.load(model_dir, num_crops=16, tiling="transformers"))
    item = Item(text=ROWS["image"], image=images["big.jpg"])
    _, image = emb.prepare(item)
    assert image.pixel_values.shape[0] == 17 and image.meta == (1344, 1344)  # 4x4 crops + the global view
    official = Official(model_dir, num_crops=16)
    assert float(emb.encode([item])[0] @ official.embed(ROWS["image"], images["big.jpg"])) >= 0.99999


def test_grouped_query_attention_and_tied_embeddings(tmp_path, images):
    from vlm2vec_rt.models.backbones import load_backbone

    path = make_tiny_model(tmp_path / "m", "phi3_v", num_key_value_heads=2, tie_word_embeddings=True)
    config = json.loads((path / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    official = Official(str(path))
    rows = [(ROWS["text"], None), (ROWS["image+text"], images["tiny.png"])]
    got = Embedder.from_pretrained(path).encode([Item(text=row, image=image) for row, image in rows])
    for vector, (row, image) in zip(got, rows):
        assert float(vector @ official.embed(row, image)) >= 0.99999
    model = load_backbone(path, keep_lm_head=True).model
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---- the directory ---------------------------------------------------------------------------------------
def test_the_directory_is_in_the_official_layout(model_dir):
    d = Path(model_dir)
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and "auto_map" in config
    assert "clip_vision_config" in config["img_processor"]
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    for name in (
        "model.vision_embed_tokens.img_processor.vision_model.embeddings.patch_embedding.weight",
        "model.vision_embed_tokens.glb_GN",
        "model.vision_embed_tokens.sub_GN",
        "model.vision_embed_tokens.img_projection.0.weight",
        "model.vision_embed_tokens.img_projection.2.weight",
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.layers.1.mlp.gate_up_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert name in names
    for code in phi3_v.VENDORED_FILES:
        assert (d / code).is_file()


def test_no_code_from_the_directory_is_ever_imported(model_dir, images):
    d = Path(model_dir).resolve()
    for code in phi3_v.VENDORED_FILES:  # the vendored files refuse to be imported ...
        with pytest.raises(ImportError, match="never import"):
            exec(compile((d / code).read_text(), str(d / code), "exec"), {})
    # ... and loading, embedding and the engine's preprocessor load all work with them present
    Embedder.from_pretrained(model_dir).encode([Item(text=ROWS["image"], image=images["tiny.png"]), "a cat"])
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        assert not (file and Path(file).resolve().is_relative_to(d)), module


def test_unsupported_configurations_are_clear_errors(model_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["embd_layer"]["hd_transform_order"] = "glb_sub"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="hd_transform_order"):
        Embedder.from_pretrained(bad)
    with pytest.raises(InputError, match="exactly one"):
        Embedder.from_pretrained(model_dir).prepare(
            Item(text="<|image_1|> <|image_2|>", image=np.zeros((9, 9, 3), np.uint8))
        )
    with pytest.raises(InputError, match="image_size must be 336"):
        make_tiny_model(tmp_path / "m", "phi3_v", image_size=224)


# ---- engine side and training parts ------------------------------------------------------------------
def test_host_pack_equals_eager(emb, images, tmp_path):
    from vlm2vec_rt.engine.host import write_host_assets

    bb = emb.backbone
    write_host_assets(bb, tmp_path)
    host = phi3_v.Phi3VHost(emb.pre, tmp_path)
    items, _ = _items(images)
    batch = emb.pre.collate([emb.prepare(it) for it in items])
    tb = bb.to_device(batch)
    with torch.no_grad():
        views = bb.encode_views(tb.pixel_values, tb.image_meta)
        want = bb.pack(views, tb.image_meta, tb.views_per_image)
        embeds = bb.inputs_embeds(tb)
    got = host.pack([views[:2].numpy(), views[2:].numpy()], batch)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-6)
    np.testing.assert_allclose(host.inputs_embeds(batch.input_ids, got), embeds.numpy(), atol=1e-6)
    np.testing.assert_array_equal(host.position_ids(batch), bb.position_ids(tb).numpy())


def test_fp32_engine_passes_its_parity_gate(model_dir, emb, images, tmp_path):
    out = build_engine(model_dir, tmp_path / "engine", precision="fp32", backend="onnxruntime", device="cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backbone"] == "phi3_v" and manifest["parity"]["min_cosine"] >= 0.9999
    engine = Engine.load(out)
    items = _items(images)[0][:3]  # text, image, image+text
    assert float((engine.encode(items) * emb.encode(items)).sum(1).min()) >= 0.9999


def test_lora_targets(emb):
    from vlm2vec_rt.training.lora import target_modules

    bb = emb.backbone
    assert bb.vision_prefixes == ("model.vision_embed_tokens.",)
    language = target_modules(bb)
    both = target_modules(bb, train_vision=True)
    assert language and all(n.startswith("model.layers.") for n in language)
    assert {n.split(".")[-1] for n in language} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    vision = sorted(set(both) - set(language))
    assert any(n.startswith("model.vision_embed_tokens.img_processor.vision_model.") for n in vision)
    assert {n for n in vision if "img_projection" in n} == {
        "model.vision_embed_tokens.img_projection.0",
        "model.vision_embed_tokens.img_projection.2",
    }
