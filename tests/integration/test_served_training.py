"""training.train --dataset served, cold and warm-started, and the export of the result."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.unit.test_served_data import served_log
from training.export import export_run
from training.train import CHECKPOINT_NAME
from training.train import main as train_main


def _state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["state_dict"]  # type: ignore[no-any-return]


def test_train_on_served_samples_then_warm_start_and_export(tmp_path: Path) -> None:
    served_log(tmp_path / "served", n=200)
    common = ["--dataset", "served", "--data-dir", str(tmp_path / "served"), "--model", "din", "--max-len", "6"]
    common += ["--batch-size", "64", "--no-progress", "--cache-dir", "", "--history-feedback"]
    train_main([*common, "--epochs", "1", "--out", str(tmp_path / "v1")])
    ckpt = torch.load(tmp_path / "v1" / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert ckpt["train_config"]["dataset"] == "served"
    assert set(ckpt["vocab"]["user_features"]) == {"segment"}

    # a warm start with no step taken keeps the earlier parameters exactly (and their vocabulary, shapes)
    train_main([*common, "--init-from", str(tmp_path / "v1"), "--max-steps", "0", "--out", str(tmp_path / "v2")])
    before, after = _state(tmp_path / "v1"), _state(tmp_path / "v2")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    warm = torch.load(tmp_path / "v2" / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    assert warm["vocab"] == ckpt["vocab"]

    # and one that trains moves them, then exports as a new version beside the first
    train_main([*common, "--init-from", str(tmp_path / "v1"), "--epochs", "1", "--out", str(tmp_path / "v3")])
    moved = _state(tmp_path / "v3")
    assert any(not torch.equal(before[k], moved[k]) for k in before)
    folder, meta = export_run(tmp_path / "v3", tmp_path / "repo", name="din")
    assert meta["training"]["init_from"] == str(tmp_path / "v1")
    assert meta["vocabulary"]["user_features"] == ["segment"] and (folder / "model.onnx").is_file()
