"""Export: a versioned repository whose DIN/DIEN/base graphs match PyTorch, published atomically."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import training.export as export
from training.config import TrainConfig
from training.export import ExportError, GraphSpec, export_run, random_inputs, torch_reference
from training.train import load_checkpoint, train

SMALL = {"n_users": 300, "n_items": 150, "n_categories": 8, "min_events": 15, "max_events": 30, "seed": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in ("base", "din", "dien"):
        cfg = TrainConfig(
            dataset="synthetic",
            synthetic=SMALL,
            model=kind,
            out=str(root / kind),
            epochs=1,
            max_len=12,
            batch_size=128,
            progress=False,
            cache_dir=str(root / "cache"),
        )
        train(cfg)
        out[kind] = root / kind
    return out


def _spec(meta: dict) -> GraphSpec:  # type: ignore[type-arg]
    return GraphSpec.from_metadata(meta)


@pytest.mark.parametrize("kind", ["base", "din", "dien"])
def test_export_publishes_a_version_that_matches_pytorch(kind: str, runs: dict[str, Path], tmp_path: Path) -> None:
    folder, meta = export_run(runs[kind], tmp_path)
    assert folder == tmp_path / kind / "1"
    # production files only: benchmark graphs are built by bench.inprocess from the checkpoint
    expected = {"model.onnx", "metadata.json", "vocab.json", "selfcheck.npz"} | (
        {"model_cuda.onnx"} if kind == "din" else set()
    )
    assert {p.name for p in folder.iterdir()} == expected
    assert set(meta["files"].values()) == expected - {"metadata.json"}
    on_disk = json.loads((folder / "metadata.json").read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert on_disk["version"] == 1 and on_disk["model_type"] == kind and on_disk["max_history"] == 12
    assert on_disk["parity"]["cases"] >= 10
    assert on_disk["parity"]["max_abs_diff_probability"] <= 1e-5
    assert on_disk["parity"]["max_abs_diff_attention"] <= 1e-5
    assert on_disk["selfcheck"] == {"file": "selfcheck.npz", "candidates": 58, "tolerance": 1e-4}
    assert [i["name"] for i in on_disk["inputs"]] == [
        "hist_items",
        "hist_cats",
        "hist_mask",
        "user_feats",
        "cand_items",
        "cand_cats",
        "cand_user",
    ]
    assert on_disk["vocabulary"]["oov_index"] == 1 and on_disk["vocabulary"]["user_features"] == ["segment"]
    vocab = json.loads((folder / "vocab.json").read_text())
    assert set(vocab["item_category"]) == set(vocab["items"])
    assert not [p for p in (tmp_path / kind).iterdir() if p.name.startswith(".")]  # no staging left behind

    # independently of the exporter's own check: new shapes, an empty history, padding
    model, _ = load_checkpoint(runs[kind])
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    feed = random_inputs(rng, _spec(on_disk), [0, 3, 12, 7], [5, 1, 300, 40], width=15)
    prob, att = sess.run(None, feed)
    ref_p, ref_a = torch_reference(model, feed)
    assert prob.shape == (346,) and att.shape == (346, 15)
    np.testing.assert_allclose(prob, ref_p, atol=1e-5)
    np.testing.assert_allclose(att, ref_a, atol=1e-5)
    if kind == "din":  # the CUDA form: the same answers, and nothing that makes the GPU wait for the host
        assert on_disk["parity"]["cuda_graph_max_abs_diff"] <= 1e-5
        graph = onnx.load(str(folder / "model_cuda.onnx")).graph
        assert not {n.op_type for n in graph.node} & {"If", "Loop", "ReduceMax", "ScatterElements"}
        cuda_form = ort.InferenceSession(str(folder / "model_cuda.onnx"), providers=["CPUExecutionProvider"])
        p_cuda, a_cuda = cuda_form.run(None, feed)
        np.testing.assert_allclose(p_cuda, ref_p, atol=1e-5)
        np.testing.assert_allclose(a_cuda, ref_a, atol=1e-5)
    assert np.isfinite(prob).all()
    assert (att[~feed["hist_mask"][feed["cand_user"]]] == 0).all()
    # a new visitor gets the model's no-history score, the same whatever padding width is used
    empty = feed["cand_user"] == 0
    feed2 = random_inputs(rng, _spec(on_disk), [0], [1], width=1)
    feed2.update(
        cand_items=feed["cand_items"][empty],
        cand_cats=feed["cand_cats"][empty],
        cand_user=np.zeros(int(empty.sum()), dtype=np.int64),
        user_feats=feed["user_feats"][:1],
    )
    np.testing.assert_allclose(sess.run(["probability"], feed2)[0], prob[empty], atol=1e-6)


def test_versions_count_up_and_are_immutable(runs: dict[str, Path], tmp_path: Path) -> None:
    first, _ = export_run(runs["din"], tmp_path, name="ctr")
    second, meta = export_run(runs["din"], tmp_path, name="ctr")
    assert (first.name, second.name, meta["version"]) == ("1", "2", 2)
    explicit, _ = export_run(runs["din"], tmp_path, name="ctr", version=7)
    assert explicit.name == "7"
    assert export_run(runs["din"], tmp_path, name="ctr")[0].name == "8"
    with pytest.raises(ExportError, match="already exists"):
        export_run(runs["din"], tmp_path, name="ctr", version=2)
    assert sorted(p.name for p in (tmp_path / "ctr").iterdir()) == ["1", "2", "7", "8"]


def test_export_refuses_to_publish_when_parity_fails(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def off_by_a_little(model: torch.nn.Module, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        p, a = torch_reference(model, feed)  # type: ignore[arg-type]
        return p + 1e-4, a

    monkeypatch.setattr(export, "torch_reference", off_by_a_little)
    with pytest.raises(ExportError, match="disagree"):
        export_run(runs["din"], tmp_path)
    assert list((tmp_path / "din").iterdir()) == []  # nothing published, no staging left


def test_cli_prints_the_parity_report(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # type: ignore[type-arg]
    export.main(["--run", str(runs["dien"]), "--repository", str(tmp_path), "--name", "dien-a"])
    out = capsys.readouterr().out
    assert "published" in out and "max |Δp|" in out
    assert (tmp_path / "dien-a" / "1" / "model.onnx").exists()


def test_int8_quantisation_reports_auc_change_and_speedup(runs: dict[str, Path], tmp_path: Path) -> None:
    folder, meta = export_run(runs["din"], tmp_path, quantize="int8")
    q = meta["quantization"]
    assert q["type"] == "int8-dynamic"
    assert 0.5 < q["test_auc_int8"] <= 1 and abs(q["test_auc_change"]) < 0.05
    assert q["speedup"] > 0 and q["latency_ms_fp32"] > 0
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in __import__("onnx").load(str(folder / "model.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    feed = random_inputs(np.random.default_rng(0), _spec(meta), [5], [10])
    assert np.isfinite(sess.run(["probability"], feed)[0]).all()


def test_export_of_a_run_without_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no checkpoint\.pt; train first"):
        export_run(tmp_path / "nothing-here", tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("kind", ["din", "dien"])
def test_a_model_with_history_feedback_exports_its_feedback_input(kind: str, tmp_path: Path) -> None:
    cfg = TrainConfig(
        dataset="synthetic",
        synthetic=SMALL,
        model=kind,
        out=str(tmp_path / "run"),
        epochs=1,
        max_len=12,
        batch_size=128,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        model_options={"history_feedback": True},
    )
    metrics = train(cfg).metrics
    # the test split scored as for a caller that sends no labels: every behaviour's feedback unknown
    assert set(metrics["without_feedback"]) >= {"auc", "gauc", "logloss"}
    assert metrics["without_feedback"]["logloss"] != metrics["logloss"]
    folder, meta = export_run(tmp_path / "run", tmp_path / "repo")
    assert [i["name"] for i in meta["inputs"]][-1] == "hist_feedback"
    assert meta["history_feedback"]["input"] == "hist_feedback"
    assert max(meta["parity"]["max_abs_diff_probability"], meta["parity"]["max_abs_diff_attention"]) <= 1e-5
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in sess.get_inputs()} >= {"hist_feedback"}
    model, _ = load_checkpoint(tmp_path / "run")
    feed = random_inputs(np.random.default_rng(3), _spec(meta), [0, 12, 5], [4, 60, 9])
    prob, att = sess.run(None, feed)
    ref_p, ref_a = torch_reference(model, feed)
    np.testing.assert_allclose(prob, ref_p, atol=1e-5)
    np.testing.assert_allclose(att, ref_a, atol=1e-5)
    flipped = {**feed, "hist_feedback": np.where(feed["hist_mask"], 5 - feed["hist_feedback"].clip(2), 0)}
    assert not np.allclose(sess.run(["probability"], flipped)[0], prob)  # liked ↔ not liked changes the scores


def test_dsin_exports_its_session_inputs_and_matches_pytorch_on_every_session_case(tmp_path: Path) -> None:
    """DSIN's graph takes each user's session division and answers the session weights; the export's own
    parity check covers no session, one-behaviour sessions, the full K × T layout and several users per call."""
    from training.export import session_parity_cases

    cfg = TrainConfig(
        dataset="synthetic",
        synthetic={**SMALL, "n_users": 150, "session_events": 4},  # small: the check is parity, not accuracy
        model="dsin",
        out=str(tmp_path / "run"),
        epochs=1,
        max_steps=10,
        max_len=12,
        batch_size=128,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        model_options={"sessions": 3, "session_length": 4, "session_heads": 4, "session_chunks": True},
    )
    train(cfg)
    folder, meta = export_run(tmp_path / "run", tmp_path / "repo")
    assert [i["name"] for i in meta["inputs"]][-2:] == ["sess_index", "sess_mask"]
    assert meta["sessions"]["chunked"] is True  # the service divides a long session as training did
    assert [o["name"] for o in meta["outputs"]] == ["probability", "attention", "session_weights"]
    assert meta["sessions"]["sessions"] == 3 and meta["sessions"]["length"] == 4
    assert meta["sessions"]["gap_seconds"] == 1800 and meta["attention"] == "softmax"
    parity = meta["parity"]
    assert parity["cases"] == 12 + len(session_parity_cases(_spec(meta).sessions))  # type: ignore[arg-type]
    assert max(parity["max_abs_diff_probability"], parity["max_abs_diff_session_weights"]) <= 1e-5
    assert parity["max_abs_diff_attention"] <= 1e-5
    # independently: the session edge cases at another width, all at once
    model, _ = load_checkpoint(tmp_path / "run")
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    styles = ["mixed", "singletons", "full", "full", "mixed"]
    feed = random_inputs(np.random.default_rng(5), _spec(meta), [0, 2, 12, 9, 5], [3, 4, 100, 6, 2], 15, styles)
    assert feed["sess_mask"][2].all() and feed["sess_mask"][1].sum(-1).tolist() == [1, 1, 0]
    prob, att, weights = sess.run(None, feed)
    ref = torch_reference(model, feed)
    for got, want in zip((prob, att, weights), ref, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert weights.shape == (115, 3) and att.shape == (115, 15)
    no_history = feed["cand_user"] == 0
    assert (weights[no_history] == 0).all() and (att[no_history] == 0).all()
    np.testing.assert_allclose(att.sum(-1)[~no_history], 1.0, atol=1e-5)  # session weight × share sums to 1
