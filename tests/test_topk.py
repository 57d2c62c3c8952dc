"""ops.topk_similarity and vr.search: the fused Triton kernel and the chunked torch path against torch.topk
over the full score matrix.

On CPU the kernel runs under the Triton interpreter (switched on for this module only; see
kernels/interpreter.py), with small tiles so that several tiles, splits and ragged edges are exercised.
"""

from __future__ import annotations

import contextlib
import os

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
    (37, 1000, 100, 10, torch.float32, 30),  # 34 chunks, ragged last one, element filter (30 % 16 != 0)
    (37, 1000, 100, 100, torch.float32, 333),  # large k: the filter keeps much, dense merges too
    (37, 5003, 64, 10, torch.float32, 1024),  # the run filter from the second chunk, ragged last chunk
    (29, 12000, 48, 100, torch.float32, None),  # default chunk: seed span, spans 4x wider, run filter
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


@pytest.fixture
def filter_paths(monkeypatch):
    """How often the torch path's running top-k took each of its three ways of taking in scores."""
    calls = {"dense": 0, "runs": 0, "merge": 0}

    def counting(name, method):
        def wrapper(*args, **kw):
            calls[name] += 1
            return method(*args, **kw)

        return wrapper

    running = ops._RunningTopK
    monkeypatch.setattr(running, "_merge_dense", counting("dense", running._merge_dense))
    monkeypatch.setattr(running, "_passes_by_runs", counting("runs", running._passes_by_runs))
    monkeypatch.setattr(running, "_merge", counting("merge", running._merge))
    return calls


@pytest.mark.parametrize("k", [1, 10, 100])
def test_torch_path_filters_most_chunks(filter_paths, k):
    """Random data: after the seed, chunks are filtered (by runs once the threshold is tight), not topk'd."""
    queries, corpus = data(40, 20_011, 32, seed=k)
    threads = torch.get_num_threads()
    scores, idx = ops.topk_similarity(queries, corpus, k, backend="torch", chunk_size=2048)
    assert_same_topk(scores, idx, queries, corpus, k, tol=1e-4, cast_queries=False)
    assert filter_paths["runs"] >= 5
    assert filter_paths["dense"] <= 3
    assert torch.get_num_threads() == threads  # the bookkeeping's single thread is given back


def test_torch_path_when_every_chunk_beats_the_last(filter_paths):
    # scores grow along the corpus: every chunk replaces the whole running list, the filter passes
    # everything and the chunks' own topk takes over
    gen = torch.Generator().manual_seed(4)
    queries = torch.rand(6, 8, generator=gen) + 0.1
    corpus = torch.rand(400, 8, generator=gen) * torch.linspace(1, 50, 400)[:, None]
    scores, idx = ops.topk_similarity(queries, corpus, 30, backend="torch", chunk_size=64)
    assert_same_topk(scores, idx, queries, corpus, 30, tol=1e-4, cast_queries=False)
    assert filter_paths["dense"] == 400 // 64 + 1
    corpus = torch.rand(20_000, 8, generator=gen) * torch.linspace(1, 50, 20_000)[:, None]
    scores, idx = ops.topk_similarity(queries, corpus, 10, backend="torch", chunk_size=1024)
    assert_same_topk(scores, idx, queries, corpus, 10, tol=1e-4, cast_queries=False)


def test_torch_path_with_every_score_tied():
    # a zero query ties every corpus row; a corpus of one repeated row ties them for every query
    queries, corpus = data(6, 3000, 16, seed=9)
    queries[2] = 0.0
    scores, idx = ops.topk_similarity(queries, corpus, 50, backend="torch", chunk_size=512)
    assert torch.equal(scores[2], torch.zeros(50))
    assert all(len(set(row)) == 50 for row in idx.tolist()) and ((idx >= 0) & (idx < 3000)).all()
    same = corpus[:1].expand(3000, 16)
    scores, idx = ops.topk_similarity(queries, same, 50, backend="torch", chunk_size=512)
    assert torch.allclose(scores, (queries @ corpus[0])[:, None].expand(6, 50), rtol=1e-6)
    assert all(len(set(row)) == 50 for row in idx.tolist()) and ((idx >= 0) & (idx < 3000)).all()


def test_torch_path_nan_and_inf_scores_as_torch_topk():
    # NaN scores pass the filter and rank first, as in torch.topk; from then on the k-th best is NaN and
    # the chunks' own topk decides. Rows of inf give inf - inf = NaN too.
    queries, corpus = data(4, 3000, 8, seed=10)
    corpus[1500] = float("nan")
    corpus[2500] = float("inf")
    scores, idx = ops.topk_similarity(queries, corpus, 5, backend="torch", chunk_size=512)
    ref_scores, ref_idx = torch.topk(queries @ corpus.t(), 5, dim=1)
    assert torch.equal(idx[:, :2].sort(dim=1).values, torch.tensor([[1500, 2500]] * 4))
    assert torch.isnan(scores[:, :2]).all()
    assert torch.allclose(scores, ref_scores, equal_nan=True)
    assert torch.equal(idx[:, 2:], ref_idx[:, 2:])
    # one NaN row, behind the point where the run filter is on
    queries, corpus = data(4, 20_000, 8, seed=11)
    corpus[17_000] = float("nan")
    scores, idx = ops.topk_similarity(queries, corpus, 3, backend="torch", chunk_size=2048)
    ref_scores, ref_idx = torch.topk(queries @ corpus.t(), 3, dim=1)
    assert torch.equal(idx, ref_idx) and torch.allclose(scores, ref_scores, equal_nan=True)


def test_inner_products_match_torch_mm(monkeypatch):
    """fp32 products through oneDNN (where torch has it) equal torch.mm within rounding, and turning oneDNN
    off (torch.backends.mkldnn) gives the torch.mm path."""
    queries, corpus = data(33, 517, 257, seed=12)
    ref = queries.double() @ corpus.double().t()
    assert ops._onednn_usable() == torch.backends.mkldnn.is_available()
    got = ops._inner_products(queries, corpus)
    assert got.shape == (33, 517) and got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, atol=1e-4, rtol=0)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert torch.equal(ops._inner_products(queries, corpus), torch.mm(queries, corpus.t()))


def test_auto_backend_on_cpu_is_torch():
    queries, corpus = data(4, 60, 8, seed=5)
    got = ops.topk_similarity(queries.requires_grad_(), corpus, 3)  # embeddings straight from a model
    ref = ops.topk_similarity_torch(queries, corpus, 3)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


class _CudaLike:
    """What ops' dispatch looks at of a CUDA tensor, on a machine without one."""

    is_cuda = True

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


@pytest.mark.parametrize("dtypes,expected", [
    ((torch.float32, torch.float32), "triton"),
    ((torch.float32, torch.float16), "triton"),
    ((torch.float32, torch.float64), "torch"),  # a float64 corpus: the kernel takes none
    ((torch.float64, torch.float32), "torch"),  # float64 queries: the kernel would round them to the corpus'
])  # fmt: skip
def test_auto_backend_on_cuda_follows_the_dtypes(monkeypatch, dtypes, expected):
    monkeypatch.setattr(ops, "_triton_available", lambda: True)
    assert ops._pick_backend("auto", _CudaLike(dtypes[1]), dtypes) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_backend_takes_float64_on_cuda():
    queries, corpus = data(9, 130, 24, seed=3, dtype=torch.float64)
    scores, idx = ops.topk_similarity(queries.double(), corpus, 5)
    assert_same_topk(scores, idx, queries.double(), corpus, 5, tol=1e-6, cast_queries=False)


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


def test_search_takes_reversed_and_big_endian_arrays(rng):
    corpus = rng.standard_normal((50, 6)).astype(np.float32)
    queries = rng.standard_normal((4, 6)).astype(np.float32)
    want = vr.search(queries[::-1], corpus, 3)
    got = vr.search(np.ascontiguousarray(queries[::-1]).astype(">f4"), corpus[:, ::-1][:, ::-1], 3)
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])


def test_one_rising_query_keeps_the_merges_small(monkeypatch):
    # query 0's scores rise along the corpus: all its scores pass the filter (1/64 of all: not a dense
    # merge); before the per-query bound its pending passes grew to 8 k Q (3072 columns wide here)
    gen = torch.Generator().manual_seed(21)
    n, k, chunk = 40_000, 5, 1024
    queries, corpus = torch.randn(64, 9, generator=gen), torch.randn(n, 9, generator=gen)
    queries[:, 8] = 0
    queries[0] = 0
    queries[0, 8] = 1
    corpus[:, 8] = torch.linspace(0, 50, n)
    widths = []
    merge = ops._RunningTopK._merge
    monkeypatch.setattr(
        ops._RunningTopK, "_merge", lambda self, s, i: (widths.append(s.shape[1]), merge(self, s, i))
    )
    threads = torch.get_num_threads()
    scores, idx = ops.topk_similarity_torch(queries, corpus, k, chunk_size=chunk)
    assert_same_topk(scores, idx, queries, corpus, k, tol=1e-4)
    assert max(widths) <= ops._PENDING_PER_K * k + chunk
    assert torch.get_num_threads() == threads  # no process-wide thread setting changed under other threads


def test_chunks_narrower_than_k_are_widened(monkeypatch):
    # a merge per chunk of one row with k near N cost N * k (6.7 s at N = 20k, k = 19k)
    queries, corpus = data(4, 2000, 8, seed=23)
    merges = []
    merge = ops._RunningTopK._merge
    monkeypatch.setattr(ops._RunningTopK, "_merge", lambda self, s, i: (merges.append(1), merge(self, s, i)))
    scores, idx = ops.topk_similarity(queries, corpus, 1900, chunk_size=1, backend="torch")
    assert_same_topk(scores, idx, queries, corpus, 1900, tol=1e-4)
    assert len(merges) <= 4


def test_torch_path_checks_its_inputs():
    with pytest.raises(InputError, match="exceeds the corpus size"):
        ops.topk_similarity_torch(torch.randn(3, 8), torch.randn(10, 8), 11)
    scores, idx = ops.topk_similarity_torch(torch.randn(0, 8), torch.randn(10, 8), 4)
    assert scores.shape == (0, 4) and idx.dtype == torch.int64


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


# Run in a fresh process: this module's own tests hold interpreter_mode() open, and a process that imported
# triton in compiled mode (the normal state) is what must come back intact.
_INTERPRETER_MODE_RESTORES = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction
import vlm2vec_rt.kernels
import vlm2vec_rt.kernels.infonce as infonce
from vlm2vec_rt import ops
from vlm2vec_rt.kernels.interpreter import interpreter_mode

tl_before, standard_before = dict(vars(tl)), dict(vars(tl.standard))
infonce_before = dict(vars(infonce))
assert type(tl.max) is JITFunction and type(infonce.KERNELS[0]) is JITFunction
with interpreter_mode():
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert isinstance(tl.max, InterpretedFunction) and isinstance(infonce.KERNELS[0], InterpretedFunction)
    scores, idx = ops.topk_similarity(torch.randn(3, 8), torch.randn(40, 8), 2, backend="triton")
    assert "vlm2vec_rt.kernels.topk" in sys.modules
assert "TRITON_INTERPRET" not in os.environ
assert vars(tl).keys() == tl_before.keys() and all(getattr(tl, n) is v for n, v in tl_before.items())
assert vars(tl.standard).keys() == standard_before.keys()
assert all(vars(tl.standard)[n] is v for n, v in standard_before.items())
assert vars(infonce).keys() == infonce_before.keys()
assert all(vars(infonce)[n] is v for n, v in infonce_before.items())
# first imported inside the block: forgotten, and imported afresh in compiled mode
assert "vlm2vec_rt.kernels.topk" not in sys.modules and not hasattr(vlm2vec_rt.kernels, "topk")
import vlm2vec_rt.kernels.topk as topk
assert type(topk.KERNELS[0]) is JITFunction
print("restored")
"""


def test_interpreter_mode_restores_triton_and_the_kernels():
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_MODE_RESTORES],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("restored")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InputError, match="TRITON_INTERPRET=1"):
        ops.topk_similarity(torch.randn(3, 8), torch.randn(10, 8), 2, backend="triton")
