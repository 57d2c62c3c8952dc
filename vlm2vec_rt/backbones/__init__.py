"""Backbones: one module per architecture, and the one registry of them.

Each module (llava_next.py, qwen2_vl.py, ...) holds everything specific to its architecture: profile
recipes, placeholder and token arithmetic, image preprocessing settings, the torch steps, the vision graph,
the engine's host steps, LoRA parts and the tiny-model builder (base.py says what each provides). This
registry feeds model-type detection, the CLI's choices and the tests: adding a backbone is one module and
one line below.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import InputError

# One module per backbone, named for its config.json `model_type`; imported (with torch and transformers)
# only when used, so the names are known cheaply (the CLI's choices, model-type detection).
NAMES: tuple[str, ...] = ("llava_next", "qwen2_vl", "qwen2_5_vl", "phi3_v")


def entry(name: str) -> Any:
    """The registry's `Entry` of a backbone (its config.json `model_type`); InputError naming the known ones."""
    if name not in NAMES:
        raise InputError(f"{name!r} is not a supported backbone (supported: {', '.join(NAMES)})")
    return importlib.import_module(f"{__name__}.{name}").ENTRY


def __getattr__(attr: str) -> Any:
    if attr == "REGISTRY":  # name -> Entry of every backbone (imports them all)
        return {name: entry(name) for name in NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
