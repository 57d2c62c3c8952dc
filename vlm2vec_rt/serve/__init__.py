"""`vlm2vec-rt serve`: an OpenAI-compatible embeddings server (text, images, chat-style messages) whose
cross-request batcher packs the items of concurrent requests into shared token-budget model calls.

    from vlm2vec_rt.serve import ServeConfig, create_app
    app = create_app(vr.Engine.load("engines/fp32"), ServeConfig(model_name="tiny"))  # run with uvicorn

Names load on first use, so the command line's parser (serve.cli) does not import the web stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "create_app": ".app",
    "Batcher": ".batcher",
    "Overloaded": ".batcher",
    "ServeConfig": ".config",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vlm2vec_rt.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
