"""torch.distributed in one place: joining a torchrun job, the collectives training and evaluation use.

    init_from_env, joined     join the job torchrun describes (gloo on CPU, NCCL on CUDA) and leave it cleanly
    world_size, rank, barrier the default process group, or a world of one when there is none
    current()                 object collectives (broadcast, gather) for the job: one per process group
    on_main, on_every_rank    work done on rank 0 (or on each rank) whose exception is raised on every rank
    gather_keep_local         the all-gather whose local slice stays live (contrastive negatives across ranks)

Every collective must be reached by every rank in the same order. So an exception on one rank is never
simply raised there: it travels through the collective the others are waiting in, and all raise together.
torch is imported on first use, so importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import EngineError, InputError

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

T = TypeVar("T")


def _initialised() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in the (default) process group; 1 when torch.distributed is not initialised."""
    if not _initialised():
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group)


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank; 0 when torch.distributed is not initialised."""
    if not _initialised():
        return 0
    import torch.distributed as dist

    return dist.get_rank(group)


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size(group) > 1:
        import torch.distributed as dist

        dist.barrier(group)


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


@contextlib.contextmanager
def joined(device: str = "cpu") -> Iterator[str]:
    """`with joined("cpu") as device:` joins the torchrun job (init_from_env) and, if this call joined it,
    leaves it on exit: all ranks meet at a barrier, then the process group is destroyed.

    Without the barrier a rank that exits first can tear its connections down under another rank still in
    its last collective, and gloo aborts that rank ("terminate called without an active exception"). After
    an exception there is no barrier (a rank that failed alone would leave the others waiting there): the
    group is destroyed at once, so ranks still in a collective get an error rather than a hang. Outside
    torchrun, or when the caller had joined already, it only yields the device.
    """
    joining = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _initialised()
    device = init_from_env(device)
    if not joining:
        yield device
        return
    try:
        yield device
    except BaseException:
        with contextlib.suppress(Exception):
            leave(sync=False)
        raise
    leave()


def leave(*, sync: bool = True) -> None:
    """Leave the job: drop the cached collectives, meet the other ranks (sync=True), destroy the process group.

    Objects that hold the group (a DistributedDataParallel wrapper) should be gone first: gc runs here for
    what only cycles keep alive.
    """
    global _cached
    _cached = None
    if not _initialised():
        return
    import torch.distributed as dist

    gc.collect()
    if sync:
        barrier()
    dist.destroy_process_group()


# ---- object collectives ----------------------------------------------------------------------------------
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
    """Object collectives over the initialised default process group.

    Objects travel over a gloo group even when the job's backend is NCCL: they are small (chunk results,
    indices, errors) and gloo needs no GPU buffers for them. Creating that side group is itself a collective,
    which is why current() makes one per process group and keeps it.
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
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


_SINGLE = SingleProcess()
_cached: tuple[Any, TorchDistributed] | None = None  # (the default process group, its collectives)


def current() -> SingleProcess:
    """The job's object collectives: TorchDistributed when a process group of more than one rank is
    initialised, else SingleProcess.

    The TorchDistributed is made once per default process group and reused (a loop over evaluations
    creates no new groups); a group destroyed and created again gets a fresh one. The first call under a
    new NCCL group is a collective: every rank must make it.
    """
    global _cached
    if not _initialised():
        _cached = None
        return _SINGLE
    import torch.distributed as dist

    if dist.get_world_size() <= 1:
        return _SINGLE
    group = dist.group.WORLD
    if _cached is None or _cached[0] is not group:
        _cached = (group, TorchDistributed())
    return _cached[1]


# ---- errors across ranks -----------------------------------------------------------------------------------
_OURS: dict[str, type[Exception]] = {"InputError": InputError, "EngineError": EngineError}


@dataclass(frozen=True)
class RankError:
    """An exception raised on one rank, as plain data a collective carries to the others."""

    rank: int
    kind: str  # the exception's type name
    message: str

    @classmethod
    def of(cls, exc: BaseException, rank: int, *, context: str = "") -> RankError:
        message = str(exc)
        if context and type(exc).__name__ not in _OURS:
            message = f"{context}: {message}"
        return cls(rank, type(exc).__name__, message)

    def to_exception(self) -> Exception:
        """What the other ranks raise: the same type for InputError and EngineError, else RuntimeError."""
        ours = _OURS.get(self.kind)
        if ours is not None:
            return ours(self.message)
        return RuntimeError(f"{self.kind} on rank {self.rank}: {self.message}")


def raise_everywhere(error: RankError | None, local: BaseException | None = None) -> None:
    """Once a collective has delivered `error` to every rank, raise it on every rank: a rank that failed
    itself raises its own exception (traceback intact), the others error.to_exception(). No-op for None."""
    if error is None:
        return
    if local is not None:
        raise local
    raise error.to_exception()


def on_main(comm: SingleProcess, fn: Callable[[], T]) -> T | None:
    """fn() run on rank 0 and its result broadcast to every rank; if it raises, every rank raises (none is
    left waiting in a later collective)."""
    value: Any = None
    local: BaseException | None = None
    if comm.is_main:
        try:
            value = fn()
        except Exception as e:
            local, value = e, RankError.of(e, comm.rank)
    value = comm.broadcast(value)
    if isinstance(value, RankError):
        raise_everywhere(value, local)
    return value


def on_every_rank(comm: SingleProcess, fn: Callable[[], T]) -> T:
    """fn() run on every rank (loading a model, say); if it raises on any rank, every rank raises."""
    local: BaseException | None = None
    value: Any = None
    try:
        value = fn()
    except Exception as e:
        local = e
    errors = comm.gather(None if local is None else RankError.of(local, comm.rank))
    first = next((e for e in errors if e is not None), None) if comm.is_main else None
    raise_everywhere(comm.broadcast(first), local)
    return value


# ---- tensors -------------------------------------------------------------------------------------------------
def gather_keep_local(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All ranks' rows of x [n_r, D] concatenated in rank order; this rank's slice stays `x` itself.

    The gathered copies of other ranks' rows carry no graph; the local slice is the live tensor, so the
    gradient of a loss over the global batch flows into this rank's rows only (cross-rank negatives in
    contrastive training). Row counts may differ between ranks (hard negatives are optional per example):
    counts are exchanged first and rows padded to the largest count for the collective.
    """
    world = world_size(group)
    if world == 1:
        return x
    import torch
    import torch.distributed as dist

    me = rank(group)
    counts = torch.zeros(world, dtype=torch.int64, device=x.device)
    counts[me] = x.shape[0]
    dist.all_reduce(counts, group=group)
    counts = counts.tolist()
    width = max(counts)
    if width == 0:  # no rank has rows (e.g. no hard negatives anywhere in this batch)
        return x
    padded = x.detach().new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    rows = [p[:n] for p, n in zip(parts, counts)]
    rows[me] = x  # the live slice: the loss's gradient reaches this rank's representations through it
    return torch.cat(rows, dim=0)
