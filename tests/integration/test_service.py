"""The real app (lifespan, routes, batcher, ONNX Runtime) against a real redis-server of its own."""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import interpreter
from app.main import create_app
from app.scorer import ModelLoadError, latest_version, load_version
from app.settings import Settings
from tests.conftest import RedisServer
from training.export import torch_reference
from training.train import load_checkpoint


@pytest.fixture
def client(model_repository: Path, redis_url: str) -> Iterator[TestClient]:
    settings = Settings(
        model_repository=model_repository / "repo",
        default_model="din",
        redis_url=redis_url,
        store_timeout_ms=200,
        max_body_bytes=200_000,
    )
    with TestClient(create_app(settings)) as c:
        yield c


def _vocab(model_repository: Path, name: str = "din") -> dict:  # type: ignore[type-arg]
    return json.loads((model_repository / "repo" / name / "1" / "vocab.json").read_text())


def _reference(model_repository: Path, name: str, history: list[str], candidates: list[str]) -> tuple:  # type: ignore[type-arg]
    """Probabilities and attention computed independently: PyTorch training form, vocab by dict lookup."""
    vocab = _vocab(model_repository, name)
    item_idx = {v: i + 2 for i, v in enumerate(vocab["items"])}
    cat_idx = {v: i + 2 for i, v in enumerate(vocab["categories"])}
    cat_of = vocab["item_category"]
    oldest_first = history[::-1]
    n = max(1, len(history))
    feed = {
        "hist_items": np.array([[item_idx.get(i, 1) for i in oldest_first] + [0] * (n - len(history))]),
        "hist_cats": np.array([[cat_idx.get(cat_of.get(i, ""), 1) for i in oldest_first] + [0] * (n - len(history))]),
        "hist_mask": np.array([[True] * len(history) + [False] * (n - len(history))]),
        "user_feats": np.array([[1] * len(vocab["user_features"])]),
        "cand_items": np.array([item_idx.get(i, 1) for i in candidates]),
        "cand_cats": np.array([cat_idx.get(cat_of.get(i, ""), 1) for i in candidates]),
        "cand_user": np.zeros(len(candidates), dtype=np.int64),
    }
    model, _ = load_checkpoint(model_repository / "runs" / name)
    p, a = torch_reference(
        model, {k: v.astype(bool) if k == "hist_mask" else v.astype(np.int64) for k, v in feed.items()}
    )
    return p, a[:, : len(history)][:, ::-1]  # most recent first, like the API


def test_events_then_score_reads_them_back_with_exact_values(client: TestClient, model_repository: Path) -> None:
    items = _vocab(model_repository)["items"]
    history = items[:6]  # sent oldest first by timestamp; the API answers most recent first
    r = client.post(
        "/events",
        json={"events": [{"user_id": "42", "item_id": i, "timestamp": 100 + t} for t, i in enumerate(history)]},
    )
    assert r.status_code == 200 and r.json() == {"stored": 6}
    stored = client.get("/users/42/history").json()
    assert [h["item_id"] for h in stored["history"]] == history[::-1]
    assert [h["timestamp"] for h in stored["history"]] == [105, 104, 103, 102, 101, 100]

    candidates = items[10:40]
    r = client.post("/score", json={"user_id": 42, "candidates": [{"item_id": c} for c in candidates]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "din" and body["version"] == "1" and body["user_id"] == "42"
    assert body["history_source"] == "store" and body["degraded"] is False
    assert [h["item_id"] for h in body["history"]] == history[::-1]
    assert all(h["category_id"] == _vocab(model_repository)["item_category"][h["item_id"]] for h in body["history"])
    assert [s["item_id"] for s in body["scores"]] == candidates
    p_ref, a_ref = _reference(model_repository, "din", history[::-1], candidates)
    np.testing.assert_allclose([s["probability"] for s in body["scores"]], p_ref, atol=1e-5)
    np.testing.assert_allclose([s["attention"] for s in body["scores"]], a_ref, atol=1e-5)


def test_request_history_replaces_the_store_and_is_truncated(client: TestClient, model_repository: Path) -> None:
    items = _vocab(model_repository, "dien")["items"]
    client.post("/events", json={"events": [{"user_id": "u", "item_id": items[0]}]})
    history = items[:30]  # max_history is 20: the 20 most recent are used
    candidates = [{"item_id": items[50]}, {"item_id": "never-seen", "category_id": "c1"}]
    hist = [{"item_id": i} for i in history]
    r = client.post("/score", json={"user_id": "u", "model": "dien", "history": hist, "candidates": candidates})
    body = r.json()
    assert r.status_code == 200 and body["history_source"] == "request" and body["model"] == "dien"
    assert [h["item_id"] for h in body["history"]] == history[:20]
    assert all(len(s["attention"]) == 20 for s in body["scores"])
    p_ref, a_ref = _reference(model_repository, "dien", history[:20], [items[50]])
    assert body["scores"][0]["probability"] == pytest.approx(float(p_ref[0]), abs=1e-5)
    np.testing.assert_allclose(body["scores"][0]["attention"], a_ref[0], atol=1e-5)
    assert 0 < body["scores"][1]["probability"] < 1  # an unknown item is scored, not refused
    metrics = client.get("/metrics").text
    assert 'ctr_unknown_ids_total{kind="item"} 1.0' in metrics


def test_new_visitor_without_history(client: TestClient, model_repository: Path) -> None:
    items = _vocab(model_repository)["items"]
    r = client.post(
        "/score", json={"user_id": "nobody", "candidates": [{"item_id": items[3]}], "return_attention": False}
    )
    body = r.json()
    assert body["history_source"] == "none" and body["history"] == [] and body["scores"][0]["attention"] is None
    p_ref, _ = _reference(model_repository, "din", [], [items[3]])
    assert body["scores"][0]["probability"] == pytest.approx(float(p_ref[0]), abs=1e-5)


@pytest.mark.parametrize(
    ("payload", "status", "field"),
    [
        ({"user_id": "u", "candidates": []}, 422, "candidates"),
        ({"user_id": "u", "candidates": [{"item_id": "a"}] * 1001}, 422, "candidates"),
        ({"user_id": "u" * 129, "candidates": [{"item_id": "a"}]}, 422, "user_id"),
        ({"user_id": "u", "candidates": [{"item_id": 1.5}]}, 422, "item_id"),
        ({"user_id": "u", "candidates": [{"item_id": "a\u001fb"}]}, 422, "item_id"),
        ({"user_id": "u", "candidates": [{"item_id": "a"}], "return_attention": "maybe"}, 422, "return_attention"),
        ({"candidates": [{"item_id": "a"}]}, 422, "user_id"),
        ({"user_id": "u", "candidates": [{"item_id": "a"}], "model": "nope"}, 404, "model"),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(client: TestClient, payload: dict, status: int, field: str) -> None:  # type: ignore[type-arg]
    r = client.post("/score", json=payload)
    assert r.status_code == status, r.text
    assert field in r.text


@pytest.mark.parametrize("bad", [True, 1.5, "", "a\u0000", "x" * 129, None, {"id": 1}])
def test_a_bad_id_is_one_error_at_its_field(client: TestClient, bad: object) -> None:
    """Every way an id can be wrong gives one error, located at the field and saying what an id is."""
    r = client.post("/score", json={"user_id": "u", "candidates": [{"item_id": "a"}, {"item_id": bad}]})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "candidates", 1, "item_id"] and error["type"] == "id_type"
    assert "string of 1 to 128 characters" in error["msg"]


def test_malformed_json_and_oversized_bodies(client: TestClient) -> None:
    r = client.post("/score", content=b'{"user_id": "u", "candidates": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "json" in r.text.lower()
    big = {"user_id": "u", "candidates": [{"item_id": "x" * 100}] * 1000, "history": [{"item_id": "y" * 100}] * 900}
    r = client.post("/score", json=big)
    assert r.status_code == 413


def test_models_health_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    models = client.get("/models").json()
    assert models["default"] == "din"
    assert {m["name"] for m in models["models"]} == {"din", "dien"}
    for m in models["models"]:
        assert m["primary"] == "1" and m["split"] is None and m["pinned"] is False and m["published"] == [1]
        (v,) = m["versions"]
        assert v["role"] == "primary" and v["provider"] == "CPUExecutionProvider" and v["max_history"] == 20
        assert v["graph"] == "model.onnx"
        assert v["self_check_max_abs_diff"] is not None and v["self_check_max_abs_diff"] <= 1e-4
    client.post("/score", json={"user_id": "u", "candidates": [{"item_id": "a"}]})
    text = client.get("/metrics").text
    info = 'ctr_model_info{model="din",provider="CPUExecutionProvider",role="primary",version="1"} 1.0'
    for name in (
        "ctr_requests_total",
        "ctr_request_latency_seconds_bucket",
        "ctr_batch_candidates_bucket",
        "ctr_inference_seconds_count",
        "ctr_queue_depth",
        info,
        'ctr_scored_requests_total{model="din",version="1"} 1.0',
    ):
        assert name in text, name
    assert 'ctr_requests_total{endpoint="/score",status="200"} 1.0' in text


def test_redis_outage_degrades_scoring_refuses_writes_and_recovers(
    client: TestClient, redis_server: RedisServer, model_repository: Path
) -> None:
    items = _vocab(model_repository)["items"]
    assert client.post("/events", json={"events": [{"user_id": "r", "item_id": items[1]}]}).status_code == 200
    redis_server.stop()
    try:
        r = client.post("/score", json={"user_id": "r", "candidates": [{"item_id": items[2]}]})
        assert r.status_code == 200 and r.json()["degraded"] is True and r.json()["history_source"] == "none"
        r = client.post(
            "/score", json={"user_id": "r", "candidates": [{"item_id": items[2]}], "history": [{"item_id": items[1]}]}
        )
        assert r.status_code == 200 and r.json()["history_source"] == "request"
        r = client.post("/events", json={"events": [{"user_id": "r", "item_id": items[3]}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        r = client.get("/users/r/history")
        assert r.status_code == 503 and "behaviour store unavailable" in r.text
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "behaviour store" in ready.json()["reasons"][0]
        assert 'ctr_store_errors_total{operation="write"} 1.0' in client.get("/metrics").text
    finally:
        redis_server.start()
    assert client.get("/readyz").status_code == 200
    assert client.post("/events", json={"events": [{"user_id": "r2", "item_id": items[3]}]}).status_code == 200
    r = client.post("/score", json={"user_id": "r2", "candidates": [{"item_id": items[2]}]})
    assert r.json()["degraded"] is False and r.json()["history_source"] == "store"


def test_openapi_is_generated_from_the_schemas(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/score", "/events", "/users/{user_id}/history", "/readyz", "/models"} <= set(spec["paths"])
    score = spec["components"]["schemas"]["ScoreRequest"]
    assert score["properties"]["candidates"]["maxItems"] == 1000


def _slow_app(model_repository: Path, redis_url: str, **overrides: object) -> TestClient:
    settings = Settings(
        model_repository=model_repository / "repo", default_model="din", redis_url=redis_url, **overrides
    )  # type: ignore[arg-type]
    return TestClient(create_app(settings))


def _slow_down(client: TestClient, seconds: float) -> None:
    """Make the din batcher's runs slow, as under heavy load."""
    import time as _time

    batcher = client.app.state.components.registry.resolve("din", None, "").batcher  # type: ignore[attr-defined]
    run = batcher._run

    def slow(items):  # type: ignore[no-untyped-def]
        _time.sleep(seconds)
        return run(items)

    batcher._run = slow


def test_overload_is_refused_at_once_with_retry_after(model_repository: Path, redis_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with _slow_app(model_repository, redis_url, queue_limit=2, max_queue_delay_ms=0, max_batch_candidates=1) as c:
        _slow_down(c, 0.3)
        body = {"user_id": "o", "candidates": [{"item_id": "a"}], "history": []}
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(lambda _: c.post("/score", json=body), range(12)))
        codes = sorted(r.status_code for r in responses)
        assert codes.count(503) >= 6 and codes.count(200) >= 2, codes
        refused = [r for r in responses if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and "overloaded" in r.text for r in refused)
        assert c.get("/healthz").status_code == 200


def test_requests_past_the_timeout_get_504(model_repository: Path, redis_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with _slow_app(
        model_repository, redis_url, request_timeout_ms=150, max_queue_delay_ms=0, max_batch_candidates=1
    ) as c:
        _slow_down(c, 0.4)
        body = {"user_id": "t", "candidates": [{"item_id": "a"}], "history": []}
        with ThreadPoolExecutor(3) as pool:
            codes = sorted(r.status_code for r in pool.map(lambda _: c.post("/score", json=body), range(3)))
        assert 504 in codes, codes


def test_unknown_fields_are_ignored_and_integer_ids_accepted(client: TestClient, model_repository: Path) -> None:
    items = _vocab(model_repository)["items"]
    r = client.post(
        "/score",
        json={
            "user_id": 7,
            "trace_id": "abc",
            "candidates": [{"item_id": items[0], "bid": 1.25}],
            "user_features": {"segment": 2},
        },
    )
    assert r.status_code == 200 and r.json()["user_id"] == "7"


def test_a_broken_extra_model_is_skipped_and_the_rest_served(model_repository: Path, tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "repo", repo)
    (repo / "dien" / "1" / "model.onnx").write_bytes(b"corrupt")
    with TestClient(create_app(Settings(model_repository=repo, default_model="din"))) as c:
        listed = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert listed["din"]["primary"] == "1"
        assert listed["dien"]["primary"] is None and listed["dien"]["versions"] == []
        assert "ONNX Runtime cannot load" in listed["dien"]["last_error"]["error"]
        r = c.post("/score", json={"user_id": "u", "model": "dien", "candidates": [{"item_id": "a"}]})
        assert r.status_code == 404 and "dien" in r.text
        assert c.post("/score", json={"user_id": "u", "candidates": [{"item_id": "a"}]}).status_code == 200


@pytest.fixture(scope="module")
def feedback_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository whose `din` was trained with history feedback (each behaviour's label)."""
    from tests.conftest import SERVICE_SYNTHETIC
    from training.config import TrainConfig
    from training.export import export_run
    from training.train import train

    root = tmp_path_factory.mktemp("feedback-models")
    cfg = TrainConfig(
        dataset="synthetic",
        synthetic=SERVICE_SYNTHETIC,
        model="din",
        out=str(root / "run"),
        epochs=1,
        max_len=20,
        batch_size=128,
        progress=False,
        cache_dir=str(root / "cache"),
        model_options={"history_feedback": True},
    )
    train(cfg)
    export_run(root / "run", root / "repo")
    return root


def test_stored_labels_reach_a_model_trained_with_history_feedback(feedback_repository: Path, redis_url: str) -> None:
    """Item ids alone (categories from the model's table) with a label per behaviour: /events stores the
    labels, /score feeds them to the graph, and the answer equals PyTorch's on the same feedback."""
    settings = Settings(model_repository=feedback_repository / "repo", default_model="din", redis_url=redis_url)
    vocab = json.loads((feedback_repository / "repo" / "din" / "1" / "vocab.json").read_text())
    items, candidates = vocab["items"][:5], vocab["items"][10:30]
    labels = [1, 0, 1, 1, 0]  # oldest first
    with TestClient(create_app(settings)) as client:
        events = [
            {"user_id": "fb", "item_id": i, "timestamp": 10 + t, "label": y}
            for t, (i, y) in enumerate(zip(items, labels, strict=True))
        ]
        assert client.post("/events", json={"events": events}).json() == {"stored": 5}
        stored = client.get("/users/fb/history").json()["history"]
        assert [(h["item_id"], h["label"]) for h in stored] == list(zip(items, labels, strict=True))[::-1]
        body = client.post("/score", json={"user_id": "fb", "candidates": [{"item_id": c} for c in candidates]}).json()
        assert [h["label"] for h in body["history"]] == labels[::-1]
        served = [s["probability"] for s in body["scores"]]
        # the same history sent in the request, labels flipped or left out, scores differently
        flipped = [{"item_id": i, "label": 1 - y} for i, y in zip(items[::-1], labels[::-1], strict=True)]
        unlabelled = [{"item_id": i} for i in items[::-1]]
        scored = {}
        for name, history in (("flipped", flipped), ("unlabelled", unlabelled)):
            r = client.post(
                "/score", json={"user_id": "x", "history": history, "candidates": [{"item_id": c} for c in candidates]}
            )
            assert r.status_code == 200, r.text
            scored[name] = [s["probability"] for s in r.json()["scores"]]
        assert not np.allclose(served, scored["flipped"]) and not np.allclose(served, scored["unlabelled"])

    item_idx = {v: i + 2 for i, v in enumerate(vocab["items"])}
    cat_idx = {v: i + 2 for i, v in enumerate(vocab["categories"])}
    feed = {
        "hist_items": np.array([[item_idx[i] for i in items]]),
        "hist_cats": np.array([[cat_idx[vocab["item_category"][i]] for i in items]]),
        "hist_mask": np.ones((1, 5), dtype=bool),
        "user_feats": np.ones((1, len(vocab["user_features"])), dtype=np.int64),
        "cand_items": np.array([item_idx[c] for c in candidates]),
        "cand_cats": np.array([cat_idx[vocab["item_category"][c]] for c in candidates]),
        "cand_user": np.zeros(len(candidates), dtype=np.int64),
        "hist_feedback": np.array([[2 + y for y in labels]]),  # FEEDBACK_NEGATIVE + label
    }
    model, _ = load_checkpoint(feedback_repository / "run")
    p_ref, _ = torch_reference(model, feed)
    np.testing.assert_allclose(served, p_ref, atol=1e-5)


def test_labels_are_validated(client: TestClient) -> None:
    r = client.post("/events", json={"events": [{"user_id": "u", "item_id": "i", "label": 2}]})
    assert r.status_code == 422 and "label" in r.text
    r = client.post(
        "/score", json={"user_id": "u", "candidates": [{"item_id": "i"}], "history": [{"item_id": "j", "label": True}]}
    )
    assert r.status_code == 422 and "label" in r.text


@pytest.mark.parametrize("name", ["din", "dien"])
def test_a_batch_of_users_scores_as_each_user_alone(model_repository: Path, name: str) -> None:
    """On CPU the batcher's batch runs one ONNX Runtime call per user (cheaper than one call for all);
    either way each request's answer is its own: the same as one call holding every user, and as the
    request scored alone."""
    vocab = _vocab(model_repository, name)
    model = load_version(latest_version(model_repository / "repo", name), provider="cpu")
    items = vocab["items"]
    batch = [  # users with 0, 3 and 7 behaviours, 5 / 1 / 9 candidates
        model.encode([(i, None, None) for i in items[:n_hist]], None, [(i, None) for i in items[-n_cand:]])
        for n_hist, n_cand in ((0, 5), (3, 1), (7, 9))
    ]
    per_user = model.run(batch)
    one_call = model._run_users(batch)
    for e, (prob, att), (prob_1, att_1) in zip(batch, per_user, one_call, strict=True):
        alone_prob, alone_att = model.run([e])[0]
        assert prob.shape == (e.cand_items.size,) and att.shape == (e.cand_items.size, e.hist_items.size)
        np.testing.assert_allclose(prob, alone_prob, atol=1e-6)
        np.testing.assert_allclose(prob, prob_1, atol=1e-6)
        np.testing.assert_allclose(att, att_1, atol=1e-6)
        np.testing.assert_allclose(att, alone_att, atol=1e-6)
    model.close()


def test_the_interpreter_is_tuned_while_serving_and_restored(model_repository: Path, tmp_path: Path) -> None:
    before, thresholds = sys.getswitchinterval(), gc.get_threshold()
    settings = Settings(model_repository=model_repository / "repo", default_model="din")
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
        assert sys.getswitchinterval() == pytest.approx(interpreter.GIL_SWITCH_INTERVAL_S)
        assert gc.get_threshold() == (interpreter.GC_YOUNG_THRESHOLD, *thresholds[1:])
        assert gc.get_freeze_count() > 10_000  # the loaded models, out of the collector's walks
    assert sys.getswitchinterval() == before
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0
    broken = Settings(model_repository=tmp_path / "empty", default_model="din")
    with pytest.raises(ModelLoadError), TestClient(create_app(broken)):
        pass
    assert sys.getswitchinterval() == before  # a failed start restores it too
    assert gc.get_threshold() == thresholds


def test_on_cuda_a_batch_is_one_call(model_repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-user calls are a CPU choice: on CUDA the whole batch goes to ONNX Runtime at once."""
    model = load_version(latest_version(model_repository / "repo", "din"), provider="cpu")
    items = _vocab(model_repository, "din")["items"]
    batch = [model.encode([(i, None, None) for i in items[:3]], None, [(i, None) for i in items[-4:]])] * 3
    calls: list[int] = []
    real = model._run_users

    def spy(b: list) -> list:  # type: ignore[type-arg]
        calls.append(len(b))
        return real(b)

    monkeypatch.setattr(model, "_run_users", spy)
    model.run(batch)
    assert calls == [1, 1, 1]
    calls.clear()
    monkeypatch.setattr(model, "provider", "CUDAExecutionProvider")
    model.run(batch)
    assert calls == [3]
    model.close()


def test_every_405_lists_every_method_its_path_serves() -> None:
    """Each path of the OpenAPI document (and the undocumented ones), asked with each method it does not serve,
    answers 405 naming all the methods it does: /admin/models/{name}/split serves PUT and DELETE."""
    app = create_app(Settings())  # routing only: no lifespan, nothing loaded
    served = {path: {m.upper() for m in ops} for path, ops in app.openapi()["paths"].items()}
    served |= {
        "/metrics": {"GET"},
        "/openapi.json": {"GET", "HEAD"},
        "/docs": {"GET", "HEAD"},
        "/redoc": {"GET", "HEAD"},
    }
    assert served["/admin/models/{name}/split"] == {"PUT", "DELETE"}
    client = TestClient(app)
    for path, methods in served.items():
        url = path.replace("{name}", "din").replace("{user_id}", "u")
        for method in {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} - methods:
            r = client.request(method, url)
            assert r.status_code == 405, (method, path, r.status_code)
            assert set(r.headers["allow"].split(", ")) == methods, (method, path, r.headers["allow"])
