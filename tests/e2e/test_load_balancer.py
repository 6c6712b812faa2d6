"""Two real scorer replicas sharing a Redis behind the real nginx, with the repository's nginx.conf (only the
upstream addresses and the listen port differ): requests are spread over both, and when one replica is
killed the requests that follow still succeed, /score and /events alike."""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    free_port,
    nginx_binary,
    nginx_config,
    service_env,
    start_service,
    stop_process,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def load_balancer(workdir: Path, upstreams: list[str]) -> Iterator[str]:
    """nginx in front of ``upstreams`` (host:port) for the ``with`` block (its URL); stopped on the way out."""
    port = free_port()
    config = nginx_config(workdir, upstreams, port)
    with (workdir / "nginx.log").open("w") as log:
        # in the foreground, so stop_process ends the master (which stops its workers)
        cmd = [nginx_binary(), "-c", str(config), "-g", "daemon off;"]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: httpx.get(f"{url}/lb-healthz", timeout=2).status_code == 200, "nginx", 30)
            yield url
        finally:
            stop_process(proc)


def _scored(url: str) -> float:
    """The /score requests a replica answered with 200, from its own /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "ctr_requests_total" and s.labels == {"endpoint": "/score", "status": "200"}
    )


@pytest.mark.timeout(300)
def test_requests_spread_over_replicas_and_survive_one_killed(
    model_repository: Path, redis_url: str, tmp_path: Path
) -> None:
    env = service_env(model_repository / "repo", redis_url)
    replicas = [start_service(env, ROOT) for _ in range(2)]
    try:
        addresses = [url.removeprefix("http://") for _, url in replicas]
        with load_balancer(tmp_path / "nginx", addresses) as lb, httpx.Client(base_url=lb, timeout=10) as client:
            events = [{"user_id": "u1", "item_id": f"i{i}", "timestamp": 1000 + i} for i in range(20)]
            assert client.post("/events", json={"events": events}).json() == {"stored": 20}
            body = {"user_id": "u1", "candidates": [{"item_id": f"i{j}"} for j in range(50)]}

            def score(n: int) -> Counter[str]:
                """n /score requests through the balancer; the replicas each was sent to, in order (X-Upstream:
                more than one when a replica failed and nginx passed the request on)."""
                tried: Counter[str] = Counter()
                for _ in range(n):
                    r = client.post("/score", json=body)
                    assert r.status_code == 200, r.text
                    assert r.json()["history_source"] == "store"  # both replicas read the one Redis
                    tried[r.headers["x-upstream"]] += 1
                return tried

            # round robin over connections kept alive: both replicas answer, and their own counts agree
            spread = score(20)
            assert set(spread) == set(addresses) and min(spread.values()) >= 5, spread
            assert [_scored(url) for _, url in replicas] == [spread[a] for a in addresses]

            # one replica dies: the first request sent its way is refused and passed on; none fails
            killed = replicas[0][0]
            killed.kill()
            killed.wait()
            after = score(20)
            assert {tried.split(", ")[-1] for tried in after} == {addresses[1]}, after
            assert f"{addresses[0]}, {addresses[1]}" in after, after  # it was tried, and the request passed on
            # an append is retried too when nothing reached a replica (a refused connection): the killed
            # replica is out of the rotation for fail_timeout, or refuses at once
            more = [{"user_id": "u1", "item_id": f"j{i}", "timestamp": 2000 + i} for i in range(5)]
            assert client.post("/events", json={"events": more}).json() == {"stored": 5}
            history = client.get("/users/u1/history").json()
            assert len(history["history"]) == 25
    finally:
        for proc, _ in replicas:
            stop_process(proc)
