"""vlm2vec-rt: a compiled, high-performance runtime for universal multimodal embeddings (VLM2Vec).

The public names of API.md. Heavy pieces load on first use, so `import vlm2vec_rt` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import EngineError, InputError
from .preprocess.items import Item

__version__ = "0.1.0"

# name -> (module, attribute or None for the module itself)
_LAZY = {
    "Embedder": (".models.embedder", "Embedder"),
    "make_tiny_model": (".models.tiny", "make_tiny_model"),
    "build_engine": (".engine.build", "build_engine"),
    "Engine": (".engine.runtime", "Engine"),
    "search": (".ops", "search"),
    "ops": (".ops", None),
    "tiling": (".tiling", None),
    "training": (".training", None),
    "eval": (".eval", None),
}

__all__ = ["EngineError", "InputError", "Item", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vlm2vec_rt' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
