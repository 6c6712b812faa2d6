"""training.compare's summary and table: the ranking metrics sit beside AUC, GAUC, logloss and RelaImpr."""

from __future__ import annotations

import pytest

from training.compare import markdown_table, summarise


def run(auc: float, ndcg: float) -> dict[str, float]:
    return {
        "auc": auc,
        "gauc": auc - 0.05,
        "logloss": 0.6,
        "ndcg@5": ndcg,
        "recall@5": 0.4,
        "precision@5": 0.5,
        "best_epoch": 2,
        "train_samples_per_second": 1000.0,
    }


def test_repeats_average_the_ranking_metrics_and_the_table_shows_each_once() -> None:
    results = summarise({"base": [run(0.70, 0.60), run(0.72, 0.64)], "din": [run(0.75, 0.70), run(0.75, 0.70)]})
    assert results["base"]["ndcg@5"] == pytest.approx(0.62) and results["base"]["ndcg@5_std"] == pytest.approx(0.02)
    assert results["din"]["relaimpr"] == pytest.approx((0.75 - 0.5) / (0.71 - 0.5) - 1)
    table = markdown_table(results).splitlines()
    assert table[0] == (
        "| model | AUC | GAUC | logloss | RelaImpr | NDCG@5 | Recall@5 | Prec@5 | "
        "train samples/s | AUC, no labels served |"
    )
    assert table[2].startswith(
        "| base | 0.7100 ± 0.0100 | 0.6600 ± 0.0100 | 0.6000 ± 0.0000 | +0.00% | 0.6200 ± 0.0200 |"
    )
    assert all(len(line.split("|")) == len(table[0].split("|")) for line in table)
