"""`make_tiny_model`: small models of the real architectures, written as complete HF-format directories.

The same factory gives the ~0.5M-parameter test model (defaults) and larger benchmark models (keywords).
Everything that takes a model directory loads the result exactly like a real checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_dir
from ..errors import InputError
from .preprocessors import quiet_transformers

# Text the tiny tokenizer's BPE merges are learned from: MMEB's instructions and the words of its tasks,
# so typical inputs take few tokens. Anything else still encodes (byte-level fallback).
_CORPUS = """
Represent the given image for classification.
Identify the object shown in the image. Identify the scene shown in the image.
Represent the given news image with the following caption for domain classification:
Represent the given image with the following question:
Find me an everyday image that matches the given caption:
Find an image caption describing the given everyday image.
Given an image, find a similar everyday image with the described changes:
Find a day-to-day image that looks similar to the provided image.
Represent the given image. Represent the given cropped image of the object.
Select the portion of the image that isolates the object labeled as
Select the portion of the image that follows the language expressions:
A handwritten digit zero one two three four five six seven eight nine.
a photo of a dog, a cat, a bird, a car, a house, a tree, a flower, a person, a boat, a plane.
What is in the image? What color is the object? How many people are there? Where is this photo taken?
The man is holding a red umbrella while walking down the street in the rain.
A group of children playing football on a green field next to the river.
A building with a large clock tower in the center of the city at night.
coffee astronaut camera rocket coins chelsea cat horse moon text page brick grass gravel
"""

_DEFAULTS: dict = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_key_value_heads=None,  # num_heads: full multi-head attention
    vocab_size=1024,
    vision_hidden_size=32,
    vision_layers=2,
    vision_heads=2,
    intermediate_size=None,  # 4 x hidden_size
    vision_intermediate_size=None,  # 4 x vision_hidden_size
    tie_word_embeddings=False,
    initializer_range=0.1,
)
# The integer size keywords of make_tiny_model (the CLI's --hidden-size etc.).
SIZE_KEYWORDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_key_value_heads",
    "vocab_size",
    "vision_hidden_size",
    "vision_layers",
    "vision_heads",
    "image_size",
    "patch_size",
    "intermediate_size",
    "vision_intermediate_size",
)
_OPTIONAL = ("num_key_value_heads", "intermediate_size", "vision_intermediate_size")  # None: derived


def make_tiny_model(path: str | os.PathLike, backbone: str = "llava_next", *, seed: int = 0, **size) -> Path:
    """Write a complete HF-format directory for a small `backbone` model (a registered backbone name).

    Size keywords: hidden_size, num_layers, num_heads, num_key_value_heads, vocab_size, intermediate_size,
    tie_word_embeddings (language model); vision_hidden_size, vision_layers, vision_heads,
    vision_intermediate_size, image_size, patch_size (vision tower); initializer_range. size="NAME" starts
    from a preset of the real shapes (random weights; e.g. "qwen2-vl-2b", "llava-next-7b": the backbone's
    TinySpec lists them), which the other keywords then override.
    The directory holds config.json, model.safetensors, a byte-level BPE tokenizer that knows the image
    tokens, and the image processor's configuration. Written atomically: a failed call leaves nothing.
    """
    from ..backbones import REGISTRY

    opts = tiny_options(backbone, **size)
    spec = REGISTRY[backbone].tiny

    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{os.fspath(out)!r} already exists and is not empty")
    with quiet_transformers(), atomic_dir(out, overwrite=True) as tmp:
        tokenizer = _build_tokenizer(spec, opts["vocab_size"])
        import torch

        torch.manual_seed(seed)
        model, image_processor = spec.build(tokenizer, opts)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
    return out


def tiny_options(backbone: str, **size) -> dict:
    """The checked options `make_tiny_model(path, backbone, **size)` builds from (defaults, preset, keywords)."""
    from ..backbones import NAMES, REGISTRY

    if backbone not in REGISTRY:
        raise InputError(f"backbone must be one of {', '.join(NAMES)}, got {backbone!r}")
    spec = REGISTRY[backbone].tiny
    opts = {**_DEFAULTS, **spec.image_defaults}
    preset = size.pop("size", None)
    if preset is not None:
        if preset not in spec.presets:
            known = ", ".join(spec.presets) or "none"
            raise InputError(f"unknown size {preset!r} for {backbone} (known: {known})")
        opts.update(spec.presets[preset])
    unknown = set(size) - set(opts)
    if unknown:
        raise InputError(f"unknown size keyword(s) {sorted(unknown)}; known: {sorted(opts)}")
    opts.update(size)
    _check_sizes(spec, opts)
    return opts


def _check_sizes(spec, o: dict) -> None:
    for key in SIZE_KEYWORDS:
        if key in _OPTIONAL and o[key] is None:
            continue
        if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] <= 0:
            raise InputError(f"{key} must be a positive int, got {o[key]!r}")
    if not isinstance(o["initializer_range"], (int, float)) or o["initializer_range"] <= 0:
        raise InputError(f"initializer_range must be a positive number, got {o['initializer_range']!r}")
    if o["hidden_size"] % o["num_heads"] or (o["hidden_size"] // o["num_heads"]) % 2:
        raise InputError("hidden_size must be a multiple of num_heads with an even head dimension")
    if o["num_heads"] % (o["num_key_value_heads"] or o["num_heads"]):
        raise InputError("num_heads must be a multiple of num_key_value_heads (grouped-query attention)")
    if not isinstance(o["tie_word_embeddings"], bool):
        raise InputError(f"tie_word_embeddings must be a bool, got {o['tie_word_embeddings']!r}")
    if o["vision_hidden_size"] % o["vision_heads"]:
        raise InputError("vision_hidden_size must be a multiple of vision_heads")
    if o["vocab_size"] < len(spec.specials) + 256:
        raise InputError(f"vocab_size must be at least {len(spec.specials) + 256} (bytes + special tokens)")
    spec.check(o)


def _build_tokenizer(spec, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(spec.specials)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.strip().splitlines() if line]
    tok.train_from_iterator(lines * 4, trainer)
    bos = spec.tokens.get("bos_token")
    if bos is not None:  # Llama-style tokenizers prepend their BOS; Qwen2's add nothing
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, specials.index(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **spec.tokens)


def intermediate_size(o: dict, hidden: int) -> int:
    """A tiny model's MLP width: the intermediate_size keyword, else 4 x the layer's hidden size."""
    return o["intermediate_size"] or 4 * hidden


def vision_intermediate_size(o: dict) -> int:
    """The vision tower's MLP width: the vision_intermediate_size keyword, else 4 x vision_hidden_size."""
    return o["vision_intermediate_size"] or 4 * o["vision_hidden_size"]


def decoder_sizes(o: dict) -> dict:
    """The decoder config keywords every architecture's tiny model shares."""
    return dict(
        vocab_size=o["vocab_size"],
        hidden_size=o["hidden_size"],
        intermediate_size=intermediate_size(o, o["hidden_size"]),
        num_hidden_layers=o["num_layers"],
        num_attention_heads=o["num_heads"],
        num_key_value_heads=o["num_key_value_heads"] or o["num_heads"],
        max_position_embeddings=4096,
        initializer_range=o["initializer_range"],
    )
