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
