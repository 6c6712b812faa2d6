"""An ensemble (training.train --ensemble N): members trained on one split, averaged, exported as one graph
that passes export's parity check and that the service loads and serves like any model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from models.ensemble import Ensemble
from training.batches import TensorSamples
from training.config import TrainConfig
from training.export import export_run
from training.metrics import auc
from training.train import load_checkpoint, load_data, load_model, predict, train

SMALL = {"n_users": 300, "n_items": 150, "n_categories": 8, "min_events": 15, "max_events": 30, "seed": 2}


def test_an_ensemble_averages_its_members_and_is_served_as_one_model(tmp_path: Path) -> None:
    cfg = TrainConfig(
        dataset="synthetic",
        synthetic=SMALL,
        model="din",
        out=str(tmp_path / "run"),
        epochs=1,
        max_steps=8,  # a few steps per member: the test is about averaging and serving, not accuracy
        max_len=12,
        batch_size=128,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        ensemble=2,
        seed=5,
    )
    result = train(cfg)
    m = result.metrics
    assert m["ensemble"]["members"] == 2 and m["ensemble"]["seeds"][0] == 5  # member 0: the plain run's seed
    members = [load_checkpoint(tmp_path / "run" / f"member-{i}")[0] for i in range(2)]
    # the ensemble's test AUC is that of the members' mean probability, on the one split they share
    data = load_data(cfg)
    test = TensorSamples(data.test, cfg.max_len)
    probs = [predict(member, test, 4096)[0] for member in members]
    assert probs[0].tolist() != probs[1].tolist()  # different seeds, different models
    assert m["auc"] == pytest.approx(auc(data.test.label, np.mean(probs, axis=0)), abs=1e-6)
    with pytest.raises(ValueError, match="ensemble of 2 models"):
        load_checkpoint(tmp_path / "run")
    ensemble, _ = load_model(tmp_path / "run")
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2

    folder, meta = export_run(tmp_path / "run", tmp_path / "repo", name="din-ensemble")
    assert meta["ensemble"] == {"members": 2} and meta["model_type"] == "din"
    assert max(meta["parity"]["max_abs_diff_probability"], meta["parity"]["max_abs_diff_attention"]) <= 1e-5
    assert {"model.onnx", "model_cuda.onnx", "selfcheck.npz"} <= {p.name for p in folder.iterdir()}

    vocab = json.loads((folder / "vocab.json").read_text())
    items, history, candidates = vocab["items"], vocab["items"][:6], vocab["items"][-4:]  # history: newest first
    settings = Settings(model_repository=tmp_path / "repo", default_model="din-ensemble")
    with TestClient(create_app(settings)) as client:
        r = client.post(
            "/score",
            json={
                "user_id": "u",
                "history": [{"item_id": i} for i in history],
                "candidates": [{"item_id": c} for c in candidates],
            },
        )
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]

    # the reference: each member in PyTorch on the same inputs, probability and attention averaged
    index = {item: k + 2 for k, item in enumerate(items)}
    cat_index = {c: k + 2 for k, c in enumerate(vocab["categories"])}
    oldest_first = history[::-1]
    n = len(candidates)
    with torch.no_grad():
        out = ensemble(
            torch.tensor([[index[i] for i in oldest_first]] * n),
            torch.tensor([[cat_index[vocab["item_category"][i]] for i in oldest_first]] * n),
            torch.ones((n, len(history)), dtype=torch.bool),
            torch.tensor([index[c] for c in candidates]),
            torch.tensor([cat_index[vocab["item_category"][c]] for c in candidates]),
            torch.ones((n, 1), dtype=torch.long),  # the user's segment: not given, OOV
        )
    np.testing.assert_allclose([s["probability"] for s in scores], torch.sigmoid(out.logits).numpy(), atol=1e-5)
    # the API lists attention most recent first
    np.testing.assert_allclose([s["attention"] for s in scores], out.attention.numpy()[:, ::-1], atol=1e-5)
