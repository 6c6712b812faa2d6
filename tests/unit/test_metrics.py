from __future__ import annotations

import numpy as np
import pytest

from training.metrics import auc, gauc, logloss, rela_impr


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
