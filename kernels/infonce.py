"""Fused InfoNCE over cosine similarity: Triton kernels and their torch.autograd.Function.

For queries q [B, D] and targets t [B + M, D] (row i of t is query i's positive, the M extra rows are
hard negatives shared by every query) and a temperature tau:

    qn = q / max(|q|, eps)    tn = t / max(|t|, eps)    S = qn tn^T / tau          S: [B, B + M]
    loss = mean_i( logsumexp_j S_ij - S_ii )

Why this shape and not one flash-attention-style kernel: at the embedding sizes we train (D = 1536..4096)
the op is bound by its matrix products, not by the softmax. A kernel that recomputes similarity tiles in
the backward pass does four or five B x (B+M) x D products and must carry a D-wide accumulator that does
not fit in registers. Like Liger-Kernel's fused linear cross-entropy we do the minimum, three products,
and keep memory O((B + M) * D):

  * queries go in chunks of R rows; a chunk's raw products q_c t^T [R, B + M] are one cuBLAS product with
    fp32 output (exact products of the inputs, fp32 sums) and the only buffer that grows with B + M
    (R <= max(D, 4M / (B + M)) rows by default);
  * one Triton kernel per chunk scales them by the inverse row norms and 1 / tau, takes the online row
    log-sum-exp and the loss and, in the same pass, writes the logit gradient G = softmax - onehot
    (operand dtype) for the chunk's two gradient products, with G's row and column sums in fp32;
  * the gradient products use centred normalised rows (qn - mean, tn - mean) and the exact sums put the
    means back: G tn = G tc + rowsum(G) t_mean. Embeddings share a large common direction, and without
    this the half-precision rounding of G, multiplied by it, would swamp the small differences a
    gradient is made of (fp16 gradient error 4e-3 -> 4e-4 on near-parallel inputs);
  * so the gradients w.r.t. q and t (fp32, twice the size of half-precision inputs) exist when forward
    returns, and backward only scales them by grad_output and rounds them once; the B x (B + M) logits
    are never stored;
  * row norms and centred rows, and the backward through the normalisation, are one Triton kernel each.

fp32 accumulation throughout; fp32, fp16 and bf16 inputs; gradients come back in the input dtype.
The torch reference is vlm2vec_rt.ops.info_nce_torch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

NORM_EPS = 1e-12  # as torch.nn.functional.normalize


# sizes are not specialised on: each chunk and each input shape would otherwise compile anew
@triton.jit(do_not_specialize=["R", "D"])
def _normalize_rows_kernel(
    x_ptr, xc_ptr, center_ptr, norm_ptr, R, D, stride_x, stride_xc, eps,
    WRITE_CENTERED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # BLOCK_R rows per program: norms in fp32, then (for the gradient products) x / |x| - center
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows = tl.minimum(rows, R - 1).to(tl.int64)  # tail programs recompute the last row; stores are masked
    sum_sq = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs, mask=offs < D, other=0.0).to(tl.float32)
        sum_sq += x * x
    norm = tl.sqrt(tl.sum(sum_sq, axis=1))
    tl.store(norm_ptr + rows, norm, mask=row_ok)
    if WRITE_CENTERED:
        rinv = 1.0 / tl.maximum(norm, eps)
        for d0 in range(0, D, BLOCK_D):
            offs = d0 + tl.arange(0, BLOCK_D)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + offs, mask=offs < D, other=0.0).to(tl.float32)
            center = tl.load(center_ptr + offs, mask=offs < D, other=0.0)
            xc = (x * rinv[:, None] - center).to(xc_ptr.dtype.element_ty)
            tl.store(xc_ptr + rows[:, None] * stride_xc + offs, xc, mask=row_ok[:, None] & (offs < D))


@triton.jit(do_not_specialize=["R", "N", "row_offset"])
def _infonce_rows_kernel(
    s_ptr, g_ptr, loss_ptr, q_norm_ptr, t_norm_ptr, row_sum_ptr, col_sum_ptr,
    R, N, row_offset, stride_s, stride_g, scale_log2, eps,
    WRITE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # BLOCK_R rows of a chunk's raw dot products [R, N] per program, scaled to cosines / tau (base 2) by the
    # inverse norms; online log-sum-exp over column tiles
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = local < R
    local = tl.minimum(local, R - 1)
    s_rows = s_ptr + local.to(tl.int64)[:, None] * stride_s
    pos_col = row_offset + local  # query i's positive is target i
    row_scale = scale_log2 / tl.maximum(tl.load(q_norm_ptr + pos_col), eps)
    m = tl.full([BLOCK_R], -float("inf"), tl.float32)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_rinv = 1.0 / tl.maximum(tl.load(t_norm_ptr + cols, mask=cols < N, other=1.0), eps)
        x = tl.load(s_rows + cols[None, :], mask=cols[None, :] < N, other=-float("inf"))
        x = x * row_scale[:, None] * col_rinv[None, :]
        m_new = tl.maximum(m, tl.max(x, axis=1))
        acc = acc * tl.exp2(m - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), axis=1)
        m = m_new
    lse2 = m + tl.log2(acc)
    pos_rinv = 1.0 / tl.maximum(tl.load(t_norm_ptr + pos_col), eps)
    pos2 = tl.load(s_rows + pos_col[:, None]).reshape([BLOCK_R]) * row_scale * pos_rinv
    tl.store(loss_ptr + local, (lse2 - pos2) * 0.6931471805599453, mask=row_ok)  # back to natural log
    if WRITE_GRAD:
        # d loss_i / d S_ij before the 1 / (tau B) factor: softmax - onehot; may overwrite s in place. Its
        # row and column sums, exact in fp32, go with the centred operands (see info_nce_forward)
        g_rows = g_ptr + local.to(tl.int64)[:, None] * stride_g
        row_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_rinv = 1.0 / tl.maximum(tl.load(t_norm_ptr + cols, mask=cols < N, other=1.0), eps)
            x = tl.load(s_rows + cols[None, :], mask=cols[None, :] < N, other=0.0)
            x = x * row_scale[:, None] * col_rinv[None, :]
            g = tl.exp2(x - lse2[:, None]) - tl.where(cols[None, :] == pos_col[:, None], 1.0, 0.0)
            g = tl.where(row_ok[:, None] & (cols[None, :] < N), g, 0.0)
            tl.store(
                g_rows + cols[None, :],
                g.to(g_ptr.dtype.element_ty),
                mask=row_ok[:, None] & (cols[None, :] < N),
            )
            row_sum += tl.sum(g, axis=1)
            tl.atomic_add(col_sum_ptr + cols, tl.sum(g, axis=0), mask=cols < N, sem="relaxed")
        tl.store(row_sum_ptr + row_offset + local, row_sum, mask=row_ok)


@triton.jit(do_not_specialize=["R", "D"])
def _normalize_backward_kernel(
    x_ptr, norm_ptr, gn_ptr, sum_ptr, center_ptr, dx_ptr, R, D, stride_x, stride_gn, stride_dx, scale, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # gn = gn_centred + sum * center (the gradient w.r.t. x / |x|), then
    # dx = scale / max(|x|, eps) * (gn - xn (xn . gn)); the projection only where |x| >= eps (clamp_min)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows = tl.minimum(rows, R - 1).to(tl.int64)
    norm = tl.load(norm_ptr + rows)
    g_sum = tl.load(sum_ptr + rows)
    rinv = 1.0 / tl.maximum(norm, eps)
    dot = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs, mask=offs < D, other=0.0).to(tl.float32)
        gn = tl.load(gn_ptr + rows[:, None] * stride_gn + offs, mask=offs < D, other=0.0)
        gn += g_sum[:, None] * tl.load(center_ptr + offs, mask=offs < D, other=0.0)
        dot += x * gn
    proj = tl.where(norm >= eps, tl.sum(dot, axis=1) * rinv, 0.0)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + offs, mask=offs < D, other=0.0).to(tl.float32)
        gn = tl.load(gn_ptr + rows[:, None] * stride_gn + offs, mask=offs < D, other=0.0)
        gn += g_sum[:, None] * tl.load(center_ptr + offs, mask=offs < D, other=0.0)
        dx = (scale * rinv)[:, None] * (gn - x * (rinv * proj)[:, None])
        tl.store(
            dx_ptr + rows[:, None] * stride_dx + offs,
            dx.to(dx_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (offs < D),
        )


KERNELS = (_normalize_rows_kernel, _infonce_rows_kernel, _normalize_backward_kernel)


# ---- launchers -----------------------------------------------------------------------------------------
def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def _block_rows(x: torch.Tensor) -> int:
    # a few rows per program on a GPU; more in the interpreter, where each program costs Python calls
    return 4 if x.is_cuda else 16


def row_norms(x: torch.Tensor, *, block_d: int | None = None) -> torch.Tensor:
    """The row norms of x in fp32 [rows]."""
    norms = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    _launch_normalize(x, x, norms, norms, centered=False, block_d=block_d)
    return norms


def centered_rows(
    x: torch.Tensor, norms: torch.Tensor, *, block_d: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / max(|x|, eps) - center in x's dtype, center [D] fp32): center is about the mean normalised row."""
    # any center gives the same gradients (the sums of the logit gradient carry the rest); the mean keeps
    # the rows short, so rounding them and the logit gradient to half precision loses least
    weights = (1.0 / norms.clamp_min(NORM_EPS)).to(x.dtype)[None, :]
    center = _mm_f32(weights, x)[0] / max(x.shape[0], 1)
    xc = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch_normalize(x, xc, center, torch.empty_like(norms), centered=True, block_d=block_d)
    return xc, center


def _launch_normalize(x, xc, center, norms, *, centered: bool, block_d: int | None) -> None:
    rows, d = x.shape
    block_r = _block_rows(x)
    _normalize_rows_kernel[(triton.cdiv(rows, block_r),)](
        x, xc, center, norms, rows, d, x.stride(0), xc.stride(0), NORM_EPS,
        WRITE_CENTERED=centered, BLOCK_R=block_r, BLOCK_D=block_d or _block(d, 1024),
    )  # fmt: skip


def normalize_backward(
    x: torch.Tensor,
    norms: torch.Tensor,
    grad_xc: torch.Tensor,
    grad_sums: torch.Tensor,
    center: torch.Tensor,
    scale: float,
    *,
    block_d: int | None = None,
) -> torch.Tensor:
    """scale * d(x / max(|x|, eps))/dx applied to grad_xc + grad_sums (x) center (the gradient w.r.t. the
    normalised rows, from the centred product and the exact sums), written over grad_xc (fp32 [rows, D];
    each program reads its rows completely before it writes them)."""
    rows, d = x.shape
    block_r = _block_rows(x)
    _normalize_backward_kernel[(triton.cdiv(rows, block_r),)](
        x, norms, grad_xc, grad_sums, center, grad_xc, rows, d, x.stride(0), grad_xc.stride(0),
        grad_xc.stride(0), scale, NORM_EPS, BLOCK_R=block_r, BLOCK_D=block_d or _block(d, 1024),
    )  # fmt: skip
    return grad_xc


# cuBLAS can write fp32 from fp16/bf16 operands (torch.mm(..., out_dtype=)); where this torch lacks it,
# the operands are upcast instead (same result, slower). Found out once per process.
_MM_OUT_DTYPE: dict[str, bool] = {}


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 accumulation and an fp32 result, whatever the (shared) operand dtype."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda and _MM_OUT_DTYPE.get("cuda", True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE["cuda"] = False
    return torch.mm(a.float(), b.float())


def mm_out_dtype_supported() -> bool | None:
    """Whether torch.mm(out_dtype=float32) served the half-precision products (None: not tried yet)."""
    return _MM_OUT_DTYPE.get("cuda")


def default_chunk_rows(b: int, n: int, d: int) -> int:
    """Query rows per chunk: the chunk's cosine block holds at most max(n * d, 4M) fp32 values."""
    return max(1, min(b, max(d, (1 << 22) // max(n, 1))))


def info_nce_forward(
    q: torch.Tensor,
    t: torch.Tensor,
    temperature: float,
    *,
    need_dq: bool = False,
    need_dt: bool = False,
    chunk_rows: int | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The loss (fp32 scalar) and, when asked, d loss / d q and d loss / d t (fp32) for grad_output = 1.

    Inputs are validated by the caller (vlm2vec_rt.ops): 2-D, same device and dtype, t has >= B rows.
    """
    # the kernels walk rows with a unit inner stride
    q = q if q.stride(1) == 1 else q.contiguous()
    t = t if t.stride(1) == 1 else t.contiguous()
    b, d = q.shape
    n = t.shape[0]
    write_grad = need_dq or need_dt
    # the cosines come from the raw inputs (exact products, fp32 sums) scaled by the inverse norms inside
    # the row kernel. The gradient products use centred normalised rows, qc = qn - q_center and
    # tc = tn - t_center: with G the logit gradient, G tn = G tc + rowsum(G) t_center and
    # G^T qn = G^T qc + colsum(G) q_center, the sums taken exactly in fp32. Embeddings share a large common
    # direction; without centring, rounding G to half precision multiplies it and swamps the small
    # differences the gradient is made of.
    q_norms = row_norms(q, block_d=block_d)
    t_norms = row_norms(t, block_d=block_d)
    if write_grad:
        qc, q_center = centered_rows(q, q_norms, block_d=block_d)
        tc, t_center = centered_rows(t, t_norms, block_d=block_d)
        row_sums = torch.empty(b, device=q.device, dtype=torch.float32)
        col_sums = torch.zeros(n, device=q.device, dtype=torch.float32)
    else:
        row_sums = col_sums = q_norms  # unused
    rows = chunk_rows or default_chunk_rows(b, n, d)
    scale_log2 = math.log2(math.e) / temperature
    block_r = _block_rows(q)
    block_n = block_n or _block(n, 1024 if q.is_cuda else 4096)

    losses = torch.empty(b, device=q.device, dtype=torch.float32)
    grad_qc = torch.empty(b, d, device=q.device, dtype=torch.float32) if need_dq else None
    grad_tc = torch.zeros(n, d, device=q.device, dtype=torch.float32) if need_dt else None
    t_t = t.t()
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        dots = _mm_f32(q[r0:r1], t_t)  # [r, n] fp32: the only buffer that grows with n
        # fp32 operands: the gradient overwrites the dots in place; else a buffer in the operand dtype
        g = dots if (not write_grad or q.dtype == torch.float32) else torch.empty_like(dots, dtype=q.dtype)
        _infonce_rows_kernel[(triton.cdiv(r1 - r0, block_r),)](
            dots, g, losses[r0:], q_norms, t_norms, row_sums, col_sums, r1 - r0, n, r0, dots.stride(0),
            g.stride(0), scale_log2, NORM_EPS, WRITE_GRAD=write_grad, BLOCK_R=block_r, BLOCK_N=block_n,
        )  # fmt: skip
        if need_dq:
            grad_qc[r0:r1] = _mm_f32(g, tc)
        if need_dt:
            grad_tc += _mm_f32(g.t(), qc[r0:r1])
        del dots, g
    # d loss / d S_ij = g_ij / (tau * B); S = qn tn^T, so d loss / d qn = g tn / (tau B), d loss / d tn = g^T qn / (tau B)
    scale = 1.0 / (temperature * b)
    dq = (
        normalize_backward(q, q_norms, grad_qc, row_sums, t_center, scale, block_d=block_d)
        if need_dq
        else None
    )
    dt = (
        normalize_backward(t, t_norms, grad_tc, col_sums, q_center, scale, block_d=block_d)
        if need_dt
        else None
    )
    return losses.mean(), dq, dt


class InfoNCEFunction(torch.autograd.Function):
    """Fused InfoNCE; the gradients are computed in forward (see the module docstring) and scaled in backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, t: torch.Tensor, temperature: float, chunk_rows: int | None):
        loss, dq, dt = info_nce_forward(
            q,
            t,
            temperature,
            need_dq=ctx.needs_input_grad[0],
            need_dt=ctx.needs_input_grad[1],
            chunk_rows=chunk_rows,
        )
        ctx.save_for_backward(dq, dt)
        ctx.dtype = q.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        # the gradients wait in fp32: scaled first, then rounded once, as autograd would (fp16 loss scaling
        # must not meet gradients already rounded to subnormals)
        dq, dt = ctx.saved_tensors
        dq = None if dq is None else (dq * grad_loss).to(ctx.dtype)
        dt = None if dt is None else (dt * grad_loss).to(ctx.dtype)
        return dq, dt, None, None


def info_nce(
    q: torch.Tensor, t: torch.Tensor, temperature: float = 0.02, *, chunk_rows: int | None = None
) -> torch.Tensor:
    """Mean InfoNCE loss of q [B, D] against t [B + M, D] over cosine similarity; differentiable in q and t."""
    if torch.is_grad_enabled() and (q.requires_grad or t.requires_grad):
        return InfoNCEFunction.apply(q, t, temperature, chunk_rows)
    return info_nce_forward(q, t, temperature, chunk_rows=chunk_rows)[0]
