"""GradCache: the gradient of a contrastive loss over a large batch in the memory of one small chunk.

Contrastive loss couples every query with every target, so the batch cannot simply be split into
micro-batches. GradCache (Gao et al., 2021) splits it anyway, in two passes:

  1. every chunk is encoded without a graph; the representations are cached (B x D floats: small);
  2. the loss and its gradient with respect to the cached representations are computed in full;
  3. every chunk is encoded again, with a graph, and back-propagated with its slice of that gradient.

The parameter gradients equal those of loss.backward() on the whole batch, because the loss depends on the
parameters only through the representations (chain rule). Dropout must draw the same masks in both
passes: the RNG state before each chunk is saved in pass 1 and restored in pass 3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import distributed
from ..errors import InputError
from .rng import rng_state, set_rng_state


def contrastive_loss(
    q: torch.Tensor,
    t: torch.Tensor,
    negatives: torch.Tensor | None = None,
    *,
    temperature: float = 0.02,
    gather: bool | None = None,
    group: Any = None,
    backend: str = "auto",
) -> torch.Tensor:
    """InfoNCE of queries q [B, D] against targets t [B, D] (row i is query i's positive) and hard negatives [M, D].

    With gather (default: whenever torch.distributed runs more than one rank) queries, positives and
    negatives are all-gathered with the local slices kept live, the targets rebuilt as (all positives, all
    negatives) so row i stays query i's positive, and the loss multiplied by the world size (DDP averages
    gradients over ranks; the full-batch gradient is their sum). The returned loss carries that factor.
    """
    from .. import ops

    if negatives is None:
        negatives = q.new_zeros((0, q.shape[1]))
    world = distributed.world_size(group)
    if gather is None:
        gather = world > 1
    scale = 1.0
    if gather and world > 1:
        q = distributed.gather_keep_local(q, group)
        t = distributed.gather_keep_local(t, group)
        negatives = distributed.gather_keep_local(negatives, group)
        scale = float(world)
    loss = ops.info_nce(q, torch.cat([t, negatives], dim=0), temperature=temperature, backend=backend)
    return loss * scale if scale != 1.0 else loss


def _chunks(seq: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def grad_cache_step(
    encode: Callable[[Sequence[Any]], torch.Tensor],
    queries: Sequence[Any],
    targets: Sequence[Any],
    *,
    chunk_size: int,
    temperature: float = 0.02,
    negatives: Sequence[Any] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    gather: bool | None = None,
    group: Any = None,
    backend: str = "auto",
) -> float:
    """One GradCache forward/backward: afterwards every parameter's .grad holds (added to what it held) exactly
    what loss.backward() on the full batch would, and the loss value is returned.

    encode(list_of_inputs) -> Tensor [len, D], differentiable; it is called on chunks of at most chunk_size
    inputs, twice per chunk (first without a graph). queries[i] and targets[i] are a positive pair;
    negatives are hard negatives shared by all queries. Under DDP pass `no_sync=ddp_model.no_sync`: the
    re-forward of every chunk but the last accumulates gradients locally, and the last one all-reduces.
    Under torch.distributed the loss covers the global batch (see `contrastive_loss`); the returned value is
    the global loss, without the world-size factor. The RNG ends as one plain forward of each chunk leaves it.
    """
    if chunk_size < 1:
        raise InputError(f"chunk_size must be >= 1, got {chunk_size}")
    if len(queries) != len(targets):
        raise InputError(f"{len(queries)} queries but {len(targets)} targets: they must pair up")
    if len(queries) == 0:
        raise InputError("an empty batch: no queries")
    negatives = negatives if negatives is not None else []
    sides = [_chunks(queries, chunk_size), _chunks(targets, chunk_size), _chunks(negatives, chunk_size)]

    # Pass 1: representations without a graph, and the RNG state each chunk started from.
    states: list[list[dict[str, Any]]] = [[], [], []]
    cached: list[list[torch.Tensor]] = [[], [], []]
    with torch.no_grad():
        for side, chunks in enumerate(sides):
            for chunk in chunks:
                states[side].append(rng_state())
                cached[side].append(encode(chunk).detach())
    after_pass_1 = rng_state()

    # Pass 2: the loss on the cached representations, in fp32 and outside any autocast region.
    reps = [torch.cat(c, dim=0).float().requires_grad_() if c else None for c in cached]
    q_reps, t_reps, n_reps = reps
    device_type = q_reps.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        loss = contrastive_loss(
            q_reps, t_reps, n_reps, temperature=temperature, gather=gather, group=group, backend=backend
        )
        loss.backward()
    scale = distributed.world_size(group) if (gather is None or gather) else 1
    loss_value = float(loss.detach()) / scale

    # Pass 3: re-encode each chunk with a graph and the same dropout masks, back-propagate its gradient slice.
    work = []
    for side, chunks in enumerate(sides):
        grads = torch.split(reps[side].grad, [len(c) for c in chunks]) if chunks else []
        work += list(zip(chunks, states[side], grads))
    for k, (chunk, state, grad) in enumerate(work):
        last = k == len(work) - 1
        sync = contextlib.nullcontext() if (no_sync is None or last) else no_sync()
        with sync:
            set_rng_state(state)
            out = encode(chunk)
            out.backward(grad.to(out.dtype))
    set_rng_state(after_pass_1)
    return loss_value
