"""Devices: which torch device runs a model or an engine, checked before any work (torch loads lazily)."""

from __future__ import annotations

from .errors import InputError


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str, what: str = "device") -> str:
    """`device` if torch can use it on this machine; InputError naming `what` (a flag, a keyword) otherwise:
    a device torch does not know, CUDA without a GPU or beyond the GPUs present, or neither cpu nor cuda."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(
            f"{what} {device!r} is not a device (use cpu, or cuda / cuda:N on a GPU machine)"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{what} {device}: CUDA is not available on this machine (use cpu)")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise InputError(f"{what} {device}: this machine has {count} CUDA device(s)")
    elif parsed.type != "cpu":
        raise InputError(f"{what} {device!r}: vlm2vec-rt runs on cpu or cuda")
    return device
