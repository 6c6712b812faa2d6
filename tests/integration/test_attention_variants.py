"""DIN's attention toolbox end to end: ``--attention`` on the training command line is stored in the model
config, the export checks its graph's parity and publishes it, and the service's scorer loads it (warm-up and
self-check) and answers in the same contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.scorer import Encoded, load_version
from training import train as train_cli
from training.export import export_run, torch_reference


# multihead and position have the most moving parts (head reshapes; in-graph recency ranks); every scorer's
# export parity is also checked in tests/unit/test_attention.py, so the other two run with -m slow
@pytest.mark.parametrize(
    "kind",
    [
        "multihead",
        "position",
        pytest.param("dot", marks=pytest.mark.slow),
        pytest.param("bilinear", marks=pytest.mark.slow),
    ],
)
def test_a_variant_trained_from_the_command_line_exports_and_serves(kind: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_cli.main(
        [
            *("--dataset", "synthetic", "--synthetic-users", "200", "--model", "din", "--attention", kind),
            *("--attention-heads", "3", "--attention-positions", "8", "--max-len", "12", "--epochs", "1"),
            *("--max-steps", "10", "--batch-size", "64", "--out", str(run), "--cache-dir", str(tmp_path / "cache")),
            "--no-progress",
        ]
    )
    folder, meta = export_run(run, tmp_path / "repo")
    config = meta["model_config"]
    assert (config["attention"], config["attention_heads"], config["attention_positions"]) == (kind, 3, 8)
    assert max(meta["parity"]["max_abs_diff_probability"], meta["parity"]["max_abs_diff_attention"]) <= 1e-5

    loaded = load_version(folder, provider="cpu")
    assert loaded.self_check_diff is not None and loaded.self_check_diff <= 1e-4
    rng = np.random.default_rng(0)
    n_items, n_cats = meta["vocabulary"]["n_items"], meta["vocabulary"]["n_categories"]
    hist = rng.integers(2, n_items, size=7)
    request = Encoded(
        hist_items=hist,
        hist_cats=rng.integers(2, n_cats, size=7),
        user_feats=np.ones(len(meta["vocabulary"]["user_feature_cardinalities"]), dtype=np.int64),
        cand_items=rng.integers(2, n_items, size=30),
        cand_cats=rng.integers(2, n_cats, size=30),
    )
    [(prob, att)] = loaded.run([request])
    assert prob.shape == (30,) and att.shape == (30, 7)
    feed = {
        "hist_items": request.hist_items[None],
        "hist_cats": request.hist_cats[None],
        "hist_mask": np.ones((1, 7), dtype=bool),
        "user_feats": request.user_feats[None],
        "cand_items": request.cand_items,
        "cand_cats": request.cand_cats,
        "cand_user": np.zeros(30, dtype=np.int64),
    }
    model, _ = train_cli.load_checkpoint(run)
    ref_p, ref_a = torch_reference(model, feed)
    np.testing.assert_allclose(prob, ref_p, atol=1e-5)
    np.testing.assert_allclose(att, ref_a, atol=1e-5)
    loaded.close()
