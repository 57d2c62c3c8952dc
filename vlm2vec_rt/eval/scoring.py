"""Ranking each query's positive among its own candidates by cosine similarity; Precision@1, hit@5, MRR.

Ties. `ties="official"` (the default) is the official VLM2Vec evaluation's rule: it takes `np.argmax`
over a query's candidate scores and counts a hit when that is candidate 0, the positive; argmax gives a
tie to the lowest index, so a candidate must score strictly above the positive to beat it.
`ties="strict"`: the positive must score strictly above every candidate that is a *different* input
(another (text, image) pair); candidates that are the *same* input as the positive (duplicates in the
list) never count against it. So under "strict" a collapsed model that embeds everything alike scores 0,
under "official" it scores 1.

Identical vectors tie exactly, whatever the strategy: candidate embeddings are deduplicated by content
before scoring, and a candidate whose vector equals the positive's is a tie by definition (a GEMM may round
two copies of one row differently, one float64 unit apart, which would let strategies disagree).

Scores are computed in float64 on L2-normalised rows (a zero vector scores 0 against everything).
Two vectorised paths give the same ranks as the per-query reference loop:
  dense:  S = Q_rows @ C_unique^T, then each row's candidates are gathered (one GEMM; best when the
          candidate pool is small, e.g. classification, where every query shares the same labels).
  gather: each query against its own K candidates only, Q*K*D work (best for large candidate pools).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

TIES = ("official", "strict")
# "first" (argmax: the lowest index wins a tie) is the official rule's older name here
_TIE_ALIASES = {"first": "official"}
# Working-set budget per chunk of queries (bytes): bounds memory whatever the dataset's size.
_CHUNK_BYTES = 64 << 20
# Use the dense GEMM while it does at most this many times the multiply-adds of the gather path: the
# gather path copies each query's K candidate rows and is memory-bound, so a GEMM over a pool even 20x
# larger than K is still ~7x faster (bench/bench_eval.py, Q=K=1000, D=1024); it only wins on huge pools.
_DENSE_WORK_RATIO = 64.0


def check_ties(ties: str) -> str:
    """The tie rule's canonical name ("official" | "strict"; "first" is taken for "official")."""
    ties = _TIE_ALIASES.get(ties, ties)
    if ties not in TIES:
        raise InputError(f"ties must be one of {TIES}, got {ties!r}")
    return ties


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float64 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def positive_ranks(
    query_emb: np.ndarray,
    candidate_emb: np.ndarray,
    query_index: np.ndarray,
    candidate_index: np.ndarray,
    *,
    ties: str = "official",
    strategy: str = "auto",
) -> np.ndarray:
    """1-based rank of each query's positive (candidate 0) among its candidates -> int64 [Q].

    query_emb [Uq, D], candidate_emb [Uc, D]: embeddings of the unique keys; query_index [Q] into
    query_emb; candidate_index [Q, K] into candidate_emb, -1 = no candidate (shorter lists).
    strategy: "auto" | "dense" | "gather" (same result; speed only).
    """
    ties = check_ties(ties)
    q = normalize_rows(query_emb)
    c, vector_id = _unique_rows(candidate_emb)
    if q.shape[1] != c.shape[1]:
        raise InputError(f"query and candidate embeddings differ in dimension: {q.shape[1]} vs {c.shape[1]}")
    query_index = np.asarray(query_index, dtype=np.int64)
    candidate_index = np.asarray(candidate_index, dtype=np.int64)
    num, width = candidate_index.shape
    dim = q.shape[1]
    if strategy == "auto":
        dense_work = num * c.shape[0]
        gather_work = num * width
        strategy = "dense" if dense_work <= _DENSE_WORK_RATIO * gather_work else "gather"
    if strategy == "dense":
        per_query_bytes = 8 * c.shape[0]
    elif strategy == "gather":
        per_query_bytes = 8 * width * dim
    else:
        raise InputError(f"strategy must be 'auto', 'dense' or 'gather', got {strategy!r}")
    step = max(1, _CHUNK_BYTES // max(per_query_bytes, 1))
    valid = candidate_index >= 0
    safe = vector_id[np.where(valid, candidate_index, 0)]  # into the unique vectors
    ranks = np.empty(num, dtype=np.int64)
    for start in range(0, num, step):
        sl = slice(start, min(start + step, num))
        qv = q[query_index[sl]]  # [b, D]
        if strategy == "dense":
            scores = np.take_along_axis(qv @ c.T, safe[sl], axis=1)  # [b, Uc] -> [b, K]
        else:
            scores = np.matmul(c[safe[sl]], qv[:, :, None])[..., 0]  # [b, K, D] @ [b, D, 1] -> [b, K]
        ranks[sl] = _ranks_from_scores(scores, candidate_index[sl], safe[sl], valid[sl], ties)
    return ranks


def _unique_rows(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised distinct rows, the distinct row of each input row): equal vectors share one row."""
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise InputError(f"embeddings must be a 2-D array [N, D], got shape {emb.shape}")
    if emb.shape[1] == 0:
        raise InputError("embeddings have dimension 0")
    if emb.shape[0] == 0:
        return normalize_rows(emb), np.zeros(0, dtype=np.int64)
    # by bytes (one memcmp sort, fast at any D): -0.0 and 0.0 differ there but still score alike
    rows = np.ascontiguousarray(emb)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).reshape(-1)
    _, first, vector_id = np.unique(keys, return_index=True, return_inverse=True)
    return normalize_rows(rows[first]), vector_id.reshape(-1).astype(np.int64)


def _ranks_from_scores(
    scores: np.ndarray, index: np.ndarray, vector: np.ndarray, valid: np.ndarray, ties: str
) -> np.ndarray:
    """Ranks from [b, K] scores; index: the candidates' keys, vector: their distinct-vector ids, valid: real."""
    positive = scores[:, :1]
    same_vector = vector == vector[:, :1]  # an exact tie with the positive, however it was rounded
    if ties == "official":
        above = valid & ~same_vector & (scores > positive)
    else:  # strict: every different input at or above the positive
        above = valid & (index != index[:, :1]) & (same_vector | (scores >= positive))
    return 1 + above.sum(axis=1)


def positive_ranks_reference(
    query_emb: np.ndarray,
    candidate_emb: np.ndarray,
    query_index: np.ndarray,
    candidate_index: np.ndarray,
    *,
    ties: str = "official",
) -> np.ndarray:
    """The same ranks, one query at a time like the official evaluation loop (the reference path)."""
    ties = check_ties(ties)
    q = normalize_rows(query_emb)
    c = normalize_rows(candidate_emb)
    raw = np.asarray(candidate_emb)
    ranks = []
    for qi, row in zip(query_index, candidate_index):
        ids = [int(i) for i in row if i >= 0]
        scores = [float(np.dot(c[i], q[qi])) for i in ids]
        rank = 1
        for i, s in zip(ids[1:], scores[1:]):
            tie = raw[i].tobytes() == raw[ids[0]].tobytes()
            if ties == "official":
                rank += not tie and s > scores[0]
            else:
                rank += i != ids[0] and (tie or s >= scores[0])
        ranks.append(rank)
    return np.asarray(ranks, dtype=np.int64)


def metrics(ranks: np.ndarray) -> dict[str, float]:
    """precision_at_1 (MMEB's score), hit_at_5 and mrr from the positives' 1-based ranks."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise InputError("no queries to score")
    return {
        "precision_at_1": float(np.mean(ranks == 1)),
        "hit_at_5": float(np.mean(ranks <= 5)),
        "mrr": float(np.mean(1.0 / ranks)),
    }
