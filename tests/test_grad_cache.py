"""GradCache exactness: grad_cache_step leaves the gradients of loss.backward() on the whole batch.

Two references. Without dropout, the reference is one forward of every input at once (different chunk
shapes and padding widths, the same function). With dropout on, a single forward draws other masks than
chunked forwards, so the reference runs the same chunks from the same RNG state but keeps every graph alive
and calls loss.backward() once on the full batch: what GradCache must reproduce without storing those graphs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlm2vec_rt import InputError, Item, ops
from vlm2vec_rt.sample_images import digits
from vlm2vec_rt.training import grad_cache_step

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASSIFY = "Represent the given image for classification."


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all gradients together."""
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in a)
    assert den > 0
    return (num / den) ** 0.5


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert all(g is not None for g in out.values())
    return out


def chunked_full_graph_grads(module, encode, q, t, n, chunk, temperature=0.02) -> float:
    """The reference: the same chunks as GradCache, every graph kept, one loss.backward()."""

    def run(seq):
        return [encode(seq[i : i + chunk]) for i in range(0, len(seq), chunk)]

    reps = [torch.cat(run(side)) if side else None for side in (q, t, n)]
    targets = torch.cat([reps[1]] + ([reps[2]] if reps[2] is not None else []))
    loss = ops.info_nce(reps[0], targets, temperature=temperature, backend="torch")
    loss.backward()
    return float(loss)


# ---- a small MLP encoder with dropout: many sizes, cheaply -------------------------------------------------
class TinyEncoder(nn.Module):
    def __init__(self, d_in=12, d=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 32), nn.Dropout(0.3), nn.GELU(), nn.Linear(32, d))

    def forward(self, rows):
        return self.net(torch.stack(list(rows)))


@pytest.mark.parametrize("b,m", [(7, 0), (7, 5), (1, 2), (10, 3)])
@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_mlp_with_dropout_matches_full_graph(b, m, chunk):
    torch.manual_seed(b * 100 + m)
    enc = TinyEncoder()
    q, t, n = torch.randn(b, 12), torch.randn(b, 12), torch.randn(m, 12)
    q_, t_, n_ = list(q), list(t), list(n)

    torch.manual_seed(7)
    loss = grad_cache_step(enc, q_, t_, negatives=n_ or None, chunk_size=chunk, temperature=0.05)
    got = grads(enc)
    after_gc = torch.get_rng_state()
    enc.zero_grad()
    torch.manual_seed(7)
    want_loss = chunked_full_graph_grads(enc, enc, q_, t_, n_, chunk, temperature=0.05)
    want = grads(enc)
    assert relative_difference(got, want) < 1e-5
    assert abs(loss - want_loss) < 1e-5 * max(1.0, abs(want_loss))
    # the RNG ends where one plain forward of every chunk leaves it
    assert torch.equal(after_gc, torch.get_rng_state())


def test_dropout_replay_is_what_makes_it_exact():
    """Sanity of the test above: with other dropout masks in the re-forward the gradients would differ."""
    torch.manual_seed(0)
    enc = TinyEncoder()
    q, t = list(torch.randn(8, 12)), list(torch.randn(8, 12))
    torch.manual_seed(7)
    grad_cache_step(enc, q, t, chunk_size=3)
    got = grads(enc)
    enc.zero_grad()
    torch.manual_seed(8)
    chunked_full_graph_grads(enc, enc, q, t, [], 3)
    assert relative_difference(got, grads(enc)) > 1e-2


def test_gradients_accumulate_like_backward():
    torch.manual_seed(0)
    enc = TinyEncoder().eval()
    q, t = list(torch.randn(5, 12)), list(torch.randn(5, 12))
    grad_cache_step(enc, q, t, chunk_size=2)
    once = grads(enc)
    grad_cache_step(enc, q, t, chunk_size=2)
    twice = grads(enc)
    assert relative_difference(twice, {k: 2 * v for k, v in once.items()}) < 1e-6


def test_bad_arguments():
    enc = TinyEncoder()
    x = list(torch.randn(3, 12))
    with pytest.raises(InputError, match="chunk_size"):
        grad_cache_step(enc, x, x, chunk_size=0)
    with pytest.raises(InputError, match="pair up"):
        grad_cache_step(enc, x, x[:2], chunk_size=2)
    with pytest.raises(InputError, match="empty"):
        grad_cache_step(enc, [], [], chunk_size=2)


# ---- the tiny VLM backbones with a LoRA adapter ------------------------------------------------------------
def _backbone_with_lora(path, dropout):
    from vlm2vec_rt.models.backbones import load_backbone
    from vlm2vec_rt.training.lora import add_adapter

    bb = load_backbone(path)
    torch.manual_seed(0)
    add_adapter(bb, r=4, dropout=dropout, init_b_std=0.05)  # the adapter acts: every gradient is non-zero
    return bb


def _inputs(photos):
    images, labels = digits()
    queries = [Item(image=images[i], instruction=CLASSIFY) for i in range(6)]
    queries[2] = Item(image=photos["coffee"][::8, ::8], text="What is in the cup?", instruction=CLASSIFY)
    targets = [Item(text=WORDS[int(labels[i])]) for i in range(6)]
    targets[4] = Item(image=photos["chelsea"][::10, ::10], instruction="Represent the given image.")
    negatives = [Item(text="a photo of a dog"), Item(image=images[100]), Item(text="seven and a half")]
    return queries, targets, negatives


def _encoder(bb):
    return lambda items: bb.forward(bb.to_device(bb.pre.collate(bb.pre.prepare_many(items))))


@pytest.fixture(scope="module")
def lora_backbones(tiny_llava, tiny_qwen):
    return {
        "llava_next": _backbone_with_lora(tiny_llava, 0.2),
        "qwen2_vl": _backbone_with_lora(tiny_qwen, 0.2),
    }


@pytest.mark.parametrize("backbone", ["llava_next", "qwen2_vl"])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_backbone_lora_dropout_matches_full_batch_backward(lora_backbones, photos, backbone, with_negatives):
    """LoRA dropout on: grad_cache_step with chunks 1, 3, 4 == the full-batch loss.backward() (rel < 1e-5)."""
    bb = lora_backbones[backbone]
    encode = _encoder(bb)
    q, t, n = _inputs(photos)
    n = n if with_negatives else []
    bb.model.train()
    for chunk in (1, 3, 4):
        bb.model.zero_grad()
        torch.manual_seed(11)
        loss = grad_cache_step(encode, q, t, negatives=n or None, chunk_size=chunk)
        got = grads(bb.model)
        bb.model.zero_grad()
        torch.manual_seed(11)
        want_loss = chunked_full_graph_grads(bb.model, encode, q, t, n, chunk)
        want = grads(bb.model)
        assert relative_difference(got, want) < 1e-5, chunk
        assert abs(loss - want_loss) < 1e-5 * abs(want_loss)


@pytest.mark.parametrize("backbone", ["llava_next", "qwen2_vl"])
def test_backbone_without_dropout_matches_one_forward(lora_backbones, photos, backbone):
    """Dropout off: GradCache equals one un-chunked forward of the whole batch (other padding, same function)."""
    bb = lora_backbones[backbone]
    encode = _encoder(bb)
    q, t, n = _inputs(photos)
    bb.model.eval()
    try:
        bb.model.zero_grad()
        q_reps, t_reps, n_reps = encode(q), encode(t), encode(n)
        ops.info_nce(q_reps, torch.cat([t_reps, n_reps]), temperature=0.02, backend="torch").backward()
        want = grads(bb.model)
        bb.model.zero_grad()
        grad_cache_step(encode, q, t, negatives=n, chunk_size=3)
        assert relative_difference(grads(bb.model), want) < 1e-5
    finally:
        bb.model.train()
