"""Backbones (LLaVA-NeXT, Qwen2-VL), their preprocessors, the Embedder, and the tiny-model factory.

Names load on first use (torch and transformers are heavy imports).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Backbone": ".backbones",
    "load_backbone": ".backbones",
    "Preprocessor": ".preprocessors",
    "load_preprocessor": ".preprocessors",
    "Embedder": ".embedder",
    "make_tiny_model": ".tiny",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
