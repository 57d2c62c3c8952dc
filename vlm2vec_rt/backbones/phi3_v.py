"""Phi-3.5-V (VLM2Vec's paper backbone): CLIP ViT-L/14-336 over HD crops, Phi-3 decoder with long-context RoPE.

    image --HD transform (resize to whole 336-crops across the long side, white padding, global 336 view;
          C++ tiling)--> CLIP (second-to-last layer, CLS dropped) per view, 24x24 patches merged 2x2 into
          12x12 tokens of 4 x 1024 channels, projected (Linear, GELU, Linear)
          --pack, "sub_glb": the crops' token grid with a separator after each of its rows, the global
          separator, then the global view's grid with a separator after each row-->
    one image slot per token; the Phi-3 decoder reads them at 1-D positions like text tokens.

The checkpoint layout is the official one (microsoft/Phi-3.5-vision-instruct, TIGER-Lab/VLM2Vec-Full):
`model.vision_embed_tokens.img_processor.vision_model.*`, `glb_GN`, `sub_GN`, `img_projection.*`,
`model.embed_tokens`, `model.layers.*`, `model.norm`, `lm_head`. Those directories ship their own modelling
code (`auto_map`, *.py); it is never imported: config.json and preprocessor_config.json are read as JSON,
the weights with safetensors, and the model is transformers' CLIPVisionModel + Phi3Model under the
official parameter names, so peft adapters and saved weights keep the official names too.

Text follows the official processor: the text is split at `<|image_N|>`, each chunk tokenised with its own
`<s>`, the image's tokens between. The official code marks image slots with negative ids; here an image
slot is `image_token_id`, a row of the embedding table the tokenizer never produces (the first one past the
tokenizer's vocabulary: the released checkpoints have 32064 rows for a vocabulary of about 32011), so the
ids stay valid for an embedding lookup. Its embedding is replaced by the image features, as the official
code replaces its slots.

Every profile feeds Phi-3.5-V alike (the official V1 code's inputs); only the V2 text style differs.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..devices import check_device
from ..errors import InputError
from ..models.backbones import Backbone, Batch, torch_dtype
from ..models.preprocessors import ImageInputs, NumpyBatch, Preprocessor, quiet_transformers
from ..models.tiny import decoder_sizes, vision_intermediate_size
from ..preprocess import text as text_ops
from ..preprocess.items import MMEB_IMAGE_PLACEHOLDER
from .base import EMBED_TOKENS, MAX_VIEWS_PER_CALL, Entry, Host, TinySpec, load_npy, sequential_position_ids

CROP = 336  # the HD transform's crop and global view side (the official processor's constant)
IMAGE_TAG = re.compile(r"<\|image_\d+\|>")  # the official processor's split pattern
SUB_NEWLINE = "phi3v_sub_newline.npy"  # img_projection(sub_GN): ends every row of a token grid
GLB_SEPARATOR = "phi3v_glb_separator.npy"  # img_projection(glb_GN): between the crops and the global view
PROCESSOR_CONFIG = "preprocessor_config.json"

# The official code's tower when config.json names no CLIP config (`CLIP_VIT_LARGE_PATCH14_336_CONFIG`).
CLIP_VIT_L_336 = dict(
    attention_dropout=0.0,
    dropout=0.0,
    hidden_act="quick_gelu",
    hidden_size=1024,
    image_size=336,
    initializer_factor=1.0,
    initializer_range=0.02,
    intermediate_size=4096,
    layer_norm_eps=1e-05,
    num_attention_heads=16,
    num_channels=3,
    num_hidden_layers=24,
    patch_size=14,
    projection_dim=768,
)
# Defaults of the official configuration class, for keys a config.json leaves out.
PHI3V_DEFAULTS = dict(
    vocab_size=32064,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=None,
    hidden_act="silu",
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    rms_norm_eps=1e-05,
    rope_theta=10000.0,
    rope_scaling=None,
    bos_token_id=1,
    eos_token_id=32000,
    pad_token_id=32000,
    sliding_window=None,
    tie_word_embeddings=False,
    initializer_range=0.02,
    embd_pdrop=0.0,
    resid_pdrop=0.0,
    attention_dropout=0.0,
)


# ---- configuration -----------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read {os.fspath(path)!r}: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{os.fspath(path)}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{os.fspath(path)}: expected a JSON object")
    return data


def rope_parameters(c: dict) -> dict:
    """transformers' `rope_parameters` for the official config's RoPE, with the official scaling maths.

    "su" / "longrope": per-frequency short factors, long ones once a batch's positions pass
    original_max_position_embeddings, cos/sin scaled by sqrt(1 + ln(s) / ln(original)); "yarn": the same
    factors, scaled by 0.1 ln(s) + 1 (s = max_position_embeddings / original_max_position_embeddings).
    """
    theta = float(c["rope_theta"])
    scaling = c.get("rope_scaling")
    if not scaling:
        return {"rope_type": "default", "rope_theta": theta}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind not in ("su", "longrope", "yarn"):
        raise InputError(
            f"config.json: rope_scaling type {kind!r} is not one Phi-3.5-V uses (su, longrope, yarn)"
        )
    original = int(c["original_max_position_embeddings"])
    scale = int(c["max_position_embeddings"]) / original
    if scale <= 1.0:
        attention = 1.0
    elif kind == "yarn":
        attention = 0.1 * math.log(scale) + 1.0
    else:
        attention = math.sqrt(1 + math.log(scale) / math.log(original))
    return {
        "rope_type": "longrope",
        "rope_theta": theta,
        "short_factor": [float(x) for x in scaling["short_factor"]],
        "long_factor": [float(x) for x in scaling["long_factor"]],
        "original_max_position_embeddings": original,
        "factor": max(scale, 1.0),
        "attention_factor": attention,
    }


class Phi3VConfig:
    """A Phi-3.5-V config.json read as data (its configuration class is never imported).

    text_config: transformers' Phi3Config of the decoder; vision_config: the CLIP tower's CLIPVisionConfig
    (`img_processor.clip_vision_config` when config.json holds one, else CLIP ViT-L/14-336);
    image_token_id: the embedding row marking image slots; layer_idx: the CLIP hidden state read.

    It has no `model_type` attribute on purpose: peft treats a model whose config has one as a transformers
    model and applies transformers' checkpoint renamings to it (CLIP's drop `vision_model.`, which the
    official names keep).
    """

    def __init__(self, raw: dict, image_token_id: int):
        from transformers import CLIPVisionConfig, Phi3Config

        self.raw = raw
        c = {**PHI3V_DEFAULTS, **{k: v for k, v in raw.items() if k in PHI3V_DEFAULTS}}
        window = c["sliding_window"]
        if window is not None and window >= c["max_position_embeddings"]:
            window = None  # no sequence reaches it: plain causal attention, the same maths
        pad = c["pad_token_id"]
        if pad is not None and not 0 <= pad < c["vocab_size"]:
            pad = None
        with quiet_transformers():
            self.text_config = Phi3Config(
                vocab_size=c["vocab_size"],
                hidden_size=c["hidden_size"],
                intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_hidden_layers"],
                num_attention_heads=c["num_attention_heads"],
                num_key_value_heads=c["num_key_value_heads"],
                hidden_act=c["hidden_act"],
                max_position_embeddings=c["max_position_embeddings"],
                original_max_position_embeddings=c["original_max_position_embeddings"],
                rms_norm_eps=c["rms_norm_eps"],
                rope_parameters=rope_parameters(c),
                bos_token_id=c["bos_token_id"],
                eos_token_id=c["eos_token_id"] if _in_vocab(c["eos_token_id"], c["vocab_size"]) else None,
                pad_token_id=pad,
                sliding_window=window,
                tie_word_embeddings=bool(c["tie_word_embeddings"]),
                initializer_range=c["initializer_range"],
                embd_pdrop=c["embd_pdrop"],
                resid_pdrop=c["resid_pdrop"],
                attention_dropout=c["attention_dropout"],
            )
        img = raw.get("img_processor") or {}
        if not isinstance(img, dict):
            raise InputError(f"config.json: img_processor must be an object, got {img!r}")
        self.vision_config = CLIPVisionConfig(**(img.get("clip_vision_config") or CLIP_VIT_L_336))
        self.layer_idx = int(img.get("layer_idx", -2))
        embd = raw.get("embd_layer") or {}
        self.hd_transform_order = embd.get("hd_transform_order", "glb_sub")
        self._check(img, embd)
        self.image_token_id = int(image_token_id)
        self.tie_word_embeddings = self.text_config.tie_word_embeddings

    def _check(self, img: dict, embd: dict) -> None:
        v = self.vision_config
        layers = v.num_hidden_layers
        if img.get("type_feature", "patch") != "patch":
            raise InputError(
                f"config.json: img_processor type_feature {img['type_feature']!r} is not 'patch'"
            )
        if not -(layers + 1) <= self.layer_idx <= layers:
            raise InputError(f"config.json: layer_idx {self.layer_idx} outside the tower's {layers} layers")
        if not (embd.get("use_hd_transform") and embd.get("with_learnable_separator")):
            raise InputError("config.json: Phi-3.5-V's HD transform with learnable separators is required")
        if embd.get("projection_cls", "linear") != "mlp":
            raise InputError(f"config.json: projection_cls {embd.get('projection_cls')!r} is not 'mlp'")
        if self.hd_transform_order != "sub_glb":  # the official code implements only this order
            raise InputError(f"config.json: hd_transform_order {self.hd_transform_order!r} is not 'sub_glb'")
        if v.image_size != CROP or v.image_size // v.patch_size != 24:
            raise InputError(
                f"config.json: the CLIP tower must take {CROP}-pixel views in 24x24 patches (the HD transform's "
                f"token count), got image_size {v.image_size}, patch_size {v.patch_size}"
            )
        dim = img.get("image_dim_out", v.hidden_size)
        if dim != v.hidden_size:
            raise InputError(
                f"config.json: image_dim_out {dim} differs from the CLIP hidden size {v.hidden_size}"
            )

    @property
    def side(self) -> int:
        """The CLIP patch grid of one view (24): 2x2-merged to side/2 x side/2 tokens."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def tower_layers(self) -> int:
        """How many CLIP encoder layers run: hidden_states[layer_idx] is the output of that many."""
        n = self.vision_config.num_hidden_layers
        return self.layer_idx if self.layer_idx >= 0 else n + 1 + self.layer_idx

    def to_dict(self) -> dict:
        """config.json's content (peft and the trainer read a model's config as a dict)."""
        return dict(self.raw)

    def get(self, key: str, default: Any = None) -> Any:
        """A config.json key's value (dict-style access, as peft reads configs)."""
        return self.raw.get(key, default)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json as it was read (auto_map and all), the weights' dtype updated by the model's save."""
        from .. import atomic

        atomic.write_json(Path(path) / "config.json", self.raw)


def _in_vocab(token_id: Any, vocab_size: int) -> bool:
    return isinstance(token_id, int) and 0 <= token_id < vocab_size


def image_slot_id(tokenizer: Any, vocab_size: int) -> int:
    """The id marking image slots: the first embedding row past every id of the tokenizer, which no text
    produces; without a spare row, `<unk>`'s (the row the official code's clamped negative ids look up)."""
    n = max(tokenizer.get_vocab().values(), default=-1) + 1
    if n < vocab_size:
        return n
    if tokenizer.unk_token_id is None:
        raise InputError(f"the embedding table ({vocab_size} rows) has no row to spare for image slots")
    return int(tokenizer.unk_token_id)


# ---- input side --------------------------------------------------------------------------------------
class Phi3VImageSettings:
    """preprocessor_config.json of a Phi-3.5-V directory, read as data: num_crops, mean, std."""

    def __init__(self, raw: dict, num_crops: int | None = None):
        from ..preprocess.tiling import CLIP_MEAN, CLIP_STD

        self.raw = dict(raw)
        crops = raw.get("num_crops", 1) if num_crops is None else num_crops  # 1: the official class default
        if isinstance(crops, bool) or not isinstance(crops, int) or crops < 1:
            raise InputError(f"num_crops must be a positive integer, got {crops!r}")
        self.num_crops = crops
        self.raw["num_crops"] = crops
        self.image_mean = tuple(float(x) for x in raw.get("image_mean", CLIP_MEAN))
        self.image_std = tuple(float(x) for x in raw.get("image_std", CLIP_STD))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write preprocessor_config.json with the num_crops in use."""
        from .. import atomic

        atomic.write_json(Path(path) / PROCESSOR_CONFIG, self.raw)


class _PrecomputedIds:
    """A tokenizer stand-in returning ids already built, so text_ops.tokenize's truncation (text tokens
    dropped from the end, never image slots) applies to Phi's chunk-by-chunk ids."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.ids}

    def convert_ids_to_tokens(self, token_id: int) -> None:
        return None


class Phi3VPreprocessor(Preprocessor):
    """Phi-3.5-V: `<|image_1|>` split as the official processor splits it; HD crops + global view."""

    name = "phi3_v"

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, num_crops: int | None = None, **kwargs: Any
    ) -> Phi3VPreprocessor:
        """Read config.json, the tokenizer and preprocessor_config.json (as JSON: the directory's code is
        never run). num_crops overrides the processor configuration's (VLM2Vec evaluated with 4)."""
        import transformers
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        path = Path(path)
        raw = _read_json(path / "config.json")
        settings = Phi3VImageSettings(_read_json(path / PROCESSOR_CONFIG), num_crops)
        # the tokenizer class its tokenizer_config.json names (LlamaTokenizer in the released checkpoints):
        # AutoTokenizer would read config.json, whose model_type transformers does not know
        class_name = _read_json(path / "tokenizer_config.json").get("tokenizer_class") or ""
        tokenizer_class = getattr(transformers, class_name, None)
        if not (isinstance(tokenizer_class, type) and issubclass(tokenizer_class, PreTrainedTokenizerBase)):
            tokenizer_class = transformers.PreTrainedTokenizerFast
        try:
            with quiet_transformers():
                tokenizer = tokenizer_class.from_pretrained(path)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise InputError(f"cannot load the phi3_v tokenizer from {os.fspath(path)!r}: {e}") from None
        vocab = int(raw.get("vocab_size", PHI3V_DEFAULTS["vocab_size"]))
        config = Phi3VConfig(raw, image_slot_id(tokenizer, vocab))
        return cls(config, tokenizer, settings, **kwargs)

    @property
    def num_crops(self) -> int:
        """The HD transform's crop budget in use (preprocessor_config.json's, or the override)."""
        return self.image_processor.num_crops

    def cpp_options(self) -> dict[str, Any]:
        from ..preprocess.tiling import MAX_PHI3V_CROPS

        if self.num_crops > MAX_PHI3V_CROPS:
            raise InputError(f"num_crops {self.num_crops} is over the C++ tiling's {MAX_PHI3V_CROPS}")
        p = self.image_processor
        return dict(num_crops=p.num_crops, mean=p.image_mean, std=p.image_std)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens Phi-3.5-V spends on an image of this size (the official processor's count)."""
        from ..preprocess.phi3v import phi3v_num_tokens

        return phi3v_num_tokens(height, width, self.num_crops)

    def _inputs(self, pixel_values: np.ndarray, size: Sequence[int], tokens: int) -> ImageInputs:
        # The processor pads every image to num_crops + 1 views with zeros; the model reads only the global
        # view and the image's own crops (each view goes through CLIP alone), so the padding is left out.
        h, w = (int(v) for v in size)
        views = 1 + (h // CROP) * (w // CROP)
        return ImageInputs(pixel_values[:views], (h, w), int(tokens))

    def preprocess_with_transformers(self, image: np.ndarray) -> ImageInputs:
        """The reference path: the plain-Python twin of the official Phi3VImageProcessor."""
        from ..preprocess.phi3v import phi3v_reference

        p = self.image_processor
        return self._inputs(
            *phi3v_reference(image, num_crops=p.num_crops, mean=p.image_mean, std=p.image_std)
        )

    def preprocess_with_cpp(self, image: np.ndarray) -> ImageInputs:
        from ..preprocess import tiling

        return self._inputs(
            *tiling.phi3v(image, max_image_pixels=self.max_image_pixels, **self.tiling_options)
        )

    def preprocess_batch_with_cpp(self, images: Sequence[np.ndarray]) -> list[ImageInputs]:
        from ..preprocess import tiling

        out = tiling.phi3v_batch(images, max_image_pixels=self.max_image_pixels, **self.tiling_options)
        return [self._inputs(*one) for one in out]

    def tokenize(self, text: str, image: ImageInputs | None, what: str = "item") -> list[int]:
        """Token ids as the official processor makes them: with an image, the text split at `<|image_N|>`,
        each chunk tokenised with its own `<s>`, the image's slots between; without, one tokenisation."""
        tags = IMAGE_TAG.findall(text)
        if image is None:
            if tags:
                raise InputError(f"text contains {tags[0]} but the item has no image")
            chunks_ids = [self._chunk(text, what)]
        else:
            if tags != [MMEB_IMAGE_PLACEHOLDER]:
                raise InputError(
                    f"an item with one image needs exactly one {MMEB_IMAGE_PLACEHOLDER} in its text, found {tags}"
                )
            before, after = IMAGE_TAG.split(text)
            chunks_ids = [
                self._chunk(before, what),
                [self.image_token_id] * image.num_tokens,
                self._chunk(after, what),
            ]
        ids = [t for chunk in chunks_ids for t in chunk]
        return text_ops.tokenize(
            _PrecomputedIds(ids),
            "",
            image_token_id=self.image_token_id,
            num_image_tokens=0 if image is None else image.num_tokens,
            max_length=self.max_length,
            what=what,
        )

    def _chunk(self, text: str, what: str) -> list[int]:
        # the tokenizer's own ids (`<s>` first); an over-long chunk is cut to max_length already here
        return text_ops.tokenize(
            self.tokenizer,
            text,
            image_token_id=self.image_token_id,
            num_image_tokens=0,
            max_length=self.max_length,
            what=what,
        )


# ---- the model -------------------------------------------------------------------------------------------
def hd_token_layout(rows: int, cols: int, side: int) -> np.ndarray:
    """Where each of an image's tokens comes from, in the official "sub_glb" order: int64 [num_tokens].

    Indices into a table of the image's view tokens ([1 + rows*cols views] x side*side, view 0 the global
    one, then the crops row-major) followed by two rows: the row separator (`sub_GN`) and the global
    separator (`glb_GN`). The crops' tokens form one (rows*side) x (cols*side) grid with a separator after
    each of its rows; then the global separator; then the global view's side x side grid, likewise.
    """
    per_view = side * side
    newline = (1 + rows * cols) * per_view
    # crops: grid row r, column c -> crop (r // side, c // side), token (r % side, c % side)
    r = np.arange(rows * side)[:, None]
    c = np.arange(cols * side)[None, :]
    crop = (r // side) * cols + c // side
    sub = (1 + crop) * per_view + (r % side) * side + c % side
    sub = np.concatenate([sub, np.full((rows * side, 1), newline)], axis=1)
    glb = np.arange(per_view).reshape(side, side)
    glb = np.concatenate([glb, np.full((side, 1), newline)], axis=1)
    return np.concatenate([sub.reshape(-1), [newline + 1], glb.reshape(-1)]).astype(np.int64)


def image_grids(image_meta: Any) -> list[tuple[int, int]]:
    """(rows, cols) of 336-crops of each image, from its HD size (h, w) (numpy, torch on any device, lists)."""
    sizes = image_meta.tolist() if hasattr(image_meta, "tolist") else image_meta
    return [(int(h) // CROP, int(w) // CROP) for h, w in sizes]


class CLIPTower(nn.Module):
    """The official `img_processor`: transformers' CLIPVisionModel under the name `vision_model`."""

    def __init__(self, vision_config: Any):
        super().__init__()
        from transformers import CLIPVisionModel

        self.vision_model = CLIPVisionModel(vision_config)


class Phi3VImageEmbedding(nn.Module):
    """The official `vision_embed_tokens`: CLIP tower, separators and projection (official parameter names)."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        channels = 4 * config.vision_config.hidden_size  # 2x2 patches merged into the channels
        hidden = config.text_config.hidden_size
        self.img_processor = CLIPTower(config.vision_config)
        self.register_parameter("glb_GN", nn.Parameter(torch.zeros(1, 1, channels)))
        self.register_parameter("sub_GN", nn.Parameter(torch.zeros(1, 1, 1, channels)))
        self.img_projection = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.tower_layers = config.tower_layers
        self.side = config.side

    def view_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected 2x2-merged tokens of each view: pixel_values [V, 3, 336, 336] -> [V, (side/2)^2, hidden].

        CLIP's hidden state `layer_idx` (only the layers it needs run), CLS dropped; patch (2i+a, 2j+b) goes
        to token (i, j), channels ordered (a, b, c), as the official reshape_hd_patches_2x2merge. The
        projection acts on each token alone, so projecting before the packing equals the official projection
        of the packed sequence.
        """
        tower = self.img_processor.vision_model
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
        for layer in tower.encoder.layers[: self.tower_layers]:
            hidden = layer(hidden, None)
        views, _, channels = hidden.shape
        half = self.side // 2
        merged = (
            hidden[:, 1:]
            .reshape(views, half, 2, half, 2, channels)
            .permute(0, 1, 3, 2, 4, 5)
            .reshape(views, half * half, 4 * channels)
        )
        return self.img_projection(merged)

    def separators(self) -> torch.Tensor:
        """The projected row separator and global separator: [2, hidden] (rows of the pack's table)."""
        return self.img_projection(torch.cat([self.sub_GN.reshape(1, -1), self.glb_GN.reshape(1, -1)]))

    def pack(
        self, view_features: torch.Tensor, image_sizes: Any, views_per_image: Sequence[int]
    ) -> list[torch.Tensor]:
        """Per-image token features in the official "sub_glb" order (hd_token_layout)."""
        separators = self.separators().to(view_features.dtype)
        out = []
        for feats, (rows, cols) in zip(
            torch.split(view_features, list(views_per_image)), image_grids(image_sizes)
        ):
            table = torch.cat([feats.reshape(-1, feats.shape[-1]), separators])
            layout = torch.from_numpy(hd_token_layout(rows, cols, self.side // 2)).to(table.device)
            out.append(table[layout])
        return out


class Phi3VModel(nn.Module):
    """The official `model`: embed_tokens, layers, norm (transformers' Phi3Model, `language_model`, shares
    them) and vision_embed_tokens. `language_model` is kept out of the module tree so that parameter names
    stay the official ones."""

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        from transformers import Phi3Model

        decoder = Phi3Model(config.text_config)
        self.embed_tokens = decoder.embed_tokens
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.layers = decoder.layers
        self.norm = decoder.norm
        self.rotary_emb = decoder.rotary_emb  # buffers only (follows .to())
        self.image_token_id = config.image_token_id
        self.__dict__["language_model"] = decoder  # not registered: its parts are, under their official names

    def train(self, mode: bool = True) -> Phi3VModel:
        """Train/eval mode for every part, `language_model` included (it is outside the module tree)."""
        super().train(mode)
        self.language_model.training = mode
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table (`embed_tokens`)."""
        return self.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> Any:
        """The whole model on ids (image slots = config.image_token_id) and the images' views [V, 3, 336, 336]
        with their HD sizes [N, 2], as the official Phi3VModel.forward: the decoder's output
        (last_hidden_state)."""
        embeds = self.embed_tokens(input_ids)
        if pixel_values is not None:
            grids = image_grids(image_sizes)
            views = self.vision_embed_tokens.view_features(pixel_values)
            feats = self.vision_embed_tokens.pack(views, image_sizes, [1 + r * c for r, c in grids])
            slots = (input_ids == self.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(slots, torch.cat(feats).to(embeds.dtype))
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )


class Phi3VForCausalLM(nn.Module):
    """The official top level: `model` and `lm_head`, built natively from a Phi3VConfig."""

    def __init__(self, config: Phi3VConfig, *, lm_head: bool = True):
        super().__init__()
        self.config = config
        self.model = Phi3VModel(config)
        self.lm_head = None
        if lm_head:
            tc = config.text_config
            self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
            if config.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight

    def load_weights(self, path: str | os.PathLike) -> None:
        """Copy the checkpoint's tensors (official names; one file or shards with an index) into the model."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded = set()
        for name, tensor in _read_weights(Path(path)):
            if name in params:
                if params[name].shape != tensor.shape:
                    raise InputError(
                        f"{os.fspath(path)}: {name} has shape {tuple(tensor.shape)}, the config says "
                        f"{tuple(params[name].shape)}"
                    )
                with torch.no_grad():
                    params[name].copy_(tensor)
                loaded.add(name)
            elif name == "lm_head.weight" or name.endswith(".position_ids"):
                continue  # the head when not kept; a buffer older transformers saved
            else:
                raise InputError(f"{os.fspath(path)}: unexpected weight {name!r} for a phi3_v model")
        if self.lm_head is not None and self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if missing:
            raise InputError(f"{os.fspath(path)}: weights missing for a phi3_v model: {missing[:5]}")

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write model.safetensors (official names, the model's dtype) and config.json."""
        from safetensors.torch import save_file

        path = Path(path)
        state = {}
        for name, param in self.named_parameters():  # each tied tensor once, under its first name
            state[name] = param.detach().to("cpu").contiguous()
        dtype = next(iter(state.values())).dtype
        save_file(state, os.fspath(path / "model.safetensors"), metadata={"format": "pt"})
        self.config.raw["torch_dtype"] = str(dtype).removeprefix("torch.")
        self.config.save_pretrained(path)


def _read_weights(path: Path):
    """(name, tensor) of every tensor of a model directory: model.safetensors, or the shards its index lists."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise InputError(f"{os.fspath(path)!r} holds no model.safetensors (nor an index of shards)")
    for file in files:
        try:
            with safe_open(os.fspath(path / file), "pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        except (OSError, RuntimeError) as e:
            raise InputError(f"cannot read {os.fspath(path / file)!r}: {e}") from None


class _DefaultDtype:
    """Parameters created in `dtype` (as transformers' from_pretrained does); float32 buffers stay float32."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self) -> None:
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: Any) -> None:
        torch.set_default_dtype(self.previous)


class Phi3V(Backbone):
    """Phi-3.5-V: CLIP over HD crops + global view, separators, projection, Phi-3 decoder."""

    name = "phi3_v"
    preprocessor_class = Phi3VPreprocessor
    language_prefix = "model.layers."
    vision_prefixes = ("model.vision_embed_tokens.",)  # CLIP tower, separators and projection

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        keep_lm_head: bool = False,
        **preprocessor_kwargs: Any,
    ) -> Phi3V:
        """Build the model natively and load the official checkpoint's weights (no code from the directory)."""
        from transformers.initialization import no_init_weights

        path = Path(path)
        dtype = torch_dtype(dtype)
        check_device(device)
        pre = cls.preprocessor_class.load(path, **preprocessor_kwargs)
        with quiet_transformers(), no_init_weights(), _DefaultDtype(dtype):
            model = Phi3VForCausalLM(pre.config, lm_head=keep_lm_head)
        model.load_weights(path)
        model.to(device).eval()
        return cls(model, pre, path)

    def encode_views(self, pixel_values: torch.Tensor, image_meta: torch.Tensor) -> torch.Tensor:
        # pixel_values [V, 3, 336, 336] -> projected tokens [V, 144, H]
        return self.inner.vision_embed_tokens.view_features(pixel_values)

    def pack(
        self, view_features: torch.Tensor, image_meta: torch.Tensor, views_per_image: list[int]
    ) -> list[torch.Tensor]:
        return self.inner.vision_embed_tokens.pack(view_features, image_meta, views_per_image)

    def position_ids(self, batch: Batch) -> torch.Tensor:
        return sequential_position_ids(batch.attention_mask)

    def vision_graph(self) -> Any:
        from ..engine.export import GraphSpec

        return GraphSpec(
            "vision",
            Phi3VVisionGraph(self).eval(),
            (torch.randn(3, 3, CROP, CROP),),
            ["pixel_values"],
            "view_features",
            {"pixel_values": {0: "views"}},
        )

    def host_assets(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            newline, separator = self.inner.vision_embed_tokens.separators()
        return {SUB_NEWLINE: newline, GLB_SEPARATOR: separator}


class Phi3VVisionGraph(nn.Module):
    """CLIP tower + 2x2 merge + projection over a stack of views (shape-static; the packing is the host's)."""

    def __init__(self, backbone: Phi3V):
        super().__init__()
        self.vision_embed_tokens = backbone.inner.vision_embed_tokens
        self.dtype = backbone.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_embed_tokens.view_features(pixel_values.to(self.dtype)).float()


class Phi3VHost(Host):
    """Phi-3.5-V's engine side: views in chunks, the HD packing with the projected separators."""

    ASSETS = (EMBED_TOKENS, SUB_NEWLINE, GLB_SEPARATOR)

    def __init__(self, pre: Preprocessor, engine_dir: str | os.PathLike):
        super().__init__(pre, engine_dir)
        rows = [load_npy(Path(engine_dir) / name) for name in (SUB_NEWLINE, GLB_SEPARATOR)]
        self.separators = np.stack(rows).astype(np.float32)  # [2, H]
        self.side = pre.config.side // 2

    def vision_feeds(self, batch: NumpyBatch) -> list[dict[str, np.ndarray]]:
        pv = batch.pixel_values
        return [
            {"pixel_values": pv[i : i + MAX_VIEWS_PER_CALL]} for i in range(0, len(pv), MAX_VIEWS_PER_CALL)
        ]

    def pack(self, outputs: list[np.ndarray], batch: NumpyBatch) -> list[np.ndarray]:
        views = np.concatenate(outputs)  # [V, 144, H]
        packed, start = [], 0
        for (rows, cols), count in zip(image_grids(batch.image_meta), batch.views_per_image):
            feats = views[start : start + count]
            start += count
            table = np.concatenate([feats.reshape(-1, feats.shape[-1]), self.separators])
            packed.append(table[hd_token_layout(rows, cols, self.side)])
        return packed

    def position_ids(self, batch: NumpyBatch) -> np.ndarray:
        return sequential_position_ids(batch.attention_mask)


# ---- tiny model ------------------------------------------------------------------------------------------
# The vendored code of a tiny directory: present as in the official layout, failing loudly if anything
# ever imports it.
VENDORED_FILES = (
    "configuration_phi3_v.py",
    "modeling_phi3_v.py",
    "processing_phi3_v.py",
    "image_processing_phi3_v.py",
)
VENDORED_SOURCE = (
    '"""Stands in for the official Phi-3.5-V code shipped with the checkpoint: vlm2vec-rt never imports it."""\n\n'
    'raise ImportError("vlm2vec-rt must never import code from a model directory ({})")\n'
)


class TinyPhi3V(Phi3VForCausalLM):
    """A tiny Phi-3.5-V as make_tiny_model saves it: weights in bf16, config.json, the vendored files."""

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the model in bf16 (as the released checkpoints are) and the vendored files beside it."""
        self.to(torch.bfloat16)
        super().save_pretrained(path)
        for name in VENDORED_FILES:
            (Path(path) / name).write_text(VENDORED_SOURCE.format(name))


def build_tiny(tokenizer, o: dict):
    """A small Phi-3.5-V in the official layout (config with auto_map, official names, bf16 weights)."""
    sizes = decoder_sizes(o)
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    # RoPE factors of the real shape (one per frequency; make_tiny_model has seeded torch; on the CPU even
    # when the model is built on the meta device)
    short = torch.sort(1.0 + 2.0 * torch.rand(head_dim // 2, device="cpu")).values
    short, long = [round(float(x), 4) for x in short], [round(float(x) * 4, 4) for x in short]
    # embedding rows past the tokenizer's vocabulary, as the released checkpoints have (32064 for ~32011)
    vocab = max(sizes["vocab_size"], (len(tokenizer) // 64 + 1) * 64)
    ids = tokenizer.convert_tokens_to_ids
    vision = o["vision_hidden_size"]
    raw = {
        "_name_or_path": "Phi-3.5-vision-instruct",
        "architectures": ["Phi3VForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_phi3_v.Phi3VConfig",
            "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM",
        },
        "model_type": "phi3_v",
        "attention_dropout": 0.0,
        "bos_token_id": ids("<s>"),
        "eos_token_id": ids("<|endoftext|>"),
        "pad_token_id": ids("<|endoftext|>"),
        "embd_layer": {
            "embedding_cls": "image",
            "hd_transform_order": "sub_glb",
            "projection_cls": "mlp",
            "use_hd_transform": True,
            "with_learnable_separator": True,
        },
        "embd_pdrop": 0.0,
        "hidden_act": "silu",
        "hidden_size": sizes["hidden_size"],
        "img_processor": {
            "image_dim_out": vision,
            "model_name": "openai/clip-vit-large-patch14-336",
            "name": "clip_vision_model",
            "num_img_tokens": 144,
            "clip_vision_config": {
                **CLIP_VIT_L_336,
                "hidden_size": vision,
                "intermediate_size": vision_intermediate_size(o),
                "num_attention_heads": o["vision_heads"],
                "num_hidden_layers": o["vision_layers"],
                "projection_dim": vision,
                "initializer_range": o["initializer_range"],
            },
        },
        "initializer_range": o["initializer_range"],
        "intermediate_size": sizes["intermediate_size"],
        "max_position_embeddings": 131072,
        "num_attention_heads": sizes["num_attention_heads"],
        "num_hidden_layers": sizes["num_hidden_layers"],
        "num_key_value_heads": sizes["num_key_value_heads"],
        "original_max_position_embeddings": 4096,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": long, "short_factor": short, "type": "su"},
        "rope_theta": 10000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": o["tie_word_embeddings"],
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
    }
    config = Phi3VConfig(raw, image_slot_id(tokenizer, vocab))
    model = TinyPhi3V(config)
    with torch.no_grad():  # the official init is zeros: random here, so that the separators matter in tests
        for sep in (model.model.vision_embed_tokens.glb_GN, model.model.vision_embed_tokens.sub_GN):
            sep.normal_(std=o["initializer_range"] * 10)
    settings = Phi3VImageSettings(
        {
            "auto_map": {
                "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor",
                "AutoProcessor": "processing_phi3_v.Phi3VProcessor",
            },
            "do_convert_rgb": True,
            "image_processor_type": "Phi3VImageProcessor",
            "num_crops": o["num_crops"],
            "num_img_tokens": 144,
            "processor_class": "Phi3VProcessor",
        },
    )
    from ..preprocess.tiling import CLIP_MEAN, CLIP_STD

    settings.raw.update(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return model, settings


def check_tiny(o: dict) -> None:
    """InputError for tiny-model sizes Phi-3.5-V cannot take."""
    if o["image_size"] != CROP or o["patch_size"] != 14:
        raise InputError(
            "Phi-3.5-V's HD transform takes 336-pixel views in 24x24 patches: image_size must be 336, patch_size 14"
        )
    if o["vision_layers"] < 2:
        raise InputError("Phi-3.5-V reads the second-to-last vision layer: vision_layers must be >= 2")
    crops = o["num_crops"]
    if isinstance(crops, bool) or not isinstance(crops, int) or not 1 <= crops <= 64:
        raise InputError(f"num_crops must be an integer in [1, 64], got {crops!r}")


ENTRY = Entry(
    name="phi3_v",
    preprocessor=Phi3VPreprocessor,
    model=Phi3V,
    host=Phi3VHost,
    tiny=TinySpec(
        specials=(
            "<unk>",
            "<s>",
            "</s>",
            "<|endoftext|>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|end|>",
        ),
        tokens=dict(bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>"),
        # CLIP ViT views of 336 pixels in 14-pixel patches (the HD transform's fixed geometry); num_crops as
        # VLM2Vec evaluated
        image_defaults=dict(image_size=CROP, patch_size=14, num_crops=4),
        presets={
            # microsoft/Phi-3.5-vision-instruct (VLM2Vec-Full's backbone): CLIP ViT-L/14-336, Phi-3.5-mini
            # (full multi-head attention)
            "phi-3.5-v": dict(
                hidden_size=3072,
                num_layers=32,
                num_heads=32,
                num_key_value_heads=32,
                intermediate_size=8192,
                vocab_size=32064,
                vision_hidden_size=1024,
                vision_layers=24,
                vision_heads=16,
                vision_intermediate_size=4096,
                initializer_range=0.02,
            ),
        },
        check=check_tiny,
        build=build_tiny,
    ),
)
