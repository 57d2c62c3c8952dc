"""SeededDropout (training/dropout.py) against its reference: the same mask applied by plain torch ops, and
torch's dropout for the statistics (keep rate, unbiased output)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm2vec_rt.training.dropout import SeededDropout, keep_mask, lora_dropout_slots, use_seeded_dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (3, 7, 13), (2, 1, 257), (5, 33)])
@pytest.mark.parametrize("p", [0.1, 0.37])
def test_matches_reference_forward_and_backward(dtype, shape, p):
    """Output and gradient == x * mask * scale with the mask drawn from the same RNG state."""
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    grad = torch.randn(shape, dtype=dtype)
    drop = SeededDropout(p).train()
    state = torch.get_rng_state()
    out = drop(x)
    out.backward(grad)
    after = torch.get_rng_state()

    torch.set_rng_state(state)
    keep, scale = keep_mask(shape, p)
    assert torch.equal(torch.get_rng_state(), after)  # the reference consumed exactly what the module did
    want = x.detach() * keep.to(dtype) * scale
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad * keep.to(dtype) * scale, rtol=0, atol=0)
    assert abs(scale - 1 / (1 - p)) < 1e-4


def test_non_contiguous_input():
    base = torch.randn(6, 11, 5)
    x = base.transpose(0, 2)  # [5, 11, 6], not contiguous
    state = torch.get_rng_state()
    out = SeededDropout(0.2).train()(x)
    torch.set_rng_state(state)
    keep, scale = keep_mask(x.shape, 0.2)
    assert torch.equal(out, x * keep * scale)


def test_keep_rate_and_unbiased_like_torch_dropout():
    torch.manual_seed(0)
    p, n = 0.1, 2_000_000
    ones = torch.ones(n)
    ours = SeededDropout(p).train()(ones)
    theirs = nn.Dropout(p).train()(ones)
    sigma = (p * (1 - p) / n) ** 0.5
    for out in (ours, theirs):
        kept = float((out != 0).float().mean())
        assert abs(kept - (1 - p)) < 5 * sigma
        assert abs(float(out.double().mean()) - 1.0) < 5 * sigma / (1 - p)  # E[out] = x


def test_same_state_same_mask_and_calls_differ():
    x = torch.randn(4, 9, 31)
    drop = SeededDropout(0.3).train()
    torch.manual_seed(123)
    a, b = drop(x), drop(x)
    torch.manual_seed(123)
    assert torch.equal(drop(x), a)
    assert not torch.equal(a, b)  # each call draws its own seed


@pytest.mark.parametrize("p", [2.0**-18, 1 - 2.0**-18])
def test_p_beyond_16_bits_falls_back_to_torch(p):
    x = torch.randn(2, 3, 50)
    state = torch.get_rng_state()
    out = SeededDropout(p).train()(x)
    torch.set_rng_state(state)
    assert torch.equal(out, nn.functional.dropout(x, p, training=True))
    with pytest.raises(ValueError, match="outside"):
        keep_mask(x.shape, p)


def test_compiles_with_a_graph_break():
    drop = torch.compile(SeededDropout(0.3).train(), backend="eager")
    x = torch.randn(4, 5, 6)
    state = torch.get_rng_state()
    out = drop(x)
    torch.set_rng_state(state)
    keep, scale = keep_mask(x.shape, 0.3)
    assert torch.equal(out, x * keep * scale)


def test_identity_when_off():
    x = torch.randn(3, 5)
    assert SeededDropout(0.5).eval()(x) is x
    assert SeededDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        SeededDropout(1.0)


def test_add_adapter_swaps_every_lora_dropout(tiny_llava):
    from vlm2vec_rt.models.backbones import load_backbone
    from vlm2vec_rt.training.lora import add_adapter, target_modules

    bb = load_backbone(tiny_llava)
    targets = target_modules(bb)
    model = add_adapter(bb, r=4, dropout=0.15)
    slots = [slot[name] for slot, name in lora_dropout_slots(model)]
    assert len(slots) == len(targets)
    assert all(type(d) is SeededDropout and d.p == 0.15 for d in slots)
    assert use_seeded_dropout(model) == 0  # nothing left to swap
    no_dropout = add_adapter(load_backbone(tiny_llava), r=4, dropout=0.0)
    assert not any(isinstance(m, SeededDropout) for m in no_dropout.modules())
