"""/score with DSIN: the stored behaviours' timestamps divided into sessions as training divided them, the
same answer contract (attention per history item), plus ``sessions`` and each score's ``session_weights``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from models.serving import NaiveServing
from sessions import SessionSpec, one_history
from training.config import TrainConfig
from training.export import export_run
from training.train import load_checkpoint, train

SPEC = SessionSpec(sessions=3, length=5, gap=1800)
MAX_LEN = 20


@pytest.fixture(scope="module")
def dsin_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dsin-service")
    cfg = TrainConfig(
        dataset="synthetic",
        synthetic={
            "n_users": 150,
            "n_items": 150,
            "n_categories": 8,
            "min_events": 15,
            "max_events": 30,
            "seed": 4,
            "session_events": 4,
        },
        model="dsin",
        out=str(root / "run"),
        epochs=1,
        max_steps=10,
        max_len=MAX_LEN,
        batch_size=128,
        progress=False,
        cache_dir=None,
        model_options={"sessions": SPEC.sessions, "session_length": SPEC.length, "session_heads": 4},
    )
    train(cfg)
    export_run(root / "run", root / "repo")
    return root


@pytest.fixture
def client(dsin_repository: Path, redis_url: str) -> Iterator[TestClient]:
    settings = Settings(model_repository=dsin_repository / "repo", default_model="dsin", redis_url=redis_url)
    with TestClient(create_app(settings)) as c:
        yield c


def _items(root: Path) -> list[str]:
    items: list[str] = json.loads((root / "repo" / "dsin" / "1" / "vocab.json").read_text())["items"]
    return items


# 12 behaviours, oldest first: sessions of 4 (ends 3 days ago), 7 (more than 5: its 2 oldest are cut), 1 (now)
TIMES = [0, 60, 120, 180] + [300_000 + 100 * i for i in range(7)] + [600_000]


def _reference(root: Path, history: list[str], candidates: list[str], times: list[int]) -> tuple[Any, ...]:
    """The PyTorch paper form on the same history and the division sessions.py makes of ``times``."""
    model, ckpt = load_checkpoint(root / "run")
    vocab = ckpt["vocab"]
    index = {item: pos + 2 for pos, item in enumerate(vocab["items"])}
    cats = {c: pos + 2 for pos, c in enumerate(vocab["categories"])}
    hist = torch.tensor([[index[i] for i in history]])
    sess_index, sess_mask = one_history(times, SPEC)
    feed = {
        "hist_items": hist,
        "hist_cats": torch.tensor([[cats[vocab["item_category"][i]] for i in history]]),
        "hist_mask": torch.ones_like(hist, dtype=torch.bool),
        "user_feats": torch.ones(1, 1, dtype=torch.long),  # no segment given: OOV
        "cand_items": torch.tensor([index[i] for i in candidates]),
        "cand_cats": torch.tensor([cats[vocab["item_category"][i]] for i in candidates]),
        "cand_user": torch.zeros(len(candidates), dtype=torch.long),
        "sess_index": torch.from_numpy(sess_index)[None],
        "sess_mask": torch.from_numpy(sess_mask)[None],
    }
    with torch.no_grad():
        return tuple(x.numpy() for x in NaiveServing(model)(**feed))


def test_stored_behaviours_are_divided_by_their_timestamps(client: TestClient, dsin_repository: Path) -> None:
    items = _items(dsin_repository)
    history, candidates = items[:12], items[20:30]
    events = [
        {"user_id": "s1", "item_id": i, "timestamp": 1_700_000_000 + t} for i, t in zip(history, TIMES, strict=True)
    ]
    assert client.post("/events", json={"events": events}).status_code == 200
    r = client.post(
        "/score", json={"user_id": "s1", "model": "dsin", "candidates": [{"item_id": i} for i in candidates]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    # API indices are most recent first: index 0 is the last behaviour (a session of its own)
    assert body["sessions"] == [[0], [1, 2, 3, 4, 5], [8, 9, 10, 11]]
    ref_p, ref_a, ref_w = _reference(dsin_repository, history, candidates, TIMES)
    for j, s in enumerate(body["scores"]):
        assert s["probability"] == pytest.approx(float(ref_p[j]), abs=1e-5)
        weights, attention = np.array(s["session_weights"]), np.array(s["attention"])
        np.testing.assert_allclose(weights, ref_w[j], atol=1e-5)
        np.testing.assert_allclose(attention, ref_a[j][::-1], atol=1e-5)  # the graph's order is oldest first
        assert weights.sum() == pytest.approx(1.0, abs=1e-5)
        # attention[j] = its session's weight × its share of the session: summed over a session, its weight
        for k, members in enumerate(body["sessions"]):
            assert attention[members].sum() == pytest.approx(weights[k], abs=1e-5)
        assert (attention[[6, 7]] == 0).all()  # cut from a session of 7: in no session
    # a caller sending the same history with its timestamps gets the same answer
    sent = [{"item_id": i, "timestamp": 1_700_000_000 + t} for i, t in zip(history[::-1], TIMES[::-1], strict=True)]
    r2 = client.post(
        "/score", json={"user_id": "s1", "candidates": [{"item_id": i} for i in candidates], "history": sent}
    )
    assert r2.status_code == 200, r2.text
    assert r2.json()["sessions"] == body["sessions"] and r2.json()["scores"] == body["scores"]


def test_a_history_without_timestamps_is_one_session(client: TestClient, dsin_repository: Path) -> None:
    items = _items(dsin_repository)
    history, candidates = items[:12], items[40:45]
    sent = [{"item_id": i} for i in history[::-1]]  # most recent first
    sent[3]["timestamp"] = 5  # a timestamp on some items only: still no division
    r = client.post(
        "/score", json={"user_id": "t", "candidates": [{"item_id": i} for i in candidates], "history": sent}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sessions"] == [[0, 1, 2, 3, 4]]  # one session: its T most recent behaviours
    ref_p, ref_a, _ = _reference(dsin_repository, history, candidates, [0] * 12)
    for j, s in enumerate(body["scores"]):
        assert s["probability"] == pytest.approx(float(ref_p[j]), abs=1e-5)
        assert s["session_weights"] == [pytest.approx(1.0, abs=1e-6)]
        np.testing.assert_allclose(np.array(s["attention"]), ref_a[j][::-1], atol=1e-5)
    # no history at all: no session, nothing to attend to
    r = client.post("/score", json={"user_id": "t", "candidates": [{"item_id": candidates[0]}], "history": []})
    assert r.json()["sessions"] == [] and r.json()["scores"][0]["session_weights"] == []
