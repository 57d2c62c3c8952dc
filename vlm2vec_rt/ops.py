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

import contextlib
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
    stays under max(D * (B + M), 4M) values); the torch path is eager and ignores it. Autocast does not
    apply: both paths compute in the inputs' dtype with fp32 accumulation (a bf16 product, scaled by
    1 / temperature, would shift the loss). backend="auto" takes the torch path for float64 inputs.
    """
    _check_info_nce_inputs(q, t, temperature)
    _check_chunk_size(chunk_size)
    if _pick_backend(backend, q, (q.dtype,)) == "torch":
        return info_nce_torch(q, t, temperature=temperature)
    if q.dtype not in KERNEL_DTYPES:
        raise InputError(f"backend='triton' takes float32, float16 or bfloat16 q and t, not {q.dtype}")
    kernel = _kernel_module("infonce", q)
    with _no_autocast(q):
        return kernel.info_nce(q, t, float(temperature), chunk_rows=chunk_size)


def info_nce_torch(q: torch.Tensor, t: torch.Tensor, *, temperature: float = 0.02) -> torch.Tensor:
    """The reference InfoNCE in eager torch: fp32 (fp64 for fp64 inputs), log-sum-exp, one B x (B+M) block.

    The positive logit is taken as a row dot product rather than the diagonal of the logits, so its
    backward needs no B x (B+M) scatter; peak memory is the logits and their gradient.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with _no_autocast(q):
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

    queries [Q, D], corpus [N, D] on one device (fp32, fp16 or bf16; the torch path also takes fp64, and
    backend="auto" takes it for them).
    Returns (scores [Q, k] float32, indices [Q, k] int64) on that device; Q may be 0. The Q x N score
    matrix is never held: the torch path walks the corpus in chunks of chunk_size rows (at least k; default
    about 8 MB of scores), the Triton kernel in tiles. Tied scores may come in either order.
    """
    _check_topk_inputs(queries, corpus, k)
    _check_chunk_size(chunk_size)
    backend = _pick_backend(backend, corpus, (queries.dtype, corpus.dtype))
    queries, corpus = queries.detach(), corpus.detach()  # a selection: nothing to differentiate
    if backend == "torch":
        return topk_similarity_torch(queries, corpus, k, chunk_size=chunk_size)
    if queries.shape[0] == 0:
        return _no_results(queries, k)
    if corpus.dtype not in KERNEL_DTYPES:
        raise InputError(f"backend='triton' takes a float32, float16 or bfloat16 corpus, not {corpus.dtype}")
    return _kernel_module("topk", corpus).topk_similarity(queries, corpus, k)


def topk_similarity_torch(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, *, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked matmul + running top-k (FAISS's brute-force plan): memory O(Q * chunk), not O(Q * N).

    Scores are computed in fp32 (fp64 if either input is fp64), a chunk of the corpus at a time (converted
    chunk by chunk, so a half-precision or float64 corpus is never copied whole); fp32 products on CPU go
    through oneDNN where torch has it (AVX-512 where the CPU has it: about twice MKL's sgemm rate on AMD).
    The top k of the first columns starts a running list; every later score is filtered against each
    query's running k-th best (see _RunningTopK), so only the few that can still enter the top k are
    selected from, not whole chunks. Exact: the same indices as torch.topk over the full matrix wherever
    scores are not tied (NaN ranks first, as there). Inputs are checked as by topk_similarity.
    """
    _check_topk_inputs(queries, corpus, k)
    _check_chunk_size(chunk_size)
    n_queries = queries.shape[0]
    n = corpus.shape[0]
    if n_queries == 0:
        return _no_results(queries, k)
    dtype = torch.float64 if torch.float64 in (queries.dtype, corpus.dtype) else torch.float32
    q = queries.detach().to(dtype).contiguous()
    corpus = corpus.detach()
    # never narrower than k: each chunk costs a merge of the k held scores, so chunks of a few rows with k
    # near N would cost N * k (and the result is Q x k anyway)
    chunk = max(chunk_size or default_topk_chunk(n_queries, n, k), k)
    running = _RunningTopK(k)
    for start in range(0, n, chunk):
        block = corpus[start : start + chunk].to(dtype).contiguous()
        scores = _inner_products(q, block)
        if start == 0:
            # the top k of the first few columns (a small topk) seeds the filter; then spans 4x wider each,
            # so that each meets a threshold tight enough for its width
            lo, hi = 0, max(1024, 8 * k)
            while hi < scores.shape[1]:
                running.add(scores[:, lo:hi], lo)
                lo, hi = hi, 4 * hi
            scores, start = scores[:, lo:], lo
        running.add(scores, start)
    return running.result()


class _RunningTopK:
    """The k best (score, index) of each query over the columns taken in so far, unsorted.

    Once it holds k per query, new scores [Q, c] are filtered against each query's k-th best: of m columns
    merged, a random new one passes with probability about k / m. Where few pass, the filter first takes the
    maximum of each run of _BLOCK columns (one vectorised pass) and compares element by element only the
    runs whose maximum passes; else every element. What passes waits, and is merged (padded into
    [Q, most passes of one query], one torch.topk over [Q, k + that]) each time the columns taken in have
    doubled since the last merge: the threshold tightens as fast as it usefully can, in a few merges
    (about k ln 2 passes per query between two), so a chunk costs a handful of torch ops. Where the filter
    would keep too much (adversarially ordered data) or has no finite threshold (fewer than k columns yet,
    NaN or infinite scores), the new scores' own torch.topk is merged instead: same result, dearer. A query
    whose passes alone reach _PENDING_PER_K * k (its scores rising along the corpus) forces a merge, so the
    padded matrix stays within [Q, _PENDING_PER_K * k + chunk] whatever the order of the data.
    """

    def __init__(self, k: int):
        self.k = k
        self.seen = 0  # columns taken in
        self.merged = 0  # of which merged: the running list is their exact top k
        self.scores: torch.Tensor | None = None  # [Q, <= k]
        self.idx: torch.Tensor | None = None
        self.threshold: torch.Tensor | None = None  # [Q, 1] the k-th best merged, once there are k
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (row, index, score)
        self.pending_per_query: torch.Tensor | None = None  # [Q] how many of the pending are each query's

    def add(self, scores: torch.Tensor, offset: int) -> None:
        """Take in scores [Q, c] of corpus rows offset .. offset + c - 1 (any row stride, unit column stride)."""
        n_queries, width = scores.shape
        self.seen += width
        if width == 0:
            return
        if self.threshold is None:
            self._merge_dense(scores, offset)
            return
        # the fraction of runs holding a pass is about min(1, k * _BLOCK / columns merged)
        if width % _BLOCK == 0 and self.k * _BLOCK * _RUNS_BEYOND <= self.merged:
            # run j of a row: columns j, j + n_runs, j + 2 n_runs, ...; their maxima are an element-wise max
            # of _BLOCK contiguous slices (vectorises well, unlike a max over short contiguous runs)
            by_run = scores.view(n_queries, _BLOCK, width // _BLOCK)
            run_max = by_run.amax(dim=1)  # the one pass over the whole chunk
            rows, cols, values = self._passes_by_runs(by_run, run_max)
        else:
            rows, cols = _not_below(scores, self.threshold).nonzero(as_tuple=True)
            values = scores[rows, cols]
        if rows.numel() * _DENSE_BEYOND > scores.numel():
            self._merge_dense(scores, offset)
            return
        crowded = False
        if rows.numel():
            self.pending.append((rows, cols + offset, values))
            counts = torch.bincount(rows, minlength=n_queries)
            if self.pending_per_query is not None:
                counts += self.pending_per_query
            self.pending_per_query = counts
            crowded = int(counts.max()) > _PENDING_PER_K * self.k
        if crowded or self.seen >= 2 * self.merged:
            self._merge_pending(n_queries)

    def _passes_by_runs(self, by_run: torch.Tensor, run_max: torch.Tensor):
        n_runs = by_run.shape[2]
        rows, runs = _not_below(run_max, self.threshold).nonzero(as_tuple=True)
        candidates = by_run[rows, :, runs]  # [runs that pass, _BLOCK]
        which, i = _not_below(candidates, self.threshold[rows]).nonzero(as_tuple=True)
        return rows[which], i * n_runs + runs[which], candidates[which, i]

    def _merge_pending(self, n_queries: int) -> None:
        if self.pending:
            if len(self.pending) == 1:  # one chunk's passes: rows ascending already (row-major nonzero)
                rows, idx, values = self.pending[0]
            else:  # each query's passes side by side
                rows, idx, values = (torch.cat(parts) for parts in zip(*self.pending))
                rows, order = torch.sort(rows)
                idx, values = idx[order], values[order]
            counts = self.pending_per_query
            self.pending, self.pending_per_query = [], None
            # padded into [Q, widest]; -inf is below every finite threshold, so never chosen over the k held
            slot = torch.arange(rows.numel(), device=rows.device) - (counts.cumsum(0) - counts)[rows]
            widest = int(counts.max())
            pad_scores = values.new_full((n_queries, widest), -math.inf)
            pad_scores[rows, slot] = values
            pad_idx = idx.new_zeros((n_queries, widest))
            pad_idx[rows, slot] = idx
            self._merge(pad_scores, pad_idx)
        self.merged = self.seen

    def _merge_dense(self, scores: torch.Tensor, offset: int) -> None:
        self._merge_pending(scores.shape[0])
        top_scores, top_idx = torch.topk(scores, min(self.k, scores.shape[1]), dim=1, sorted=False)
        self._merge(top_scores, top_idx.add_(offset))

    def _merge(self, scores: torch.Tensor, idx: torch.Tensor) -> None:
        if self.scores is not None:
            scores = torch.cat([self.scores, scores], dim=1)
            idx = torch.cat([self.idx, idx], dim=1)
            scores, pos = torch.topk(scores, min(self.k, scores.shape[1]), dim=1, sorted=False)
            idx = idx.gather(1, pos)
        self.scores, self.idx = scores, idx
        self.threshold = None
        if scores.shape[1] == self.k:
            threshold = scores.amin(dim=1, keepdim=True)
            # a NaN or infinite k-th best would pass everything or nothing: dense merges from then on
            if bool(torch.isfinite(threshold).all()):
                self.threshold = threshold

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scores is not None:
            self._merge_pending(self.scores.shape[0])
        scores, order = torch.sort(self.scores, dim=1, descending=True)
        return scores.to(torch.float32), self.idx.gather(1, order)


def _no_results(queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The result for Q = 0 queries: ([0, k] float32, [0, k] int64) on the queries' device."""
    empty = queries.new_empty((0, k), dtype=torch.float32)
    return empty, empty.to(torch.int64)


def _not_below(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """scores >= threshold, and NaN (torch.topk ranks NaN above everything; amax propagates it)."""
    return torch.lt(scores, threshold).logical_not_()


_BLOCK = 16  # columns per run of the run filter
_RUNS_BEYOND = 4  # the run filter once at most about 1 / 4 of the runs hold a pass
_DENSE_BEYOND = 8  # more than 1 / 8 of the scores pass: their own topk is cheaper
_PENDING_PER_K = 8  # passes waiting beyond 8 k per query: merge (bounds the memory they hold)


def _inner_products(q: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """q @ block.T ([Q, D] x [c, D] -> [Q, c]), exact in the inputs' dtype; oneDNN for fp32 on CPU."""
    if q.dtype == torch.float32 and not q.is_cuda and _onednn_usable():
        try:
            return torch.ops.mkldnn._linear_pointwise(q, block, None, "none", [], "")
        except (RuntimeError, AttributeError, NotImplementedError):
            _ONEDNN["usable"] = False
    return torch.mm(q, block.t())


# oneDNN's f32 matmul (the op torch.compile's CPU linear uses) picks its kernel by instruction set, where
# MKL's sgemm on AMD runs its AVX2 path: 190-240 vs 95-110 GFLOP/s per core measured on an AMD EPYC (Zen 5).
# Found out once per process; torch.backends.mkldnn.enabled = False turns it off.
_ONEDNN: dict[str, bool] = {}


def _onednn_usable() -> bool:
    if "usable" not in _ONEDNN:
        _ONEDNN["usable"] = torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_linear_pointwise"
        )
    return _ONEDNN["usable"] and torch.backends.mkldnn.enabled


def default_topk_chunk(n_queries: int, n: int, k: int) -> int:
    """Corpus rows per chunk: about 8 MB of fp32 scores, a multiple of 16, between 1024 and 65536 rows.

    Small enough that a chunk's scores are still in cache when they are filtered (4-16 MB measured 5-15%
    faster than 48 MB on a 2-core AMD EPYC, 2 MB L2 per core), large enough that the handful of torch ops
    per chunk stay a small share. k does not enter: the first chunk is taken in in widening spans.
    """
    rows = (8 << 20) // (4 * max(n_queries, 1))
    rows = max(1024, min(rows, 65536))
    return max(1, min(n, -(-rows // _BLOCK) * _BLOCK))


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
    # torch.from_numpy takes neither negative strides (a[::-1]) nor non-native byte order ('>f4')
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if any(stride < 0 for stride in array.strides):
        array = np.ascontiguousarray(array)
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


def _pick_backend(backend: str, x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> str:
    """The path to run; "auto" takes the kernel only for CUDA inputs of the dtypes it takes (not float64)."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        kernel_ok = x.is_cuda and all(dtype in KERNEL_DTYPES for dtype in dtypes)
        return "triton" if kernel_ok and _triton_available() else "torch"
    if backend == "triton" and not x.is_cuda:
        from vlm2vec_rt.kernels.interpreter import interpreter_requested

        if not interpreter_requested():
            raise InputError(
                "backend='triton' on CPU runs only under the Triton interpreter: set TRITON_INTERPRET=1"
            )
    return backend


def _no_autocast(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for x's device type: the ops here choose their own precision."""
    return torch.autocast(device_type=x.device.type, enabled=False)


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
