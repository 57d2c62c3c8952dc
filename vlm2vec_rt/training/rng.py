"""torch's random state (CPU, and every CUDA device once CUDA is initialised), captured and restored.

GradCache replays each chunk's dropout masks from it; checkpoints store it so a resumed run draws what an
uninterrupted one would have. The state is a plain dict of tensors (torch.load(weights_only=True) reads it).
"""

from __future__ import annotations

from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states: {"cpu": ByteTensor, "cuda": [ByteTensor per device] | None}."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() captured (CUDA states only where CUDA is available)."""
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
