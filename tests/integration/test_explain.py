"""training.explain on the session's small din and dien runs: the heatmap PNG, the JSON beside it, and numbers
that are the exported serving graph's for the same history."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contract import FEEDBACK_INPUT, FEEDBACK_NEGATIVE, FEEDBACK_UNKNOWN, OUTPUT_NAMES
from models import MODELS
from tests.conftest import SERVICE_SYNTHETIC
from training.config import TrainConfig
from training.datasets import SyntheticConfig, generate_synthetic
from training.explain import DEFAULT_HOLDOUT, encode_profile, main, user_behaviours
from training.export import cpu_session
from training.samples import Vocabulary
from training.train import load_checkpoint, train

USER = "u7"


def serving_graph_answer(repo: Path, kind: str, answer: dict, vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """The exported graph's probabilities (N,) and attention (N, L), the history given oldest first."""
    session = cpu_session(repo / kind / "1" / "model.onnx")
    history = answer["history"][::-1]  # the JSON's is most recent first, as /score's
    scores = answer["scores"]
    n = len(scores)
    feed = {
        "hist_items": vocab.encode_items([h["item_id"] for h in history])[None],
        "hist_cats": vocab.encode_categories([h["category_id"] for h in history])[None],
        "hist_mask": np.ones((1, len(history)), dtype=bool),
        "user_feats": encode_profile(answer["user_features"], vocab)[None],
        "cand_items": vocab.encode_items([s["item_id"] for s in scores]),
        "cand_cats": vocab.encode_categories([s["category_id"] for s in scores]),
        "cand_user": np.zeros(n, dtype=np.int64),
    }
    names = {i.name for i in session.get_inputs()}
    if FEEDBACK_INPUT in names:
        codes = [FEEDBACK_UNKNOWN if h["label"] is None else FEEDBACK_NEGATIVE + h["label"] for h in history]
        feed[FEEDBACK_INPUT] = np.asarray([codes], dtype=np.int64)
    prob, att = session.run(list(OUTPUT_NAMES), feed)
    return prob, att[:, ::-1]


@pytest.mark.parametrize("kind", ["din", "dien"])
def test_explain_writes_the_heatmap_and_the_serving_graphs_numbers(
    kind: str, model_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = model_repository / "runs" / kind
    out = tmp_path / "explain.png"
    main(["--run", str(run), "--user", USER, "--out", str(out)])
    answer = json.loads(out.with_suffix(".json").read_text())
    printed = capsys.readouterr().out
    assert answer["model"] == kind and answer["user_id"] == USER
    assert list(answer["user_features"]) == ["segment"] and answer["user_features"]["segment"] is not None

    # the history: the user's behaviours before the held-out ones, most recent first, at most max_len
    _, ckpt = load_checkpoint(run)
    behaviours = user_behaviours(generate_synthetic(SyntheticConfig(**SERVICE_SYNTHETIC)).encode(), USER)
    expected = [b.item_id for b in behaviours[:-DEFAULT_HOLDOUT][-ckpt["max_len"] :]][::-1]
    assert [h["item_id"] for h in answer["history"]] == expected
    # the default candidates: what the user did next first, then popular items outside the history
    held_out = [b.item_id for b in behaviours[-DEFAULT_HOLDOUT:]]
    scores = answer["scores"]
    assert len(scores) == 10
    assert [s["item_id"] for s in scores[: len(set(held_out))]] == list(dict.fromkeys(held_out))
    assert all(s["held_out"] == (s["item_id"] in held_out) for s in scores)
    assert not {s["item_id"] for s in scores[len(set(held_out)) :]} & set(expected)

    # PyTorch's numbers are what the exported graph serves for the same history and candidates
    vocab = Vocabulary.from_json(ckpt["vocab"])
    prob, att = serving_graph_answer(model_repository / "repo", kind, answer, vocab)
    assert np.abs(np.array([s["probability"] for s in scores]) - prob).max() < 1e-5
    ours = np.array([s["attention"] for s in scores])
    assert ours.shape == (10, len(expected))
    assert np.abs(ours - att).max() < 1e-5
    for s in scores:
        assert f"{s['probability']:.4f}  {s['item_id']}" in printed

    # the picture: a real image with many colours (a heatmap, labels), not a blank canvas
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 200
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is not None and len(colours) > 50


def test_explain_names_the_candidates_it_is_given(model_repository: Path, tmp_path: Path) -> None:
    run = model_repository / "runs" / "din"
    out = tmp_path / "given.png"
    main(["--run", str(run), "--user", USER, "--candidates", "i3,i5,not-an-item", "--out", str(out)])
    answer = json.loads(out.with_suffix(".json").read_text())
    assert [s["item_id"] for s in answer["scores"]] == ["i3", "i5", "not-an-item"]
    assert answer["scores"][2]["category_id"] is None  # unknown to the run: scored as OOV, as the service does
    assert all(0 < s["probability"] < 1 for s in answer["scores"])
    assert out.is_file()


def test_explain_refuses_an_unknown_user_and_a_run_without_checkpoint(model_repository: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="user 'nobody' is not in the run's data"):
        main(["--run", str(model_repository / "runs" / "din"), "--user", "nobody", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match=r"no checkpoint\.pt"):
        main(["--run", str(tmp_path), "--user", USER])


@pytest.mark.skipif("dsin" not in MODELS, reason="DSIN arrives with the wt-dsin branch (issue 17)")
def test_explain_divides_a_dsin_history_into_sessions(tmp_path: Path) -> None:
    synthetic = {"n_users": 60, "n_items": 80, "n_categories": 6, "min_events": 20, "max_events": 30, "seed": 2}
    run = tmp_path / "dsin"
    cfg = TrainConfig(
        model="dsin",
        dataset="synthetic",
        synthetic={**synthetic, "session_events": 5},  # planted sessions: gaps of more than 30 minutes between them
        out=str(run),
        epochs=1,
        max_steps=3,  # the numbers need a trained checkpoint, not a good one
        eval_users=5,
        max_len=20,
        batch_size=64,
        progress=False,
    )
    train(cfg)
    out = tmp_path / "dsin.png"
    main(["--run", str(run), "--user", "u1", "--out", str(out)])
    answer = json.loads(out.with_suffix(".json").read_text())
    history, sessions = answer["history"], answer["sessions"]
    assert sessions and out.is_file()
    # most recent session first, each a run of consecutive history indices (most recent first) cut to the T
    # most recent: no gap over the model's session gap inside a session, one between a session and the next
    model, _ = load_checkpoint(run)
    spec = model.cfg.session_spec
    times = [h["timestamp"] for h in history]
    for members in sessions:
        assert members == list(range(members[0], members[0] + len(members))) and len(members) <= spec.length
        assert all(0 <= times[j] - times[j + 1] <= spec.gap for j in members[:-1])
    for newer, older in itertools.pairwise(sessions):
        assert any(times[j] - times[j + 1] > spec.gap for j in range(newer[-1], older[0]))
    assert any(len(m) > 1 for m in sessions) and len(sessions) > 1  # the planted sessions were found
    covered = {j for members in sessions for j in members}
    for s in answer["scores"]:
        assert len(s["session_weights"]) == len(sessions)
        assert sum(s["session_weights"]) == pytest.approx(1, abs=1e-5)  # a softmax over the sessions present
        assert sum(s["attention"]) == pytest.approx(1, abs=1e-5)  # session weight × share inside the session
        assert all(a == 0 for j, a in enumerate(s["attention"]) if j not in covered)  # not in a kept session
