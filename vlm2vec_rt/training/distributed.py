"""Cross-rank negatives for contrastive training under torch.distributed (torchrun; gloo on CPU, NCCL on GPU).

Every rank's queries and targets are all-gathered so each query is scored against the whole global batch.
The gathered copies of other ranks' rows carry no graph; the local slice is the live tensor, so gradients
flow into this rank's representations only. Each rank's loss is the global loss; scaled by the world size,
DDP's gradient averaging then yields the full-batch gradient (the sum of every rank's contribution).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in the (default) process group; 1 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank; 0 when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def gather_keep_local(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All ranks' rows of x [n_r, D] concatenated in rank order; this rank's slice stays `x` itself.

    Row counts may differ between ranks (hard negatives are optional per example): counts are exchanged
    first and rows padded to the largest count for the collective.
    """
    world = world_size(group)
    if world == 1:
        return x
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


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size(group) > 1:
        dist.barrier(group)
