"""Backbones: one module per architecture, and the one registry of them.

Each module (llava_next.py, qwen2_vl.py, ...) holds everything specific to its architecture: profile
recipes, placeholder and token arithmetic, image preprocessing settings, the torch steps, the vision graph,
the engine's host steps, LoRA parts and the tiny-model builder (base.py says what each provides). This
registry feeds model-type detection, the CLI's choices and the tests: adding a backbone is one module and
one line below.
"""

from __future__ import annotations

from ..errors import InputError
from . import llava_next, phi3_v, qwen2_5_vl, qwen2_vl
from .base import Entry

REGISTRY: dict[str, Entry] = {m.ENTRY.name: m.ENTRY for m in (llava_next, qwen2_vl, qwen2_5_vl, phi3_v)}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def entry(name: str) -> Entry:
    """The registry's entry of a backbone (its config.json `model_type`); InputError naming the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"{name!r} is not a supported backbone (supported: {', '.join(NAMES)})") from None
