from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from training.metrics import auc, evaluate, gauc, logloss, ranking, rela_impr


def test_gauc_against_a_hand_computed_example() -> None:
    users = np.array([1, 1, 1, 1, 2, 2, 2, 3, 3])
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 1, 1])
    scores = np.array([0.9, 0.8, 0.3, 0.1, 0.5, 0.5, 0.2, 0.4, 0.6])
    # user 1: positives {0.9, 0.3} vs negatives {0.8, 0.1}: pairs won 0.9>0.8, 0.9>0.1, 0.3>0.1 → 3/4
    # user 2: positive 0.5 vs {0.5, 0.2}: a tie (½) and a win → 1.5/2 = 0.75
    # user 3: only positives → skipped
    # impression-weighted: (4·0.75 + 3·0.75) / (4 + 3) = 0.75
    assert gauc(users, labels, scores) == pytest.approx(0.75)
    scores2 = scores.copy()
    scores2[4] = 0.1  # user 2 now ranks its positive last: AUC 0
    assert gauc(users, labels, scores2) == pytest.approx((4 * 0.75 + 3 * 0.0) / 7)


def test_gauc_equals_auc_for_a_single_user() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = rng.random(200)
    assert gauc(np.zeros(200), y, s) == pytest.approx(auc(y, s))


def test_logloss_and_relaimpr() -> None:
    assert logloss(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(np.log(2))
    # DIN paper table: RelaImpr of 0.7337 over 0.7263 on MovieLens ≈ 3.27%
    assert rela_impr(0.7337, 0.7263) == pytest.approx(0.0327, abs=5e-4)


def test_ranking_metrics_against_a_hand_computed_example() -> None:
    users = np.array([7, 7, 7, 7, 9, 9, 9, 4, 4])
    labels = np.array([1, 0, 1, 0, 0, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.3, 0.1, 0.7, 0.5, 0.2, 0.4, 0.6])
    m = ranking(users, labels, scores, ks=(1, 2, 5))
    # user 7 ranks [1, 0, 1, 0]; user 9 ranks [0, 1, 0]; user 4 has no relevant sample: skipped
    assert (m["ranking_users"], m["ranking_users_skipped"]) == (2, 1)
    d2, d3 = 1 / np.log2(3), 1 / np.log2(4)
    # K=1: user 7 hits (NDCG 1, recall 1/2, precision 1), user 9 misses (0, 0, 0)
    assert m["ndcg@1"] == pytest.approx(0.5)
    assert m["recall@1"] == pytest.approx(0.25)
    assert m["precision@1"] == pytest.approx(0.5)
    # K=2: user 7 DCG 1, IDCG 1 + d2; user 9 DCG d2, IDCG 1
    assert m["ndcg@2"] == pytest.approx((1 / (1 + d2) + d2) / 2)
    assert m["recall@2"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["precision@2"] == pytest.approx((0.5 + 0.5) / 2)
    # K=5 covers every list: user 7 DCG 1 + d3, IDCG 1 + d2; recall 1; precision over min(5, n_u) samples
    assert m["ndcg@5"] == pytest.approx(((1 + d3) / (1 + d2) + d2) / 2)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["precision@5"] == pytest.approx((2 / 4 + 1 / 3) / 2)


def test_ndcg_equals_sklearn_per_user() -> None:
    rng = np.random.default_rng(1)
    users = rng.integers(0, 40, 600)
    labels = rng.random(600) < 0.3
    scores = rng.random(600)  # continuous: no ties
    m = ranking(users, labels, scores, ks=(3, 10))
    for k in (3, 10):
        per_user = [
            ndcg_score([labels[users == u]], [scores[users == u]], k=k)
            for u in np.unique(users)
            if labels[users == u].any() and (users == u).sum() > 1
        ]
        assert m[f"ndcg@{k}"] == pytest.approx(np.mean(per_user))


def test_evaluate_reports_the_ranking_metrics() -> None:
    m = evaluate(np.array([0, 0, 1, 1]), np.array([1, 0, 0, 1]), np.array([0.9, 0.1, 0.8, 0.2]), ks=(1,))
    assert m["ndcg@1"] == pytest.approx(0.5) and m["recall@1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 1"):
        ranking(np.zeros(2), np.ones(2), np.ones(2), ks=(0,))
