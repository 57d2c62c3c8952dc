"""LoRA dropout whose CPU masks cost a sixth of torch's: the adapters' dropout modules are swapped for it.

On CPU, torch draws a dropout mask element by element from its Mersenne Twister (bernoulli_: ~4.7 ns an
element on the 2-core CI machine): with LoRA on every linear layer of a small decoder that is as much time
as all the forward's matmuls, and GradCache pays it twice. `SeededDropout` draws one 62-bit seed from
torch's CPU generator per call and expands it into 16 random bits an element with numpy's SFC64 generator
(~0.3 ns an element). The mask is a function of torch's RNG state alone, so everything built on that state
holds unchanged: GradCache's replay of each chunk's masks, checkpoints, `torch.manual_seed`.

The drop probability is p rounded to a multiple of 1/65536 (0.1 -> 0.100006), and kept values are scaled by
1 / (1 - that), so the output's expectation is the input. On other devices torch's own dropout runs (fused
and cheap there). A call has a fixed cost of ~45 us (the seed, the generator): below ~16k elements torch's
dropout is as fast, far below what a LoRA input (chunk x tokens x hidden) holds.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

_LEVELS = 1 << 16  # a mask element is 16 random bits compared against round(p * 65536)


class _ApplyMask(torch.autograd.Function):
    """x * keep * scale, saving the boolean mask (1 byte an element, as torch's dropout does)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep.to(x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return (grad * keep.to(grad.dtype)).mul_(ctx.scale), None, None


def _threshold(p: float) -> int:
    return round(p * _LEVELS)


@torch.compiler.disable  # numpy inside: dynamo would trace it into uint16 tensor ops torch lacks on CPU
def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, float]:
    """A boolean keep-mask of `shape` (each element kept with probability 1 - p, p rounded to 1/65536) drawn
    from one seed taken from torch's CPU generator, and the scale 1 / (1 - rounded p) for kept values."""
    threshold = _threshold(p)
    if not 0 < threshold < _LEVELS:
        raise ValueError(f"p={p} rounds to {threshold}/{_LEVELS}: outside (0, 1)")
    seed = int(torch.randint(0, 1 << 62, (1,), device="cpu"))
    n = int(np.prod(shape, dtype=np.int64))
    # little-endian 16-bit words: the same masks on every machine
    bits = np.random.SFC64(seed).random_raw((n + 3) // 4).view("<u2")[:n]
    keep = torch.from_numpy(bits >= threshold).view(shape)
    return keep, _LEVELS / (_LEVELS - threshold)


class SeededDropout(nn.Module):
    """Dropout with probability p; on CPU the mask comes from `keep_mask` (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or not 0 < _threshold(self.p) < _LEVELS:
            # torch's own: fused on GPUs; and p within 2^-17 of 0 or 1, which 16 bits cannot express
            return nn.functional.dropout(x, self.p, training=True)
        keep, scale = keep_mask(x.shape, self.p)
        return _ApplyMask.apply(x, keep, scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def lora_dropout_slots(model: nn.Module) -> list[tuple[nn.ModuleDict, str]]:
    """Every (peft `lora_dropout` ModuleDict, adapter name) in the model: where LoRA dropout modules sit."""
    return [
        (module.lora_dropout, name)
        for module in model.modules()
        if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict)
        for name in module.lora_dropout
    ]


def use_seeded_dropout(model: nn.Module) -> int:
    """Replace every nn.Dropout with p > 0 inside peft's LoRA dropout slots by a SeededDropout of the same p;
    returns how many were replaced."""
    count = 0
    for slots, name in lora_dropout_slots(model):
        drop = slots[name]
        if type(drop) is nn.Dropout and drop.p > 0:
            replacement = SeededDropout(drop.p)
            replacement.train(drop.training)
            slots[name] = replacement
            count += 1
    return count
