from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.compare import main as compare_main
from training.metrics import rela_impr


# eight trainings (two models, two splits, two epochs): a long timeout for a loaded two-core machine
@pytest.mark.timeout(900)
def test_compare_writes_the_paper_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = [
        "--dataset",
        "synthetic",
        "--synthetic-users",
        "250",
        "--max-len",
        "10",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    compare_main(
        [*data, "--models", "base,din", "--epochs", "2", "--splits", "2", "--out", str(tmp_path), "--no-progress"]
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"base", "din"}
    for row in results.values():
        assert {"auc", "gauc", "logloss", "relaimpr", "auc_std"} <= set(row)
        assert row["runs"] == 2 and len(row["per_run"]) == 2
        assert {r["split"] for r in row["per_run"]} == {0, 1}
    assert results["base"]["relaimpr"] == 0.0
    assert results["din"]["relaimpr"] == pytest.approx(rela_impr(results["din"]["auc"], results["base"]["auc"]))
    table = (tmp_path / "results.md").read_text()
    assert "| din |" in table and "RelaImpr" in table
    assert (tmp_path / "valid_gauc.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "din" / "split-1" / "checkpoint.pt").exists()
    assert "| base |" in capsys.readouterr().out


def test_compare_with_a_recipe_file_and_a_flag_over_it(tmp_path: Path) -> None:
    recipe = tmp_path / "small.toml"
    recipe.write_text(
        'dataset = "synthetic"\nmax_len = 10\nepochs = 1\nlr = 0.01\n'
        "[synthetic]\nn_users = 250\n[model_options]\nattention_softmax = true\n"
        '[compare]\nmodels = ["base", "din"]\nsplits = 2\n'
    )
    out = tmp_path / "out"
    argv = ["--recipe", str(recipe), "--splits", "1", "--lr", "0.002", "--max-steps", "5"]
    compare_main([*argv, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"base", "din"} and results["din"]["runs"] == 1  # --splits 1 over the recipe's 2
    config = json.loads((out / "din" / "metrics.json").read_text())["config"]
    assert (config["lr"], config["max_len"], config["synthetic"]) == (0.002, 10, {"n_users": 250})
    assert config["model_options"]["attention_softmax"] is True
    assert config["recipe"]["name"] == "small" and config["recipe"]["path"] == str(recipe.resolve())
    assert (out / "results.md").read_text().startswith("Recipe `small` (sha256 ")
    # the ranking metrics beside AUC, for each default cut-off K, in results.json and in the table
    assert {"ndcg@5", "recall@10", "precision@5"} <= set(results["din"])
    assert {"ndcg@10", "recall@5"} <= set(results["din"]["per_run"][0])
    assert "| NDCG@5 | Recall@5 | Prec@5 | NDCG@10 |" in (out / "results.md").read_text()
