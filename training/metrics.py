"""Offline metrics: those of the DIN paper (AUC, impression-weighted user GAUC, logloss, RelaImpr) and the
per-user ranking metrics NDCG@K, Recall@K and Precision@K.

Ranking metrics rank each user's own samples of a split by score. A sample is *relevant* when its label is 1:
under the din-movielens protocol, a test user's rated movies ranked against each other, relevant = rated ≥ 4
(the protocol's label); under the implicit protocol, each held-out interaction beside its sampled negative(s),
relevant = the interaction itself (so with one negative per positive a user's list has two samples and only
K = 1 tells models apart). Gains are binary; ties in score keep the samples' order in the split.

- NDCG@K = DCG@K / IDCG@K, DCG@K = Σ_{rank i < K} rel_i / log2(i + 2), IDCG@K the DCG of the ideal order
  (sklearn's ndcg_score, per user);
- Recall@K = relevant samples in the top K / the user's relevant samples;
- Precision@K = relevant samples in the top K / min(K, the user's samples) (a user with fewer than K samples
  is not penalised for the slots it cannot fill).

Each is the unweighted mean over users with at least one relevant sample; the others are skipped and counted
(``ranking_users_skipped``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Σ_u n_u·AUC_u / Σ_u n_u over users having both classes (DIN paper eq. 10), n_u = impressions.

    Vectorised with per-user average ranks (Mann–Whitney), ties counted as half."""
    df = pd.DataFrame({"u": users, "y": labels.astype(np.int64), "s": scores})
    df["r"] = df.groupby("u")["s"].rank(method="average")
    g = df.groupby("u").agg(n=("y", "size"), pos=("y", "sum"))
    g["rank_pos"] = df[df["y"] == 1].groupby("u")["r"].sum()
    g = g[(g["pos"] > 0) & (g["pos"] < g["n"])]
    if g.empty:
        return float("nan")
    neg = g["n"] - g["pos"]
    user_auc = (g["rank_pos"] - g["pos"] * (g["pos"] + 1) / 2) / (g["pos"] * neg)
    return float((user_auc * g["n"]).sum() / g["n"].sum())


def logloss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    return float(log_loss(labels, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1]))


def rela_impr(model_auc: float, base_auc: float) -> float:
    """RelaImpr = (AUC(model) − 0.5) / (AUC(base) − 0.5) − 1 (DIN paper eq. 11), as a fraction."""
    return (model_auc - 0.5) / (base_auc - 0.5) - 1.0


RANKING_KS = (5, 10)


def ranking(
    users: np.ndarray, labels: np.ndarray, scores: np.ndarray, ks: tuple[int, ...] = RANKING_KS
) -> dict[str, float]:
    """Per-user NDCG@K, Recall@K and Precision@K for each K (see the module's docstring), with the number of
    users averaged (``ranking_users``) and skipped for having no relevant sample (``ranking_users_skipped``).

    Vectorised: one sort by (user, score descending), then per-user sums with bincount; equal to sklearn's
    ndcg_score per user where scores have no ties (tests/unit/test_metrics.py)."""
    if any(k < 1 for k in ks):
        raise ValueError(f"ranking cut-offs must be at least 1, got {ks}")
    _, user = np.unique(users, return_inverse=True)  # (N,) dense 0..U-1
    n_users = int(user.max()) + 1 if user.size else 0
    order = np.lexsort((-np.asarray(scores, dtype=np.float64), user))  # by user, then score descending; stable
    u, y = user[order], np.asarray(labels, dtype=np.float64)[order]
    n = np.bincount(u, minlength=n_users)  # (U,) samples per user
    relevant = np.bincount(u, weights=y, minlength=n_users)  # (U,)
    rank = np.arange(u.size) - np.repeat(np.cumsum(n) - n, n)  # (N,) 0-based rank inside the user's list
    discount = 1.0 / np.log2(np.arange(max(ks, default=1)) + 2.0)  # (K_max,)
    ideal_prefix = np.r_[0.0, np.cumsum(discount)]  # IDCG of r relevant samples at cut-off ≥ r
    kept = relevant > 0
    out: dict[str, float] = {"ranking_users": float(kept.sum()), "ranking_users_skipped": float((~kept).sum())}
    for k in ks:
        top = rank < k  # (N,)
        hits = np.bincount(u, weights=y * top, minlength=n_users)  # (U,)
        dcg = np.bincount(u[top], weights=y[top] * discount[rank[top]], minlength=n_users)  # (U,)
        idcg = ideal_prefix[np.minimum(relevant, k).astype(np.int64)]  # (U,)
        out[f"ndcg@{k}"] = float(np.mean(dcg[kept] / idcg[kept])) if kept.any() else float("nan")
        out[f"recall@{k}"] = float(np.mean(hits[kept] / relevant[kept])) if kept.any() else float("nan")
        out[f"precision@{k}"] = float(np.mean(hits[kept] / np.minimum(k, n[kept]))) if kept.any() else float("nan")
    return out


def evaluate(
    users: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, ks: tuple[int, ...] = RANKING_KS
) -> dict[str, float]:
    return {
        "auc": auc(labels, probabilities),
        "gauc": gauc(users, labels, probabilities),
        "logloss": logloss(labels, probabilities),
        **ranking(users, labels, probabilities, ks),
    }
