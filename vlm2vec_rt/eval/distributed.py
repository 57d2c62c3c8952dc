"""The few collectives evaluation needs, for one process or for a torchrun job (torch.distributed).

Objects travel over a gloo group even when the job's backend is NCCL: they are small (chunk results,
dataset indices) and gloo needs no GPU buffers for them. Rank 0 reads data, writes the cache and
scores; every rank encodes its share of the chunks.
"""

from __future__ import annotations

import os
from typing import Any


class SingleProcess:
    """World of one: every collective is the identity."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        """obj from rank 0, on every rank."""
        return obj

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's obj, as a list on rank 0 (None elsewhere)."""
        return [obj]

    def barrier(self) -> None:
        pass


class TorchDistributed(SingleProcess):
    """Collectives over an initialised torch.distributed process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Must be created on every rank in the same order: this constructor is collective.
        self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None

    def broadcast(self, obj: Any) -> Any:
        box = [obj if self.rank == 0 else None]
        self._dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        out = [None] * self.world_size if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=0, group=self._group)
        return out

    def barrier(self) -> None:
        self._dist.barrier(group=self._group)


def current() -> SingleProcess:
    """TorchDistributed when a process group with more than one rank is initialised, else SingleProcess."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a dependency
        return SingleProcess()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributed()
    return SingleProcess()


def init_from_env(device: str = "cpu") -> str:
    """Join the torchrun job described by the environment (WORLD_SIZE > 1), if any and not joined yet.

    NCCL on CUDA devices, gloo on CPU. Returns the device this rank should use ("cuda" becomes
    "cuda:<LOCAL_RANK>").
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    import torch
    import torch.distributed as dist

    if device.startswith("cuda") and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return device
