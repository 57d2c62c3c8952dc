"""Training checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

    out/checkpoints/step-00000050/
        trainable.safetensors   the trainable parameters (adapter weights, or the fine-tuned weights)
        state.pt                optimizer and scheduler state, every rank's RNG states (weights_only-safe)
        progress.json           step, data position (epoch, batch index), last loss
        adapter/                the adapter in peft format (LoRA/DoRA runs), for evaluating a checkpoint

A checkpoint directory is renamed into place only when complete, so a run killed at any moment leaves
either the previous checkpoints or the new one; unfinished temporary folders are ignored and removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_dir
from ..errors import InputError

_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    path: Path
    step: int
    epoch: int
    batch_index: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]  # per rank: what rng.rng_state() captured


def checkpoints_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rng: list[dict[str, Any]],
    epoch: int,
    batch_index: int,
    loss: float,
    keep: int = 2,
    adapter: Any = None,
) -> Path:
    """Write the checkpoint of `step` atomically, then delete all but the newest `keep` (never the new one).

    adapter: a peft model, also saved in peft format as <checkpoint>/adapter (usable like the final one).
    """
    from safetensors.torch import save_file

    root = checkpoints_dir(out_dir)
    path = root / f"step-{step:08d}"
    with atomic_dir(path, overwrite=True) as tmp:
        save_file({n: t.contiguous().cpu() for n, t in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
            tmp / "state.pt",
        )
        progress = {"step": step, "epoch": epoch, "batch_index": batch_index, "loss": loss}
        (tmp / "progress.json").write_text(json.dumps(progress, indent=2) + "\n")
        if adapter is not None:
            adapter.save_pretrained(tmp / "adapter")
        _fsync_dir_files(tmp)
    for old in list_checkpoints(out_dir)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _fsync_dir_files(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories, oldest first; leftovers of interrupted writes are removed."""
    root = checkpoints_dir(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith(".") and p.name.endswith((".tmp", ".old")):
            shutil.rmtree(p, ignore_errors=True)  # a write that was killed before its rename
        elif p.is_dir() and _NAME.match(p.name):
            found.append(p)
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory written by save_checkpoint; InputError naming the file when it is damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        progress = json.loads((path / "progress.json").read_text())
        trainable = load_file(path / "trainable.safetensors", device=str(device))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, SafetensorError, RuntimeError, EOFError) as e:
        raise InputError(f"checkpoint {os.fspath(path)!r} cannot be read: {e}") from None
    return Checkpoint(
        path=path,
        step=int(progress["step"]),
        epoch=int(progress["epoch"]),
        batch_index=int(progress["batch_index"]),
        trainable=trainable,
        optimizer=state["optimizer"],
        scheduler=state["scheduler"],
        rng=state["rng"],
    )
