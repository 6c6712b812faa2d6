"""Faults under steady load, against the real server process and a real, durable Redis.

While clients keep scoring and appending events: Redis is killed and restarted, a new model version is
exported and swapped in by polling, and a corrupt version is published. Allowed: /score answers flagged
``degraded`` while Redis is down, and /events refused with 503 (nothing claimed stored). Not allowed: any
other failure, an event acknowledged with 2xx that is missing from Redis afterwards, or an unhealthy end.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis

from app.store import decode_stored
from tests.conftest import RedisServer, service, service_env, wait_for
from training.export import export_run

ROOT = Path(__file__).resolve().parents[2]
USERS = 400  # events spread so no user reaches HISTORY_CAP: every acknowledged event must still be there


class Load:
    """Client threads: scorers and an event writer, each recording every answer."""

    def __init__(self, url: str) -> None:
        self.url, self.stop = url, threading.Event()
        self.score_codes: Counter[int] = Counter()
        self.degraded = 0
        self.healthy = 0  # scores answered 200 from the store (not degraded)
        self.versions: Counter[str] = Counter()
        self.event_codes: Counter[int] = Counter()
        self.acknowledged: Counter[str] = Counter()  # user → events answered 2xx
        self.refused: Counter[str] = Counter()  # user → events answered 503
        self.threads = [threading.Thread(target=self._score, args=(i,)) for i in range(3)]
        self.threads.append(threading.Thread(target=self._events))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def _score(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            n = 0
            candidates = [{"item_id": f"i{j}"} for j in range(50)]
            while not self.stop.is_set():
                r = client.post("/score", json={"user_id": f"u{(worker * 7919 + n) % USERS}", "candidates": candidates})
                self.score_codes[r.status_code] += 1
                if r.status_code == 200:
                    answer = r.json()
                    self.degraded += answer["degraded"]
                    self.healthy += not answer["degraded"]
                    self.versions[answer["version"]] += 1
                n += 1

    def _events(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            n = 0
            while not self.stop.is_set():
                users = [f"u{(n * 3 + k) % USERS}" for k in range(3)]
                r = client.post("/events", json={"events": [{"user_id": u, "item_id": f"i{n % 100}"} for u in users]})
                self.event_codes[r.status_code] += 1
                for u in users:
                    (self.acknowledged if r.status_code == 200 else self.refused)[u] += 1
                n += 1
                time.sleep(0.002)


def test_redis_restart_new_version_and_corrupt_version_under_load(model_repository: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "repo", repo)
    store = RedisServer(tmp_path / "redis", durable=True)
    env = service_env(repo, store.url, MODEL_POLL_INTERVAL_S="0.2", STORE_TIMEOUT_MS="200", REQUEST_TIMEOUT_MS="5000")
    with store, service(env, ROOT) as url:

        def din() -> dict[str, Any]:
            models = httpx.get(f"{url}/models", timeout=10).json()["models"]
            return next(m for m in models if m["name"] == "din")

        with Load(url) as load:
            # each phase lasts until the load has seen it, not a fixed time: a loaded machine only slows it
            wait_for(lambda: load.healthy >= 20 and load.event_codes[200] >= 20, "load on a healthy service")
            store.stop()  # SIGKILL
            wait_for(lambda: load.degraded >= 5 and load.event_codes[503] >= 5, "the outage seen by the load")
            healthy, acknowledged = load.healthy, load.event_codes[200]
            store.start()  # same port and directory: the append-only file is replayed
            wait_for(lambda: load.healthy >= healthy + 20 and load.event_codes[200] >= acknowledged + 20, "recovery")
            export_run(model_repository / "runs" / "din", repo, name="din")  # v2, picked up by polling
            wait_for(lambda: din()["primary"] == "2", "v2 swapped in")
            broken = repo / "din" / ".staging-broken"
            shutil.copytree(repo / "din" / "2", broken)
            (broken / "model.onnx").write_bytes(b"\x08\x07corrupt")
            broken.rename(repo / "din" / "3")
            wait_for(lambda: (din()["last_error"] or {}).get("version") == "3", "v3 refused")
            on_v2 = load.versions["2"]
            wait_for(lambda: load.versions["2"] >= on_v2 + 20, "scores on v2 after v3 was refused")

        # scoring: only 200s; degraded exactly while Redis was away
        assert set(load.score_codes) == {200}, load.score_codes
        assert 0 < load.degraded < sum(load.score_codes.values())
        assert load.versions["1"] > 0 and load.versions["2"] > 0 and "3" not in load.versions
        # events: 200 or an explicit 503, and every acknowledged one is in Redis
        assert set(load.event_codes) <= {200, 503}, load.event_codes
        assert load.event_codes[503] > 0 and load.event_codes[200] > 0
        with redis.Redis(port=store.port) as client:
            stored = {u: len(decode_stored(client.get(f"ctr:hist:{u}"))) for u in {*load.acknowledged, *load.refused}}
        lost = {u: (load.acknowledged[u], n) for u, n in stored.items() if n < load.acknowledged[u]}
        assert not lost, f"acknowledged events missing from Redis (user: (acknowledged, stored)): {lost}"
        assert all(n <= load.acknowledged[u] + load.refused[u] for u, n in stored.items())
        # the service ends healthy, on v2, with v3's failure visible
        assert httpx.get(f"{url}/readyz").status_code == 200
        status = din()
        assert status["primary"] == "2" and status["last_error"]["version"] == "3"
        scores, events, versions = sum(load.score_codes.values()), dict(load.event_codes), dict(load.versions)
        print(f"faults: {scores} scores ({load.degraded} degraded), events {events}, versions {versions}")
