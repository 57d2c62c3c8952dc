"""Pipeline profiles: the input recipe a checkpoint was trained with, named and recorded.

An embedding model only gives its published scores on the inputs it was trained on: the same prompt text,
image placeholder, image sizes and rotary positions. A profile names one such recipe; every place that
embeds (Embedder, Engine, training, evaluation) follows the profile it is given and records it beside its
results (engine manifest, results.json, train_config.json, a trained or merged model's `vlm2vec_rt.json`).
docs/fidelity.md lists each profile's steps beside the official code they follow.

    vlm2vec     (default) the official VLM2Vec V1 evaluation inputs, token for token. Qwen2-VL: a bare
                `<|image_pad|>` run (no `<|vision_start|>`/`<|vision_end|>`) and plain 1-D positions for
                every token, image tokens included, as the official code's get_rope_index gives them.
    vlm2vec-v2  the official VLM2Vec-V2 code: as vlm2vec, plus Qwen2-VL pixel limits 3136..1003520
                (whatever the checkpoint's processor says), images with a side under 28 px resized to
                56x56 first, and an item's instruction and text joined the V2 way.
    native      the backbone's own image format: Qwen2-VL `<|vision_start|><|image_pad|>...<|vision_end|>`
                with 3-D M-RoPE positions, for models trained that way (GME-style).

Only the official V2 code supports Qwen2.5-VL, so on Qwen2.5-VL `vlm2vec` follows the V2 code's recipe.
What each profile does on a backbone is that backbone module's `recipe_of` (vlm2vec_rt/backbones/).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

log = logging.getLogger("vlm2vec_rt")

PROFILES = ("vlm2vec", "vlm2vec-v2", "native")
DEFAULT_PROFILE = "vlm2vec"
# Beside a trained adapter or a merged model: the profile it was trained under, read back as the default.
RECORD_FILE = "vlm2vec_rt.json"

# The official V2 code's Qwen2-VL image processor limits (min_pixels, max_pixels), set through `size`.
V2_QWEN_PIXELS = (3136, 1003520)
# The official V2 code resizes Qwen2-VL images with a side under 28 px to 56x56 (aspect not kept).
V2_SMALL_IMAGE = (28, (56, 56))


@dataclass(frozen=True)
class Recipe:
    """What one profile does differently, for the backbone it is applied to.

    vision_markers: wrap an image's tokens in `<|vision_start|>`/`<|vision_end|>` (Qwen2-VL).
    mrope: 3-D M-RoPE positions for image tokens (Qwen2-VL); otherwise every token of a sequence gets the
      1-D position of its index among the real tokens.
    pixel_limits: (min, max) pixels for the image processor, overriding the checkpoint's (Qwen2-VL).
    small_image: (side, (width, height)): an image with a side under `side` is resized to (width, height)
      before the image processor, as Pillow resizes it.
    text_style: "v1" | "v2", how an Item's instruction, text and image placeholder are joined.
    """

    profile: str
    vision_markers: bool = False
    mrope: bool = False
    pixel_limits: tuple[int, int] | None = None
    small_image: tuple[int, tuple[int, int]] | None = None
    text_style: str = "v1"


def check_profile(profile: str) -> str:
    """`profile` if it is a known profile name, else InputError naming the choices."""
    if profile not in PROFILES:
        raise InputError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    return profile


def generic_recipe(profile: str) -> Recipe:
    """A profile's recipe on a backbone with nothing of its own to change (LLaVA-NeXT): only the text style."""
    return Recipe(check_profile(profile), text_style="v2" if profile == "vlm2vec-v2" else "v1")


def recipe(profile: str, backbone: str) -> Recipe:
    """The recipe of `profile` for `backbone` (a registered backbone name); each backbone module defines its own."""
    from .backbones import entry

    return entry(backbone).preprocessor.recipe_of(check_profile(profile))


def recorded_profile(directory: str | os.PathLike | None) -> str | None:
    """The profile a model or adapter directory was trained under (its RECORD_FILE), or None."""
    if directory is None:
        return None
    path = Path(directory) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        profile = json.loads(path.read_text(encoding="utf-8")).get("profile")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise InputError(f"{path}: not a valid profile record ({e})") from None
    if profile not in PROFILES:
        raise InputError(f"{path}: unknown profile {profile!r} (known: {', '.join(PROFILES)})")
    return profile


def write_record(directory: str | os.PathLike, profile: str) -> None:
    """Record the profile a model or adapter directory was trained under (read back by `resolve`)."""
    from . import atomic

    atomic.write_json(Path(directory) / RECORD_FILE, {"profile": check_profile(profile)})


def resolve(profile: str | None, *directories: str | os.PathLike | None) -> str:
    """The profile to use: the one asked for, else the first directory's record, else the default.

    A profile asked for that differs from a directory's record is used, with a warning: the model was
    trained on other inputs.
    """
    recorded = next((p for p in map(recorded_profile, directories) if p is not None), None)
    if profile is None:
        return recorded or DEFAULT_PROFILE
    check_profile(profile)
    if recorded is not None and recorded != profile:
        log.warning(
            "profile %r asked for, but the model was trained under %r: its embeddings may not match",
            profile,
            recorded,
        )
    return profile
