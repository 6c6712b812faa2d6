"""training.compare's summary and table: the ranking metrics sit beside AUC, GAUC, logloss and RelaImpr, and a
model below the base model is flagged."""

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
        "train samples/s | AUC, no labels served | GAUC, no labels served | below base in |"
    )
    assert table[2].startswith(
        "| base | 0.7100 ± 0.0100 | 0.6600 ± 0.0100 | 0.6000 ± 0.0000 | +0.00% | 0.6200 ± 0.0200 |"
    )
    assert all(len(line.split("|")) == len(table[0].split("|")) for line in table)
    assert table[3].endswith("| — | — | — |")  # DIN above base, no feedback: nothing to flag
    assert results["din"]["below_base"] == [] and "below_base" not in results["base"]


def with_feedback(auc: float, gauc: float, auc_no_labels: float, gauc_no_labels: float) -> dict[str, object]:
    return {
        **run(auc, 0.6),
        "gauc": gauc,
        "without_feedback": {"auc": auc_no_labels, "gauc": gauc_no_labels, "logloss": 0.65},
    }


def test_a_model_below_base_in_any_edge_metric_is_flagged_in_json_and_table() -> None:
    """DIN above base with labels but below in AUC served without labels, DIEN below in labelled GAUC only
    (the mean over its runs), DSIN level or above everywhere: each flag names the metrics, the table says it
    in a column and in a line under the table, and results.json carries the same list."""
    results = summarise(
        {
            "base": [with_feedback(0.75, 0.69, 0.69, 0.68)],
            "din": [with_feedback(0.76, 0.71, 0.68, 0.70)],
            "dien": [with_feedback(0.77, 0.70, 0.70, 0.70), with_feedback(0.77, 0.67, 0.70, 0.70)],
            "dsin": [with_feedback(0.75, 0.69, 0.69, 0.68)],
        }
    )
    assert results["din"]["below_base"] == ["auc_without_feedback"]
    assert results["dien"]["below_base"] == ["gauc"]
    assert results["dsin"]["below_base"] == []
    assert results["din"]["gauc_without_feedback"] == pytest.approx(0.70)
    text = markdown_table(results)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["din"].endswith("| 0.6800 | 0.7000 | **AUC no labels** |")
    assert rows["dien"].endswith("| **GAUC** |")
    assert rows["dsin"].endswith("| — |") and rows["base"].endswith("| — |")
    assert "**din is below the base model in AUC no labels.**" in text
    assert "**dien is below the base model in GAUC.**" in text
    assert "dsin is below" not in text
