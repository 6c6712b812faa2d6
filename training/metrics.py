"""Offline metrics of the DIN paper: AUC, impression-weighted user GAUC, logloss and RelaImpr."""

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


def evaluate(users: np.ndarray, labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    return {
        "auc": auc(labels, probabilities),
        "gauc": gauc(users, labels, probabilities),
        "logloss": logloss(labels, probabilities),
    }
