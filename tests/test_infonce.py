"""ops.info_nce: the fused Triton path against the eager torch reference, forward and both gradients.

On CPU the kernels run under the Triton interpreter (kernels/interpreter.py: switched on for this module
only, even if triton was imported earlier in the session); with CUDA they run compiled. bf16 is checked on
a GPU only (the interpreter's bf16 arithmetic is not the GPU's).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from vlm2vec_rt import ops
from vlm2vec_rt.errors import InputError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    from vlm2vec_rt.kernels.interpreter import interpreter_mode

    with contextlib.nullcontext() if DEVICE == "cuda" else interpreter_mode():
        yield


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def loss_and_grads(fn, q, t, *, loss_scale=1.0, **kw):
    q = q.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    loss = fn(q, t, **kw)
    (loss * loss_scale).backward()
    return loss.detach(), q.grad, t.grad


def assert_matches_reference(q, t, temperature, *, chunk_size=None, loss_scale=1.0):
    loss, dq, dt = loss_and_grads(
        ops.info_nce, q, t, temperature=temperature, backend="triton", chunk_size=chunk_size,
        loss_scale=loss_scale,
    )  # fmt: skip
    ref_loss, ref_dq, ref_dt = loss_and_grads(
        ops.info_nce_torch, q, t, temperature=temperature, loss_scale=loss_scale
    )
    tol = TOL[q.dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert dq.dtype == q.dtype and dt.dtype == t.dtype
    for x in (loss, dq, dt):
        assert torch.isfinite(x).all()
    # floors for B = 1, M = 0: the loss and gradients are exactly 0 and the reference holds rounding noise
    assert abs(loss.item() - ref_loss.item()) <= tol * max(abs(ref_loss.item()), 1.0)
    assert rel_err(dq, ref_dq, floor=1e-3) < tol
    assert rel_err(dt, ref_dt, floor=1e-3) < tol


# Every combination of the sizes the issue names (B = 1, 37, 130; D = 3, 100, 257; M = 0, 5) and both
# temperatures, in fp32 (chunks of 16 query rows: several chunks, a ragged last one) and fp16 (one chunk).
CASES = [
    (b, m, d, temperature, dtype, 16 if dtype == torch.float32 else None)
    for dtype in (torch.float32, torch.float16)
    for b in (1, 37, 130)
    for d in (3, 100, 257)
    for m in (0, 5)
    for temperature in (0.02, 1.0)
]


@pytest.mark.parametrize("b,m,d,temperature,dtype,chunk_size", CASES)
def test_matches_reference(b, m, d, temperature, dtype, chunk_size):
    gen = torch.Generator().manual_seed(b * 1000 + d)
    q = torch.randn(b, d, generator=gen).to(DEVICE, dtype)
    t = torch.randn(b + m, d, generator=gen).to(DEVICE, dtype)
    assert_matches_reference(q, t, temperature, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_similarities_stay_finite(dtype):
    # every vector near one direction, entries ~300 (squares overflow fp16): cosines ~1, logits ~50.
    # Such long vectors have tiny gradients: fp16 training scales the loss so they leave the subnormals.
    # Near-parallel vectors make the gradient a small difference of large terms: the kernel's centred
    # operands keep the half-precision logit gradient from swamping it (same tolerance as random data).
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(1, 64, generator=gen)
    q = ((base + 0.05 * torch.randn(37, 64, generator=gen)) * 300).to(DEVICE, dtype)
    t = ((base + 0.05 * torch.randn(42, 64, generator=gen)) * 300).to(DEVICE, dtype)
    assert_matches_reference(q, t, 0.02, chunk_size=16, loss_scale=1024.0)


def test_zero_rows_follow_normalize_semantics():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(9, 20, generator=gen).to(DEVICE)
    t = torch.randn(12, 20, generator=gen).to(DEVICE)
    q[2] = 0.0
    t[10] = 0.0
    assert_matches_reference(q, t, 0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU only")
def test_bf16_on_gpu():
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(130, 257, generator=gen).to("cuda", torch.bfloat16)
    t = torch.randn(135, 257, generator=gen).to("cuda", torch.bfloat16)
    assert_matches_reference(q, t, 0.02, chunk_size=64)


def test_gradient_for_one_input_only_and_without_grad():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(20, 33, generator=gen).to(DEVICE)
    t = torch.randn(25, 33, generator=gen).to(DEVICE)
    ref_loss, ref_dq, ref_dt = loss_and_grads(ops.info_nce_torch, q, t, temperature=0.05)

    qg = q.clone().requires_grad_()
    ops.info_nce(qg, t, temperature=0.05, backend="triton").backward()
    assert rel_err(qg.grad, ref_dq) < 1e-5

    tg = t.clone().requires_grad_()
    ops.info_nce(q, tg, temperature=0.05, backend="triton").backward()
    assert rel_err(tg.grad, ref_dt) < 1e-5

    with torch.no_grad():
        loss = ops.info_nce(q.clone().requires_grad_(), t, temperature=0.05, backend="triton")
    assert not loss.requires_grad
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())


def test_grad_cache_and_gathered_targets():
    """GradCache differentiates the loss w.r.t. cached leaf representations; distributed training
    all-gathers targets with only the local slice live. Both reduce to: gradients reach exactly the live
    leaves, scaled by whatever multiplies the loss."""
    gen = torch.Generator().manual_seed(9)
    reps_q = torch.randn(12, 40, generator=gen).to(DEVICE).requires_grad_()
    local_t = torch.randn(6, 40, generator=gen).to(DEVICE).requires_grad_()
    remote_t = torch.randn(6, 40, generator=gen).to(DEVICE)  # another rank's slice: no graph
    negatives = torch.randn(5, 40, generator=gen).to(DEVICE)

    grads = {}
    for backend in ("triton", "torch"):
        targets = torch.cat([remote_t, local_t, negatives])  # rank 1's slice is rows 6..11
        loss = 2.0 * ops.info_nce(reps_q, targets, temperature=0.02, backend=backend)  # x world size
        grads[backend] = torch.autograd.grad(loss, [reps_q, local_t])
    for got, ref in zip(grads["triton"], grads["torch"]):
        assert rel_err(got, ref) < 1e-5


def test_no_b_by_n_buffer(monkeypatch):
    """The fused path's only (B+M)-wide products are chunk_size rows tall: memory O(chunk * (B+M) + (B+M) * D)."""
    import importlib

    kernel = importlib.import_module("vlm2vec_rt.kernels.infonce")
    shapes = []
    real_mm = kernel._mm_f32

    def recording_mm(a, b):
        out = real_mm(a, b)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(kernel, "_mm_f32", recording_mm)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(130, 40, generator=gen).to(DEVICE)
    t = torch.randn(135, 40, generator=gen).to(DEVICE)
    loss_and_grads(ops.info_nce, q, t, temperature=0.02, backend="triton", chunk_size=32)
    assert max(rows * cols for rows, cols in shapes) <= max(32 * 135, 135 * 40)
    assert (32, 135) in shapes


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(31, 17, generator=gen).to(DEVICE).t().contiguous().t()  # same values, column-major
    t = torch.randn(17, 40, generator=gen).to(DEVICE).t()  # [40, 17] view with stride (1, 40)
    assert not t.is_contiguous()
    assert_matches_reference(q, t, 0.1)


def test_torch_reference_is_cross_entropy_and_gradchecks():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(6, 5, generator=gen, dtype=torch.float64).requires_grad_()
    t = torch.randn(8, 5, generator=gen, dtype=torch.float64).requires_grad_()
    logits = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(t, dim=1).t() / 0.3
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(6))
    assert torch.allclose(ops.info_nce_torch(q, t, temperature=0.3), expected)
    assert torch.autograd.gradcheck(lambda a, b: ops.info_nce_torch(a, b, temperature=0.3), (q, t))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_does_not_lower_the_products(backend):
    # bf16 autocast would round the cosines before 1 / temperature amplifies them (loss off by ~1e-3)
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(37, 100, generator=gen).to(DEVICE)
    t = torch.randn(42, 100, generator=gen).to(DEVICE)
    ref_loss, ref_dq, ref_dt = loss_and_grads(ops.info_nce, q, t, temperature=0.02, backend=backend)
    qg, tg = q.clone().requires_grad_(), t.clone().requires_grad_()
    with torch.autocast(device_type=DEVICE, dtype=torch.bfloat16):
        loss = ops.info_nce(qg, tg, temperature=0.02, backend=backend)
    loss.backward()  # outside autocast, as torch's AMP recipe has it
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    assert rel_err(qg.grad, ref_dq) < 1e-6 and rel_err(tg.grad, ref_dt) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_backend_takes_float64_on_cuda():
    gen = torch.Generator().manual_seed(19)
    q = torch.randn(6, 5, generator=gen, dtype=torch.float64).to("cuda")
    t = torch.randn(8, 5, generator=gen, dtype=torch.float64).to("cuda")
    assert ops.info_nce(q, t) == ops.info_nce_torch(q, t)


def test_auto_backend_on_cpu_is_torch():
    q, t = torch.randn(4, 8), torch.randn(6, 8)
    assert ops.info_nce(q, t) == ops.info_nce_torch(q, t)


@pytest.mark.parametrize(
    "q,t,kw,match",
    [
        (torch.randn(4, 8), torch.randn(6, 8, dtype=torch.float64), {}, "same dtype"),
        (torch.randn(4, 8), torch.randn(6, 7), {}, "dim 8 but t has dim 7"),
        (torch.randn(4, 8), torch.randn(3, 8), {}, "at least one positive"),
        (torch.randn(4, 8, 2), torch.randn(6, 8), {}, "2-D"),
        (torch.randn(0, 8), torch.randn(6, 8), {}, "at least one row"),
        (torch.ones(4, 8, dtype=torch.int64), torch.ones(6, 8, dtype=torch.int64), {}, "floating"),
        (torch.randn(4, 8), torch.randn(6, 8, device="meta"), {}, "is on"),
        (torch.randn(4, 8), torch.randn(6, 8), {"temperature": 0.0}, "temperature"),
        (torch.randn(4, 8), torch.randn(6, 8), {"temperature": float("nan")}, "temperature"),
        (torch.randn(4, 8), torch.randn(6, 8), {"backend": "cuda"}, "backend"),
        (torch.randn(4, 8), torch.randn(6, 8), {"chunk_size": 0}, "chunk_size"),
        ([[1.0]], torch.randn(6, 8), {}, "torch.Tensor"),
        (
            torch.randn(4, 8, dtype=torch.float64),
            torch.randn(6, 8, dtype=torch.float64),
            {"backend": "triton"},
            "float32",
        ),
    ],
)
def test_bad_input_is_a_clear_error(q, t, kw, match):
    with pytest.raises(InputError, match=match):
        ops.info_nce(q, t, **kw)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        ops.info_nce(torch.randn(4, 8), torch.randn(6, 8), backend="triton")
