"""Scoring: vectorised ranks equal the per-query reference loop; ties broken as documented."""

from __future__ import annotations

import numpy as np
import pytest

from vlm2vec_rt import InputError
from vlm2vec_rt.eval.scoring import metrics, positive_ranks, positive_ranks_reference


def _problem(rng, num_q, uq, uc, width, dim, *, ragged, dups):
    q = rng.standard_normal((uq, dim)).astype(np.float32)
    c = rng.standard_normal((uc, dim)).astype(np.float32)
    qi = rng.integers(0, uq, num_q)
    ci = np.stack([rng.choice(uc, width, replace=uc < width) for _ in range(num_q)])
    if dups:  # some lists repeat their positive or a negative
        ci[::3, -1] = ci[::3, 0]
        ci[1::4, 2] = ci[1::4, 1]
    if ragged:
        lengths = rng.integers(1, width + 1, num_q)
        ci[np.arange(width)[None, :] >= lengths[:, None]] = -1
    return q, c, qi, ci


@pytest.mark.parametrize(
    "num_q, uq, uc, width, dim",
    [
        (1, 1, 1, 1, 3),
        (37, 11, 13, 13, 7),
        (53, 53, 301, 29, 33),
        (200, 17, 10, 10, 64),
        (65, 40, 997, 211, 5),
    ],
)
@pytest.mark.parametrize("ties", ["strict", "official"])
def test_vectorised_equals_reference(num_q, uq, uc, width, dim, ties):
    rng = np.random.default_rng(num_q * 7 + dim)
    for ragged, dups in ((False, False), (True, True)):
        if width < 3 and dups:
            continue
        q, c, qi, ci = _problem(rng, num_q, uq, uc, width, dim, ragged=ragged, dups=dups)
        ref = positive_ranks_reference(q, c, qi, ci, ties=ties)
        for strategy in ("auto", "dense", "gather"):
            np.testing.assert_array_equal(positive_ranks(q, c, qi, ci, ties=ties, strategy=strategy), ref)


def test_small_chunks_give_the_same_ranks(monkeypatch):
    import vlm2vec_rt.eval.scoring as scoring

    rng = np.random.default_rng(5)
    q, c, qi, ci = _problem(rng, 101, 31, 77, 19, 9, ragged=True, dups=True)
    monkeypatch.setattr(scoring, "_CHUNK_BYTES", 1)  # one query per chunk
    for ties in scoring.TIES:
        ref = positive_ranks_reference(q, c, qi, ci, ties=ties)
        for strategy in ("dense", "gather"):
            np.testing.assert_array_equal(positive_ranks(q, c, qi, ci, ties=ties, strategy=strategy), ref)


def test_ties_hand_computed():
    # Query (1, 0); candidates: c0 (positive) = (1, 0); c1 = (1, 0) (a different input, same vector);
    # c2 = (0, 1); c3 = (-1, 0).
    q = np.array([[1.0, 0.0]])
    c = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    ci = np.array([[0, 1, 2, 3], [0, 2, 3, -1], [0, 0, 2, 3], [2, 0, 3, -1]])
    qi = np.zeros(4, dtype=np.int64)
    # strict: a distinct candidate that ties ranks above; a duplicate of the positive does not count.
    np.testing.assert_array_equal(positive_ranks(q, c, qi, ci, ties="strict"), [2, 1, 1, 2])
    # official (the default): the lowest index wins ties (np.argmax, as the official code), so the positive.
    np.testing.assert_array_equal(positive_ranks(q, c, qi, ci), [1, 1, 1, 2])
    np.testing.assert_array_equal(positive_ranks(q, c, qi, ci, ties="first"), [1, 1, 1, 2])  # old name
    # A collapsed encoder (all vectors equal) scores 0 under strict, 1 under official.
    same, pairs = np.ones((4, 2)), np.array([[0, 1], [0, 2], [1, 3], [2, 0]])
    assert metrics(positive_ranks(same[:1], same, qi, pairs, ties="strict"))["precision_at_1"] == 0.0
    assert metrics(positive_ranks(same[:1], same, qi, pairs))["precision_at_1"] == 1.0


def _official_hits(q: np.ndarray, c: np.ndarray, qi: np.ndarray, ci: np.ndarray) -> np.ndarray:
    """The official evaluation's hit@1 rule: cosine scores, then np.argmax == 0 (lowest index wins a tie).

    Each score is its own dot product: a matrix product over the candidate list may round two copies of one
    vector differently (it does here, for D=64), which is BLAS's artefact, not the rule.
    """
    hits = []
    for query, row in zip(qi, ci):
        qv = q[query].astype(np.float64)
        qv /= np.linalg.norm(qv)
        scores = [
            np.dot(c[i].astype(np.float64) / np.linalg.norm(c[i].astype(np.float64)), qv)
            for i in row
            if i >= 0
        ]
        hits.append(int(np.argmax(scores)) == 0)
    return np.asarray(hits)


@pytest.mark.parametrize("dim", [1, 5, 64, 333])
def test_exact_duplicates_tie_alike_on_every_strategy(dim):
    # Candidates that are exact copies of the positive or of a negative, under other keys (different
    # inputs that embed alike) and under the same key: every strategy must see exact ties, so all agree
    # with each other and with the official argmax on every query.
    rng = np.random.default_rng(dim)
    base = rng.standard_normal((40, dim)).astype(np.float32)
    c = np.concatenate([base, base[:20], base[5:15]])  # rows 40..69 copy rows 0..19 and 5..14
    q = np.concatenate([base[:10], rng.standard_normal((15, dim)).astype(np.float32)])
    num_q, width = 300, 23
    qi = rng.integers(0, len(q), num_q)
    ci = np.stack([rng.choice(len(c), width, replace=False) for _ in range(num_q)])
    copies = {i: [j for j in range(len(c)) if j != i and (c[j] == c[i]).all()] for i in range(len(c))}
    for r in range(0, num_q, 2):  # put a copy of the positive (another key) in half of the lists
        if copies[ci[r, 0]]:
            ci[r, -1] = copies[ci[r, 0]][0]
    ci[::5, 3] = ci[::5, 0]  # the positive's own key again
    ci[1::7, 4] = ci[1::7, 2]  # a negative twice
    expect_official = np.where(_official_hits(q, c, qi, ci), 1, 0)
    for ties in ("official", "strict"):
        ref = positive_ranks_reference(q, c, qi, ci, ties=ties)
        for strategy in ("auto", "dense", "gather"):
            got = positive_ranks(q, c, qi, ci, ties=ties, strategy=strategy)
            np.testing.assert_array_equal(got, ref, err_msg=f"{ties} {strategy}")
    official = positive_ranks(q, c, qi, ci) == 1
    np.testing.assert_array_equal(official, expect_official.astype(bool))
    assert official.sum() < num_q  # the problem has misses too


def test_zero_vectors_and_metrics():
    q = np.zeros((1, 3))
    c = np.eye(3)
    ranks = positive_ranks(q, c, np.array([0]), np.array([[0, 1, 2]]))
    assert ranks.tolist() == [1]  # every score is 0: the official argmax gives the tie to the positive
    assert positive_ranks(q, c, np.array([0]), np.array([[0, 1, 2]]), ties="strict").tolist() == [3]
    m = metrics(np.array([1, 2, 5, 6]))
    assert m == {
        "precision_at_1": 0.25,
        "hit_at_5": 0.75,
        "mrr": pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 6) / 4),
    }
    with pytest.raises(InputError):
        metrics(np.array([]))
    with pytest.raises(InputError, match="ties"):
        positive_ranks(q, c, np.array([0]), np.array([[0, 1]]), ties="optimistic")
