"""The served loop end to end on a real service and Redis: simulated users of the synthetic world score and click,
the log becomes served samples whose histories are those of the /score answers, v2 is trained on v1's log and
serves a split (which repository polling does not promote), and the report shows each version's online CTR."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import redis

from impressions import IMPRESSIONS_STREAM
from tests.conftest import SERVICE_SYNTHETIC, service, service_env, wait_for
from training.datasets import SyntheticConfig
from training.loop import LoopConfig, run_round
from training.served import Consumer, ConsumerConfig
from training.service_client import ServiceClient
from training.simulate import World, simulate

ROOT = Path(__file__).resolve().parents[2]
WINDOW_MS = 300


def _logged(redis_url: str, n: int) -> None:
    """Wait for the service's background writer to have put ``n`` impressions in the stream."""
    with redis.Redis.from_url(redis_url) as client:
        wait_for(lambda: client.xlen(IMPRESSIONS_STREAM) >= n, f"{n} impressions in the stream", timeout=30)


def _close_windows(client: ServiceClient, world: World) -> str:
    """One more /score after the window: its record moves the log's clock past every earlier window (its own
    stays open). Returns the version that answered it."""
    time.sleep(WINDOW_MS / 1e3 + 0.2)
    item = str(world.items[0])
    return str(client.request("POST", "/score", {"user_id": "clock", "candidates": [{"item_id": item}]})["version"])


def test_served_history_is_the_score_answers(repo: Path, redis_url: str, tmp_path: Path) -> None:
    world = World(SyntheticConfig(**SERVICE_SYNTHETIC))
    answers: list[dict[str, Any]] = []
    with service(service_env(repo, redis_url), ROOT) as url, ServiceClient(url) as client:
        simulate(client, world, visits=40, users=15, candidates=8, shown=2, seed_history=12, answers=answers)
        _close_windows(client, world)
        _logged(redis_url, 41)
    out = tmp_path / "served"
    stats = Consumer(ConsumerConfig(redis_url, out, window_ms=WINDOW_MS)).run_once()
    assert stats.impressions_written == 40 and stats.samples_written == 40 * 8

    rows = pq.read_table(out).to_pylist()
    by_impression: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_impression.setdefault(r["impression_id"], []).append(r)
    assert set(by_impression) == {a["impression_id"] for a in answers}
    for a in answers:
        mine = sorted(by_impression[a["impression_id"]], key=lambda r: r["position"])
        history = [(h["item_id"], h["category_id"], h.get("label")) for h in a["history"]]
        assert history, "seeded users have a history"
        for r in mine:  # every candidate's row holds the answer's history, field for field, in its order
            assert list(zip(r["hist_items"], r["hist_cats"], r["hist_labels"], strict=True)) == history
            assert (r["model"], r["version"], r["user_id"]) == (a["model"], a["version"], a["user_id"])
        assert [(r["item_id"], r["probability"]) for r in mine] == [
            (s["item_id"], s["probability"]) for s in a["scores"]
        ]
        assert sum(r["label"] for r in mine) <= 2  # only the shown two can be clicked


def test_loop_end_to_end(repo: Path, redis_url: str, tmp_path: Path) -> None:
    world = World(SyntheticConfig(**SERVICE_SYNTHETIC))
    env = service_env(repo, redis_url, MODEL_POLL_INTERVAL_S="0.3")
    with service(env, ROOT) as url, ServiceClient(url) as client:
        # v1 serves; its log trains v2, which then serves half of the users
        first = simulate(client, world, visits=150, users=60, candidates=10, shown=3, seed_history=15)
        assert set(first.versions) == {"1"}
        clock = _close_windows(client, world)
        _logged(redis_url, 151)
        cfg = LoopConfig(
            redis_url, url, repo, "din", tmp_path / "loop", window_ms=WINDOW_MS, percent=50, epochs=1, min_samples=50
        )
        report = run_round(cfg)
        new = report["new_version"]
        assert new["version"] == 2 and new["split"] == {"version": "2", "percent": 50.0} and new["primary"] == "1"
        assert new["warm_start"] is not None  # from v1's run: its checkpoint is on this machine
        assert report["consumed"]["impressions_written"] == 150

        # polling sees v2 in the repository but leaves the pinned v1 primary: v2 stays a split
        time.sleep(1.0)
        status = next(m for m in client.request("GET", "/models")["models"] if m["name"] == "din")
        assert (status["primary"], status["split"]) == ("1", {"version": "2", "percent": 50.0})

        second = simulate(client, world, visits=150, users=60, candidates=10, shown=3, seed_history=0, seed=1)
        assert set(second.versions) == {"1", "2"}
        _close_windows(client, world)
        _logged(redis_url, 302)
        report = run_round(LoopConfig(redis_url, url, repo, "din", tmp_path / "loop", window_ms=WINDOW_MS, train=False))

        # an admin promotes v2
        client.request("POST", "/admin/models/din/load", {"version": 2})
        status = next(m for m in client.request("GET", "/models")["models"] if m["name"] == "din")
        assert status["primary"] == "2" and status["split"] is None

    ctr = {r["version"]: r for r in report["online_ctr"]}
    assert set(ctr) == {"1", "2"}
    impressions, clicks = Counter({clock: 1}), Counter[str]()  # the first clock impression is closed by now
    for run in (first, second):
        for v, tally in run.versions.items():
            impressions[v] += tally.impressions
            clicks[v] += tally.clicks
    for v in ("1", "2"):  # the log's CTR is the simulator's own count: every impression and click joined
        assert (ctr[v]["impressions"], ctr[v]["clicks"]) == (impressions[v], clicks[v])
        assert 0 < ctr[v]["clicks_per_impression"] <= 3
    # side by side since v2 began serving: v2's impressions all, v1's from that moment on
    split = {r["version"]: r for r in report["split_ctr"]["versions"]}
    assert split["2"]["impressions"] == second.versions["2"].impressions
    assert 0 < split["1"]["impressions"] <= second.versions["1"].impressions
    assert (tmp_path / "loop" / "report.json").is_file()
