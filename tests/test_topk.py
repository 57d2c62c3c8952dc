"""ops.topk_similarity and vr.search: the fused Triton kernel and the chunked torch path against torch.topk
over the full score matrix.

On CPU the kernel runs under the Triton interpreter (switched on for this module only; see
kernels/interpreter.py), with small tiles so that several tiles, splits and ragged edges are exercised.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import vlm2vec_rt as vr
from vlm2vec_rt import ops
from vlm2vec_rt.errors import InputError

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    from vlm2vec_rt.kernels.interpreter import interpreter_mode

    with contextlib.nullcontext() if DEVICE == "cuda" else interpreter_mode():
        yield


def assert_same_topk(scores, idx, queries, corpus, k, *, tol, cast_queries=True):
    """torch.topk over the full matrix (fp64, from the values multiplied: the kernel casts the queries to the
    corpus dtype, the torch path does not) gives the same scores, and the same index at every rank whose
    score is not tied with a neighbour (within tol)."""
    queries = queries.to(corpus.dtype) if cast_queries else queries
    ref_full = queries.double() @ corpus.double().t()
    ref_scores, ref_idx = torch.topk(ref_full, k, dim=1)
    assert scores.shape == idx.shape == (queries.shape[0], k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.allclose(scores.double(), ref_scores, atol=tol, rtol=0)
    # the indices returned carry the scores returned, once each
    assert torch.allclose(ref_full.gather(1, idx), scores.double(), atol=tol, rtol=0)
    assert all(len(set(row)) == k for row in idx.tolist())
    # untied ranks: the gap to the previous and the next value (the (k+1)-th for the last rank) exceeds tol
    padded = torch.topk(ref_full, min(k + 1, ref_full.shape[1]), dim=1).values
    if padded.shape[1] == k:
        padded = torch.cat([padded, torch.full_like(padded[:, :1], -torch.inf)], dim=1)
    gap_next = padded[:, :k] - padded[:, 1 : k + 1]
    gap_prev = torch.cat([torch.full_like(gap_next[:, :1], torch.inf), gap_next[:, :-1]], dim=1)
    untied = (gap_next > tol) & (gap_prev > tol)
    assert untied.float().mean() > 0.5  # the data really tests something
    assert torch.equal(idx.cpu()[untied.cpu()], ref_idx.cpu()[untied.cpu()])


def data(q, n, d, *, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(q, d, generator=gen).to(DEVICE)
    corpus = torch.randn(n, d, generator=gen).to(DEVICE, dtype)
    return queries, corpus


# Q, N, D, k, corpus dtype, kernel tiles (block_q, block_n, block_d, splits); N is never a tile multiple
KERNEL_CASES = [
    (37, 1000, 100, 10, torch.float32, (16, 32, 32, None)),
    (5, 77, 3, 1, torch.float32, (16, 16, 16, 3)),
    (3, 50, 20, 50, torch.float32, (16, 64, 16, 1)),
    (20, 300, 257, 100, torch.float32, (16, 128, 64, 2)),
    (18, 200, 64, 10, torch.float16, (16, 32, 32, None)),
    (70, 300, 100, 16, torch.float32, (None, None, None, None)),  # the default GPU tiles
    (3, 1500, 8, 1024, torch.float32, (None, None, None, None)),  # the largest k
]


@pytest.mark.parametrize("q,n,d,k,dtype,tiles", KERNEL_CASES)
def test_kernel_matches_full_topk(q, n, d, k, dtype, tiles):
    from vlm2vec_rt.kernels import topk as topk_kernel

    queries, corpus = data(q, n, d, seed=q * 7 + n, dtype=dtype)
    block_q, block_n, block_d, splits = tiles
    scores, idx = topk_kernel.topk_similarity(
        queries, corpus, k, block_q=block_q, block_n=block_n, block_d=block_d, splits=splits
    )
    assert_same_topk(scores, idx, queries, corpus, k, tol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize(
    "q,n,d,k,dtype", [(37, 1000, 100, 10, torch.float32), (20, 700, 33, 30, torch.float16)]
)
def test_two_pass_kernel_matches_full_topk(q, n, d, k, dtype):
    """Sample bound, then collect above it: exact as long as no buffer overflows."""
    from vlm2vec_rt.kernels import topk as topk_kernel

    queries, corpus = data(q, n, d, seed=q + n, dtype=dtype)
    scores, idx = topk_kernel.topk_similarity(
        queries, corpus, k, sample_stride=4, block_q=16, block_n=32, block_d=32
    )
    assert_same_topk(scores, idx, queries, corpus, k, tol=1e-4 if dtype == torch.float32 else 1e-2)


def test_two_pass_kernel_redoes_overflowing_queries():
    """800 copies of one vector tie for every query's top k: the buffers overflow and the exact kernel
    takes over for those queries."""
    from vlm2vec_rt.kernels import topk as topk_kernel

    gen = torch.Generator().manual_seed(8)
    queries = torch.rand(5, 16, generator=gen).to(DEVICE)
    best = torch.full((1, 16), 3.0)
    corpus = torch.cat([torch.rand(200, 16, generator=gen), best.expand(800, 16)]).to(DEVICE)
    scores, idx = topk_kernel.topk_similarity(queries, corpus, 5, sample_stride=4, block_q=16, block_n=64)
    expected = (queries @ best.to(DEVICE).t()).expand(5, 5)
    assert torch.allclose(scores, expected, rtol=1e-6)
    assert ((idx >= 200) & (idx < 1000)).all() and all(len(set(r)) == 5 for r in idx.tolist())


def test_kernel_through_ops_and_empty_queries():
    queries, corpus = data(9, 130, 24, seed=1)
    scores, idx = ops.topk_similarity(queries, corpus, 5, backend="triton")
    assert_same_topk(scores, idx, queries, corpus, 5, tol=1e-4)
    scores, idx = ops.topk_similarity(queries[:0], corpus, 5, backend="triton")
    assert scores.shape == idx.shape == (0, 5) and idx.dtype == torch.int64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 is checked on a GPU only")
def test_kernel_bf16_on_gpu():
    queries, corpus = data(100, 5000, 257, seed=2, dtype=torch.bfloat16)
    scores, idx = ops.topk_similarity(queries, corpus, 100, backend="triton")
    assert_same_topk(scores, idx, queries, corpus, 100, tol=5e-2)


# Q, N, D, k, corpus dtype, chunk_size
TORCH_CASES = [
    (37, 1000, 100, 10, torch.float32, 30),  # 34 chunks (merged 16 at a time), ragged last one
    (37, 1000, 100, 100, torch.float32, 333),  # large k, chunks narrower than 64 k (the selection path)
    (5, 77, 3, 1, torch.float32, None),
    (3, 50, 20, 50, torch.float32, 7),  # k = N, chunks smaller than k
    (20, 500, 64, 10, torch.float16, 128),
    (20, 500, 64, 10, torch.bfloat16, 128),
    (20, 500, 64, 10, torch.float64, 128),
]


@pytest.mark.parametrize("q,n,d,k,dtype,chunk_size", TORCH_CASES)
def test_torch_path_matches_full_topk(q, n, d, k, dtype, chunk_size):
    queries, corpus = data(q, n, d, seed=n + k, dtype=dtype)
    scores, idx = ops.topk_similarity(queries, corpus, k, backend="torch", chunk_size=chunk_size)
    # scores come back in fp32 whatever the inputs
    assert_same_topk(scores, idx, queries, corpus, k, tol=1e-4, cast_queries=False)


def test_torch_path_when_every_chunk_beats_the_last():
    # scores grow along the corpus: every chunk replaces the whole running list
    gen = torch.Generator().manual_seed(4)
    queries = torch.rand(6, 8, generator=gen) + 0.1
    corpus = torch.rand(400, 8, generator=gen) * torch.linspace(1, 50, 400)[:, None]
    scores, idx = ops.topk_similarity(queries, corpus, 30, backend="torch", chunk_size=64)
    assert_same_topk(scores, idx, queries, corpus, 30, tol=1e-4, cast_queries=False)


def test_auto_backend_on_cpu_is_torch():
    queries, corpus = data(4, 60, 8, seed=5)
    got = ops.topk_similarity(queries.requires_grad_(), corpus, 3)  # embeddings straight from a model
    ref = ops.topk_similarity_torch(queries, corpus, 3)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_search_numpy_in_numpy_out(rng):
    corpus = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    corpus.flags.writeable = False  # as np.load(mmap_mode="r") gives: no warning, no copy needed
    scores, idx = vr.search(queries, corpus, 4)
    assert isinstance(scores, np.ndarray) and isinstance(idx, np.ndarray)
    assert scores.dtype == np.float32 and idx.dtype == np.int64 and scores.shape == (7, 4)
    full = queries @ corpus.T
    assert np.array_equal(idx, np.argsort(-full, axis=1)[:, :4])
    assert np.allclose(scores, np.take_along_axis(full, idx, axis=1), atol=1e-5)

    one_scores, one_idx = vr.search(queries[0], corpus, 4)  # one 1-D query: 1-D results
    assert one_scores.shape == (4,) and np.array_equal(one_idx, idx[0])
    list_scores, list_idx = vr.search(queries.tolist(), corpus.tolist(), 4)  # float64 lists
    assert np.array_equal(list_idx, idx)


def test_search_tensors_in_tensors_out():
    queries, corpus = data(5, 40, 8, seed=6)
    scores, idx = vr.search(queries, corpus, 2)
    assert isinstance(scores, torch.Tensor) and scores.device == corpus.device


@pytest.mark.parametrize(
    "queries,corpus,k,kw,match",
    [
        (torch.randn(3, 8), torch.randn(10, 8), 11, {}, "exceeds the corpus size"),
        (torch.randn(3, 8), torch.randn(10, 8), 0, {}, "k must be >= 1"),
        (torch.randn(3, 8), torch.randn(10, 8), 2.0, {}, "integer"),
        (torch.randn(3, 8), torch.randn(10, 7), 2, {}, "dim 8 but the corpus has dim 7"),
        (torch.randn(3, 8, 1), torch.randn(10, 8), 2, {}, "2-D"),
        (torch.randn(3, 8), torch.randn(10), 2, {}, "2-D"),
        (torch.randn(3, 8), torch.ones(10, 8, dtype=torch.int32), 2, {}, "floating"),
        (torch.randn(3, 8), torch.randn(10, 8, device="meta"), 2, {}, "are on cpu"),
        (torch.randn(3, 0), torch.randn(10, 0), 2, {}, "dimension 0"),
        (torch.randn(3, 8), torch.randn(10, 8), 2, {"backend": "faiss"}, "backend"),
        (torch.randn(3, 8), torch.randn(10, 8), 2, {"chunk_size": -4}, "chunk_size"),
        (np.zeros((3, 8)), torch.randn(10, 8), 2, {}, "torch.Tensor"),
        (torch.randn(3, 8), torch.randn(10, 8, dtype=torch.float64), 2, {"backend": "triton"}, "float32"),
    ],
)
def test_bad_input_is_a_clear_error(queries, corpus, k, kw, match):
    with pytest.raises(InputError, match=match):
        ops.topk_similarity(queries, corpus, k, **kw)


def test_search_bad_input():
    with pytest.raises(InputError, match="numbers"):
        vr.search([["a", "b"]], np.zeros((4, 2)), 1)
    with pytest.raises(InputError, match="exceeds"):
        vr.search(np.zeros((1, 2)), np.zeros((4, 2)), 5)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        ops.topk_similarity(torch.randn(3, 8), torch.randn(10, 8), 2, backend="triton")
