"""The two hot ops of training and retrieval, one signature each: Triton kernels on CUDA, torch on CPU.

    info_nce(q, t, *, temperature, backend)         contrastive loss over cosine similarity
    topk_similarity(queries, corpus, k, *, backend)  k largest inner products per query
    search(queries, corpus, k)                       the same for numpy arrays or tensors (vr.search)

backend="auto" picks the Triton kernel (kernels/, installed as vlm2vec_rt.kernels) when the inputs are on a
CUDA device and the torch path otherwise; "triton" forces the kernel (on CPU only under the Triton
interpreter, TRITON_INTERPRET=1: slow, for tests); "torch" forces the reference path. The torch paths here
are the references the kernels are tested against, and they are also the CPU implementations.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from .errors import InputError

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- InfoNCE -------------------------------------------------------------------------------------------
def info_nce(
    q: torch.Tensor,
    t: torch.Tensor,
    *,
    temperature: float = 0.02,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss (cross-entropy over cosine similarities / temperature), an fp32 scalar.

    q [B, D] are queries; t [B + M, D] targets: row i of t is the positive of query i, the M extra rows are
    hard negatives shared by every query. Rows need not be normalised. Differentiable in q and t (gradients
    in the input dtype). chunk_size: query rows per step of the Triton path (default: the cosine block
    stays under max(D * (B + M), 4M) values); the torch path is eager and ignores it.
    """
    _check_info_nce_inputs(q, t, temperature)
    _check_chunk_size(chunk_size)
    if _pick_backend(backend, q) == "torch":
        return info_nce_torch(q, t, temperature=temperature)
    if q.dtype not in KERNEL_DTYPES:
        raise InputError(f"backend='triton' takes float32, float16 or bfloat16 q and t, not {q.dtype}")
    return _kernel_module("infonce", q).info_nce(q, t, float(temperature), chunk_rows=chunk_size)


def info_nce_torch(q: torch.Tensor, t: torch.Tensor, *, temperature: float = 0.02) -> torch.Tensor:
    """The reference InfoNCE in eager torch: fp32 (fp64 for fp64 inputs), log-sum-exp, one B x (B+M) block.

    The positive logit is taken as a row dot product rather than the diagonal of the logits, so its
    backward needs no B x (B+M) scatter; peak memory is the logits and their gradient.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    qn = torch.nn.functional.normalize(q.to(dtype), dim=1)
    tn = torch.nn.functional.normalize(t.to(dtype), dim=1)
    logits = (qn @ tn.t()) / temperature
    positives = (qn * tn[: q.shape[0]]).sum(dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - positives).mean()


def _check_info_nce_inputs(q: Any, t: Any, temperature: Any) -> None:
    _check_matrix("info_nce", "q", q)
    _check_matrix("info_nce", "t", t)
    if q.device != t.device:
        raise InputError(f"info_nce: q is on {q.device} but t is on {t.device}")
    if q.dtype != t.dtype:
        raise InputError(f"info_nce: q is {q.dtype} but t is {t.dtype}; give both the same dtype")
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise InputError(f"info_nce: q must have at least one row and one column, got {tuple(q.shape)}")
    if t.shape[1] != q.shape[1]:
        raise InputError(f"info_nce: q has dim {q.shape[1]} but t has dim {t.shape[1]}")
    if t.shape[0] < q.shape[0]:
        raise InputError(
            f"info_nce: t has {t.shape[0]} rows but needs at least one positive per query ({q.shape[0]})"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise InputError(f"info_nce: temperature must be a number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise InputError(f"info_nce: temperature must be finite and > 0, got {temperature}")


# ---- top-k similarity ----------------------------------------------------------------------------------
def topk_similarity(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest inner products of each query with the corpus, sorted descending.

    queries [Q, D], corpus [N, D] on one device (fp32, fp16 or bf16; the torch path also takes fp64).
    Returns (scores [Q, k] float32, indices [Q, k] int64) on that device; Q may be 0. The Q x N score
    matrix is never held: the torch path walks the corpus in chunks of chunk_size rows (default about
    48 MB of scores), the Triton kernel in tiles. Tied scores may come in either order.
    """
    _check_topk_inputs(queries, corpus, k)
    _check_chunk_size(chunk_size)
    backend = _pick_backend(backend, corpus)
    queries, corpus = queries.detach(), corpus.detach()  # a selection: nothing to differentiate
    if queries.shape[0] == 0:
        empty = queries.new_empty((0, k), dtype=torch.float32)
        return empty, empty.to(torch.int64)
    if backend == "torch":
        return topk_similarity_torch(queries, corpus, k, chunk_size=chunk_size)
    if corpus.dtype not in KERNEL_DTYPES:
        raise InputError(f"backend='triton' takes a float32, float16 or bfloat16 corpus, not {corpus.dtype}")
    return _kernel_module("topk", corpus).topk_similarity(queries, corpus, k)


def topk_similarity_torch(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, *, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked matmul + running top-k merge (FAISS's brute-force plan): memory O(Q * chunk), not O(Q * N).

    Scores are computed in fp32 (fp64 if either input is fp64), a chunk of the corpus at a time (converted
    chunk by chunk, so a half-precision or float64 corpus is never copied whole). Each chunk's top k merges
    into the running top k (16 chunks at a time); chunks are at least 64 k wide, where torch.topk keeps a
    k-heap (about one comparison per score) instead of selecting over a copy of the row.
    """
    n_queries = queries.shape[0]
    n = corpus.shape[0]
    dtype = torch.float64 if torch.float64 in (queries.dtype, corpus.dtype) else torch.float32
    q = queries.detach().to(dtype)
    corpus = corpus.detach()
    chunk = chunk_size or default_topk_chunk(n_queries, n, k)
    width = min(chunk, n)
    scores_buf = torch.empty(n_queries, width, dtype=dtype, device=corpus.device)  # reused: no page faults
    pending_scores, pending_idx = [], []  # per-chunk top k, merged in batches: fewer small ops
    for start in range(0, n, chunk):
        block = corpus[start : start + chunk].to(dtype)
        scores = torch.mm(q, block.t(), out=scores_buf if block.shape[0] == width else None)
        top_scores, top_idx = torch.topk(scores, min(k, block.shape[0]), dim=1, sorted=False)
        pending_scores.append(top_scores)
        pending_idx.append(top_idx.add_(start))
        if len(pending_scores) == _MERGE_EVERY:
            pending_scores, pending_idx = _merge_topk(pending_scores, pending_idx, k)
    best_scores, best_idx = _merge_topk(pending_scores, pending_idx, k)
    best_scores, order = torch.sort(best_scores[0], dim=1, descending=True)
    return best_scores.to(torch.float32), best_idx[0].gather(1, order)


# Each torch op costs a thread-pool round trip, which on a busy machine is milliseconds whatever its size:
# the chunks' small top-k lists are merged 16 at a time rather than one by one.
_MERGE_EVERY = 16


def _merge_topk(scores: list[torch.Tensor], idx: list[torch.Tensor], k: int):
    """The top k of several candidate lists, as one-element lists (for the next round)."""
    if len(scores) == 1:
        return scores, idx
    all_scores = torch.cat(scores, dim=1)
    best, pos = torch.topk(all_scores, min(k, all_scores.shape[1]), dim=1, sorted=False)
    return [best], [torch.cat(idx, dim=1).gather(1, pos)]


def default_topk_chunk(n_queries: int, n: int, k: int) -> int:
    """Corpus rows per chunk: about 48 MB of fp32 scores, at least 64 k (torch.topk's heap path) and 4096,
    at most 65536 rows.

    Few, large chunks: every chunk costs a handful of thread-pool synchronisations, which on a busy machine
    cost far more than the slightly lower matmul rate of a wide product.
    """
    rows = (48 << 20) // (4 * max(n_queries, 1))
    return max(1, min(n, 65536, max(rows, 64 * k, 4096)))


def search(
    queries: Any,
    corpus: Any,
    k: int,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Any, Any]:
    """Exact top-k inner-product search of queries against a corpus (FAISS IndexFlatIP semantics).

    queries [Q, D] or one query [D]; corpus [N, D]: numpy arrays, torch tensors, or nested lists. Returns
    (scores, indices), sorted best first: float32 and int64 arrays of shape [Q, k] ([k] for one 1-D query).
    They are numpy arrays when queries is not a torch tensor, else tensors on the corpus' device. With
    L2-normalised embeddings (Embedder.encode) the scores are cosine similarities. For ties see
    topk_similarity.
    """
    as_numpy = not isinstance(queries, torch.Tensor)
    corpus_t = _as_tensor(corpus, "corpus")
    queries_t = _as_tensor(queries, "queries").to(corpus_t.device)
    single = queries_t.dim() == 1
    if single:
        queries_t = queries_t.unsqueeze(0)
    scores, idx = topk_similarity(queries_t, corpus_t, k, backend=backend, chunk_size=chunk_size)
    if single:
        scores, idx = scores[0], idx[0]
    if as_numpy:
        return scores.cpu().numpy(), idx.cpu().numpy()
    return scores, idx


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        array = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise InputError(f"search: {name} is not an array: {e}") from None
    if array.dtype.kind not in "fiu":
        raise InputError(f"search: {name} must hold numbers, got dtype {array.dtype}")
    if array.dtype.kind in "iu":
        array = array.astype(np.float32)
    with warnings.catch_warnings():
        # read-only arrays (np.load(mmap_mode="r")) are fine: nothing here writes to them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _check_topk_inputs(queries: Any, corpus: Any, k: Any) -> None:
    _check_matrix("topk_similarity", "queries", queries)
    _check_matrix("topk_similarity", "corpus", corpus)
    if queries.device != corpus.device:
        raise InputError(
            f"topk_similarity: queries are on {queries.device} but the corpus is on {corpus.device}"
        )
    if queries.shape[1] != corpus.shape[1]:
        raise InputError(
            f"topk_similarity: queries have dim {queries.shape[1]} but the corpus has dim {corpus.shape[1]}"
        )
    if corpus.shape[1] == 0:
        raise InputError("topk_similarity: the vectors have dimension 0")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"topk_similarity: k must be an integer, got {type(k).__name__}")
    if k < 1:
        raise InputError(f"topk_similarity: k must be >= 1, got {k}")
    if k > corpus.shape[0]:
        raise InputError(f"topk_similarity: k={k} exceeds the corpus size ({corpus.shape[0]} rows)")


def _check_matrix(op: str, name: str, x: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise InputError(f"{op}: {name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise InputError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")


# ---- dispatch ------------------------------------------------------------------------------------------
def _check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1
    ):
        raise InputError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _pick_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and _triton_available() else "torch"
    if backend == "triton" and not x.is_cuda:
        from vlm2vec_rt.kernels.interpreter import interpreter_requested

        if not interpreter_requested():
            raise InputError(
                "backend='triton' on CPU runs only under the Triton interpreter: set TRITON_INTERPRET=1"
            )
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernel_module(name: str, x: torch.Tensor):
    """vlm2vec_rt.kernels.<name>, imported on first use; on CPU in interpreter mode (see kernels/interpreter.py)."""
    import importlib

    if not x.is_cuda:
        from vlm2vec_rt.kernels.interpreter import use_interpreter

        use_interpreter()
    return importlib.import_module(f"vlm2vec_rt.kernels.{name}")
