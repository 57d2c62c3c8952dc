"""Fused similarity top-k: inner products of queries [Q, D] with a corpus [N, D], streamed in tiles, keeping a
running top-k per query so the Q x N score matrix is never written.

Exact kernel (_topk_kernel). Each program owns BLOCK_Q queries and one contiguous split of the corpus (the
corpus is split so that a small query batch still fills the GPU). Per corpus tile it computes the
[BLOCK_Q, BLOCK_N] score tile with tl.dot (fp32 accumulation) and merges it into the running top-K_PAD
(K_PAD = k rounded up to a power of two) with bitonic networks:

  * a score and its corpus index are packed into one int64 key, (order-preserving int32 of the fp32 score)
    << 32 | (2^32 - 1 - index), so sorting keys sorts scores and breaks ties towards the lower index;
  * the tile's own top K_PAD (bitonic top-k) descending, against the running list ascending: their
    element-wise maximum is exactly the top K_PAD of the union, a bitonic sequence, so one merge stage
    (log2 K_PAD compare-and-swap steps) restores the order;
  * tiles whose best key is below every row's K_PAD-th best are skipped without sorting.
Each split writes its K_PAD best per query; a torch.topk over splits x K_PAD candidates finishes.

Two passes for a large corpus. The sorting networks cost tens of integer operations per score, several
times the tensor-core work of the score itself, so over most of the corpus they are avoided:
  1. the exact kernel on every s-th corpus row (s = 16): the k-th best score of that sample is a lower
     bound of the k-th best of the whole corpus;
  2. _collect_kernel streams the whole corpus computing scores exactly as the exact kernel does, and
     appends the keys of scores >= that bound to a per-query buffer (an atomic counter per query; about
     k * s of them are expected), a compare per score and nothing else;
  3. torch.topk over each query's buffer. Queries whose buffer overflowed (adversarial data: many ties)
     are redone with the exact kernel over the whole corpus, so the result is exact either way.

The torch reference (chunked matmul + running merge) is vlm2vec_rt.ops.topk_similarity_torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_KEY: tl.constexpr = tl.constexpr(-(2**63))  # below every packed key: an empty slot
LOW_MASK: tl.constexpr = tl.constexpr(2**32 - 1)


@triton.jit
def _pack_keys(scores, cols):
    # fp32 -> int32 whose signed order is the float order (negative floats: flip the magnitude bits)
    bits = scores.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (LOW_MASK - cols.to(tl.int64))


# Bitonic networks on a tensor viewed as a hypercube [2] * n_dims, after triton.language.standard's sort,
# except that a pair's partner is found as (pair sum - self) rather than with an xor reduction: the same
# cost compiled, and the Triton interpreter runs a sum in numpy but an xor reduction element by element.
@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_and_swap(x, flip, i: tl.constexpr, n_dims: tl.constexpr):
    # along the i-th innermost dimension; int64 sums wrap, and the difference is still the partner
    partner = tl.sum(x, axis=n_dims - 1 - i, keep_dims=True) - x
    right = _indicator(n_dims, i)
    return tl.where((x > partner) != (flip ^ right).to(tl.int1), partner, x)


@triton.jit
def _bitonic_stage(x, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    # order 0: ascending, 1: descending, 2: alternating runs of 2**stage (the next stage merges them)
    if order == 2:
        flip = _indicator(n_dims, stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        x = _compare_and_swap(x, flip, stage - 1 - i, n_dims)
    return x


@triton.jit
def _row_topk_desc(x, LOG_ROWS: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
    # the 2**LOG_K largest of each row of x [2**LOG_ROWS, 2**LOG_N], descending (bitonic top-k: sort runs
    # of 2**LOG_K, then repeatedly keep the element-wise max of neighbouring runs and re-merge)
    n_dims: tl.constexpr = LOG_ROWS + LOG_N
    h = tl.reshape(x, [2] * n_dims)
    for i in tl.static_range(1, LOG_K + 1):
        h = _bitonic_stage(h, i, 2 if i < LOG_N else 1, n_dims)
    for i in tl.static_range(LOG_K + 1, LOG_N + 1):
        h = tl.max(h, axis=n_dims - (i - LOG_K) - LOG_K)
        h = _bitonic_stage(h, LOG_K, 2 if i < LOG_N else 1, n_dims - (i - LOG_K))
    return tl.reshape(h, [2**LOG_ROWS, 2**LOG_K])


@triton.jit
def _program_span(Q, N, n_per_split, BLOCK_Q: tl.constexpr):
    # this program's queries (grid axis 0) and its split of the corpus, rows [n_start, n_end) (grid axis 1)
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    n_start = tl.program_id(1) * n_per_split
    return rows, rows < Q, n_start, tl.minimum(n_start + n_per_split, N)


@triton.jit
def _score_tile(
    q_rows, row_mask, c_ptr, cols, col_mask, D, stride_c,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    # [BLOCK_Q, BLOCK_N] inner products, fp32 accumulation; both kernels score through here, so a score
    # computed by one is bit for bit the score computed by the other
    c_rows = c_ptr + cols.to(tl.int64)[:, None] * stride_c
    scores = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        qt = tl.load(q_rows + dd[None, :], mask=row_mask[:, None] & (dd[None, :] < D), other=0.0)
        ct = tl.load(c_rows + dd[None, :], mask=col_mask[:, None] & (dd[None, :] < D), other=0.0)
        scores = tl.dot(qt, tl.trans(ct), scores, input_precision=INPUT_PRECISION)
    return scores


# sizes are not specialised on (divisibility by 16 would compile the sorting networks again per shape)
@triton.jit(do_not_specialize=["Q", "N", "D", "n_per_split"])
def _topk_kernel(
    q_ptr, c_ptr, out_scores_ptr, out_idx_ptr,
    Q, N, D, n_per_split, stride_q, stride_c, stride_out_q, stride_out_split,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LOG_Q: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    K_PAD: tl.constexpr = 2**LOG_K
    rows, row_mask, n_start, n_end = _program_span(Q, N, n_per_split, BLOCK_Q)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q

    running = tl.full([BLOCK_Q, K_PAD], MIN_KEY, tl.int64)  # ascending: slot 0 holds the K_PAD-th best
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_end
        scores = _score_tile(
            q_rows, row_mask, c_ptr, cols, col_mask, D, stride_c, BLOCK_Q, BLOCK_N, BLOCK_D, INPUT_PRECISION
        )
        keys = tl.where(col_mask[None, :], _pack_keys(scores, cols), MIN_KEY)
        if tl.max(tl.max(keys, axis=1), axis=0) > tl.min(tl.min(running, axis=1), axis=0):
            # running ascending vs tile top descending: the element-wise max is the top K_PAD of both,
            # a bitonic sequence, and one merge stage sorts it
            merged = tl.maximum(running, _row_topk_desc(keys, LOG_Q, LOG_N, LOG_K))
            h = _bitonic_stage(tl.reshape(merged, [2] * (LOG_Q + LOG_K)), LOG_K, 0, LOG_Q + LOG_K)
            running = tl.reshape(h, [BLOCK_Q, K_PAD])

    # unpack, best first
    valid = running != MIN_KEY
    ordered = (running >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    scores = tl.where(valid, bits.to(tl.float32, bitcast=True), -float("inf"))
    idx = tl.where(valid, LOW_MASK - (running & LOW_MASK), -1)
    slots = K_PAD - 1 - tl.arange(0, K_PAD)
    out = rows.to(tl.int64)[:, None] * stride_out_q + tl.program_id(1) * stride_out_split + slots[None, :]
    tl.store(out_scores_ptr + out, scores, mask=row_mask[:, None])
    tl.store(out_idx_ptr + out, idx, mask=row_mask[:, None])


@triton.jit(do_not_specialize=["Q", "N", "D", "n_per_split", "cap"])
def _collect_kernel(
    q_ptr, c_ptr, bound_ptr, count_ptr, cand_ptr,
    Q, N, D, n_per_split, stride_q, stride_c, cap,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    rows, row_mask, n_start, n_end = _program_span(Q, N, n_per_split, BLOCK_Q)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q
    bound = tl.load(bound_ptr + rows, mask=row_mask, other=float("inf"))  # padding rows take nothing
    counters = tl.broadcast_to(count_ptr + rows[:, None], [BLOCK_Q, BLOCK_N])
    cand_rows = cand_ptr + rows.to(tl.int64)[:, None] * cap
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n_end
        scores = _score_tile(
            q_rows, row_mask, c_ptr, cols, col_mask, D, stride_c, BLOCK_Q, BLOCK_N, BLOCK_D, INPUT_PRECISION
        )
        hit = (scores >= bound[:, None]) & col_mask[None, :]
        if tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0) > 0:
            slot = tl.atomic_add(counters, 1, mask=hit, sem="relaxed")
            tl.store(cand_rows + slot, _pack_keys(scores, cols), mask=hit & (slot < cap))


KERNELS = (_topk_kernel, _collect_kernel)


def _log2(n: int) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"block sizes must be powers of two, got {n}")
    return n.bit_length() - 1


def _config(k_pad: int) -> dict[str, int]:
    """Tile sizes by k: the running list and the sort networks live in registers, so big k means few rows."""
    if k_pad <= 64:
        return {"block_q": 64, "block_n": 128, "block_d": 64, "num_warps": 8}
    if k_pad <= 128:
        return {"block_q": 32, "block_n": 128, "block_d": 64, "num_warps": 8}
    return {"block_q": 16, "block_n": k_pad, "block_d": 64, "num_warps": 8}


def topk_similarity(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    sample_stride: int | None = None,
    block_q: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    splits: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [Q, k] fp32, indices [Q, k] int64) of the k largest inner products per query, best first.

    Inputs are validated by the caller (vlm2vec_rt.ops): 2-D, same device, 1 <= k <= N, Q >= 1. The queries
    are cast to the corpus dtype (fp32, fp16 or bf16); fp32 products use IEEE fp32, not TF32.
    sample_stride: 1 for the single exact pass, s > 1 for the two-pass search with every s-th corpus row
    as the sample (default: 16 where the sample holds at least 8 K_PAD rows, else 1).
    """
    n_queries, d = queries.shape
    n = corpus.shape[0]
    q = queries.to(corpus.dtype)
    q = q if q.stride(1) == 1 else q.contiguous()
    c = corpus if corpus.stride(1) == 1 else corpus.contiguous()
    k_pad = max(16, triton.next_power_of_2(k))
    cfg = _config(k_pad)
    tiles = {
        "block_q": block_q or cfg["block_q"],
        "block_n": max(block_n or cfg["block_n"], k_pad),
        "block_d": block_d or min(cfg["block_d"], max(16, triton.next_power_of_2(d))),
        "num_warps": num_warps or cfg["num_warps"],
        "splits": splits,
    }
    stride = sample_stride or (16 if n // 16 >= 8 * k_pad else 1)
    if stride <= 1 or triton.cdiv(n, stride) < k:
        return _exact(q, c, k, tiles)

    # the sample's k-th best bounds the corpus' k-th best from below; the margin covers rounding, should the
    # compiler order a sum differently in the two kernels
    bound = _exact(q, c[::stride], k, tiles)[0][:, k - 1]
    bound = bound - bound.abs() * 1e-5 - 1e-30
    cap = 4 * k * stride + 256  # about k * stride scores clear the bound
    counts, cands = _collect(q, c, bound, cap, tiles)
    scores, idx = _unpack(torch.topk(cands, k, dim=1).values)
    redo = ((counts > cap) | (counts < k)).nonzero().flatten()
    if redo.numel():
        scores[redo], idx[redo] = _exact(q[redo], c, k, tiles)
    return scores, idx


def _grid(n_queries: int, n: int, tiles: dict, device: torch.device) -> tuple[int, int, int]:
    """(query blocks, corpus splits, corpus rows per split)."""
    q_blocks = triton.cdiv(n_queries, tiles["block_q"])
    n_tiles = triton.cdiv(n, tiles["block_n"])
    splits = tiles["splits"]
    if splits is None:
        # enough programs to fill the GPU twice over; the interpreter just exercises the split merge
        target = (
            2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
        )
        splits = triton.cdiv(target, q_blocks)
    splits = max(1, min(splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return q_blocks, triton.cdiv(n_tiles, tiles_per_split), tiles_per_split * tiles["block_n"]


def _exact(q: torch.Tensor, c: torch.Tensor, k: int, tiles: dict) -> tuple[torch.Tensor, torch.Tensor]:
    n_queries, d = q.shape
    n = c.shape[0]
    k_pad = max(16, triton.next_power_of_2(k))
    q_blocks, splits, n_per_split = _grid(n_queries, n, tiles, c.device)
    out_scores = torch.empty(n_queries, splits, k_pad, device=c.device, dtype=torch.float32)
    out_idx = torch.empty(n_queries, splits, k_pad, device=c.device, dtype=torch.int64)
    _topk_kernel[(q_blocks, splits)](
        q, c, out_scores, out_idx,
        n_queries, n, d, n_per_split, q.stride(0), c.stride(0), out_scores.stride(0), out_scores.stride(1),
        BLOCK_Q=tiles["block_q"], BLOCK_N=tiles["block_n"], BLOCK_D=tiles["block_d"],
        LOG_Q=_log2(tiles["block_q"]), LOG_N=_log2(tiles["block_n"]), LOG_K=_log2(k_pad),
        INPUT_PRECISION=_input_precision(c), num_warps=tiles["num_warps"],
    )  # fmt: skip
    if splits == 1:
        return out_scores[:, 0, :k].contiguous(), out_idx[:, 0, :k].contiguous()
    scores, pos = torch.topk(out_scores.view(n_queries, -1), k, dim=1)
    return scores, out_idx.view(n_queries, -1).gather(1, pos)


def _collect(
    q: torch.Tensor, c: torch.Tensor, bound: torch.Tensor, cap: int, tiles: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per query: how many scores cleared its bound [Q] int32, their keys [Q, cap] int64, empty slots MIN_KEY)."""
    n_queries, d = q.shape
    n = c.shape[0]
    q_blocks, splits, n_per_split = _grid(n_queries, n, tiles, c.device)
    counts = torch.zeros(n_queries, device=c.device, dtype=torch.int32)
    cands = torch.full((n_queries, cap), -(2**63), device=c.device, dtype=torch.int64)
    _collect_kernel[(q_blocks, splits)](
        q, c, bound.contiguous(), counts, cands, n_queries, n, d, n_per_split, q.stride(0), c.stride(0), cap,
        BLOCK_Q=tiles["block_q"], BLOCK_N=tiles["block_n"], BLOCK_D=tiles["block_d"],
        INPUT_PRECISION=_input_precision(c), num_warps=tiles["num_warps"],
    )  # fmt: skip
    return counts, cands


def _unpack(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int64 keys -> (fp32 scores, int64 corpus indices); the inverse of _pack_keys."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), (2**32 - 1) - (keys & (2**32 - 1))


def _input_precision(c: torch.Tensor) -> str | None:
    return "ieee" if c.dtype == torch.float32 else None
