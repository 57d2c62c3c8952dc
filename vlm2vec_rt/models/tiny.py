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

# Special tokens per backbone, in id order (ids 0..n-1); the first image-related token ids are what the
# model config points to.
_SPECIALS = {
    "llava_next": ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
    "qwen2_vl": [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ],
}

_DEFAULTS: dict = dict(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    vocab_size=1024,
    vision_hidden_size=32,
    vision_layers=2,
    vision_heads=2,
    intermediate_size=None,  # 4 x hidden_size
    initializer_range=0.1,
)
# LLaVA-NeXT: CLIP views of image_size pixels cut into patch_size patches, anyres grid up to 4x4 views
# (1344x1344 at the real 336 crop). Qwen2-VL: 14-pixel patches, images capped at image_size^2 pixels.
_IMAGE_DEFAULTS = {
    "llava_next": dict(image_size=336, patch_size=56, max_grid=4),
    "qwen2_vl": dict(image_size=224, patch_size=14, max_grid=None),
}


# The integer size keywords of make_tiny_model (the CLI's --hidden-size etc.).
SIZE_KEYWORDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "vocab_size",
    "vision_hidden_size",
    "vision_layers",
    "vision_heads",
    "image_size",
    "patch_size",
    "intermediate_size",
)


def make_tiny_model(path: str | os.PathLike, backbone: str = "llava_next", *, seed: int = 0, **size) -> Path:
    """Write a complete HF-format directory for a small `backbone` model ("llava_next" or "qwen2_vl").

    Size keywords: hidden_size, num_layers, num_heads, vocab_size (language model); vision_hidden_size,
    vision_layers, vision_heads, image_size, patch_size (vision tower); intermediate_size, initializer_range.
    The directory holds config.json, model.safetensors, a byte-level BPE tokenizer that knows the image
    tokens, and the image processor's configuration. Written atomically: a failed call leaves nothing.
    """
    if backbone not in _SPECIALS:
        raise InputError(f"backbone must be one of {sorted(_SPECIALS)}, got {backbone!r}")
    opts = {**_DEFAULTS, **_IMAGE_DEFAULTS[backbone]}
    unknown = set(size) - set(opts)
    if unknown:
        raise InputError(f"unknown size keyword(s) {sorted(unknown)}; known: {sorted(opts)}")
    opts.update(size)
    _check_sizes(backbone, opts)

    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{os.fspath(out)!r} already exists and is not empty")
    with quiet_transformers(), atomic_dir(out, overwrite=True) as tmp:
        tokenizer = _build_tokenizer(backbone, opts["vocab_size"])
        import torch

        torch.manual_seed(seed)
        build = _build_llava_next if backbone == "llava_next" else _build_qwen2_vl
        model, image_processor = build(tokenizer, opts)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
    return out


def _check_sizes(backbone: str, o: dict) -> None:
    for key in SIZE_KEYWORDS:
        if key == "intermediate_size" and o[key] is None:
            continue  # 4 x hidden_size
        if not isinstance(o[key], int) or isinstance(o[key], bool) or o[key] <= 0:
            raise InputError(f"{key} must be a positive int, got {o[key]!r}")
    if not isinstance(o["initializer_range"], (int, float)) or o["initializer_range"] <= 0:
        raise InputError(f"initializer_range must be a positive number, got {o['initializer_range']!r}")
    if o["hidden_size"] % o["num_heads"] or (o["hidden_size"] // o["num_heads"]) % 2:
        raise InputError("hidden_size must be a multiple of num_heads with an even head dimension")
    if o["vision_hidden_size"] % o["vision_heads"]:
        raise InputError("vision_hidden_size must be a multiple of vision_heads")
    if o["vocab_size"] < len(_SPECIALS[backbone]) + 256:
        raise InputError(
            f"vocab_size must be at least {len(_SPECIALS[backbone]) + 256} (bytes + special tokens)"
        )
    if backbone == "llava_next":
        if o["image_size"] % o["patch_size"]:
            raise InputError("image_size must be a multiple of patch_size")
        if o["vision_layers"] < 2:
            raise InputError("LLaVA-NeXT reads the second-to-last vision layer: vision_layers must be >= 2")
    elif o["image_size"] < 56:
        raise InputError("image_size must be at least 56 for Qwen2-VL (its minimum image is 56x56)")


def _build_tokenizer(backbone: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = _SPECIALS[backbone]
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
    if backbone == "llava_next":
        # Llama tokenizers prepend <s>; Qwen2's add nothing.
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
        kw["extra_special_tokens"] = {"image_token": "<image>"}
    else:
        kw = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **kw)


def _intermediate(o: dict, hidden: int) -> int:
    return o["intermediate_size"] or 4 * hidden


def _decoder_sizes(o: dict) -> dict:
    """The decoder sizes both architectures share (full multi-head attention, no GQA)."""
    return dict(
        vocab_size=o["vocab_size"],
        hidden_size=o["hidden_size"],
        intermediate_size=_intermediate(o, o["hidden_size"]),
        num_hidden_layers=o["num_layers"],
        num_attention_heads=o["num_heads"],
        num_key_value_heads=o["num_heads"],
        max_position_embeddings=4096,
        initializer_range=o["initializer_range"],
    )


def _build_llava_next(tokenizer, o: dict):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
    )

    crop, grid = o["image_size"], o["max_grid"]
    pinpoints = [[crop * a, crop * b] for a in range(1, grid + 1) for b in range(1, grid + 1) if a * b > 1]
    text = LlamaConfig(
        **_decoder_sizes(o),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=o["vision_hidden_size"],
        intermediate_size=_intermediate(o, o["vision_hidden_size"]),
        num_hidden_layers=o["vision_layers"],
        num_attention_heads=o["vision_heads"],
        image_size=crop,
        patch_size=o["patch_size"],
        projection_dim=o["vision_hidden_size"],
        initializer_range=o["initializer_range"],
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=(crop // o["patch_size"]) ** 2,
        tie_word_embeddings=False,
    )
    model = LlavaNextForConditionalGeneration(config)
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_grid_pinpoints=pinpoints,
    )
    return model, processor


def _build_qwen2_vl(tokenizer, o: dict):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    head_dim = o["hidden_size"] // o["num_heads"]
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            **_decoder_sizes(o),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [t, h, half - t - h],
            },
            bos_token_id=None,
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=o["vision_layers"],
            embed_dim=o["vision_hidden_size"],
            hidden_size=o["hidden_size"],
            num_heads=o["vision_heads"],
            patch_size=o["patch_size"],
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=o["initializer_range"],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    side = o["image_size"]
    processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56,
        max_pixels=side * side,
        patch_size=o["patch_size"],
        merge_size=2,
        temporal_patch_size=2,
    )
    return model, processor
