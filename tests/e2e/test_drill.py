"""The failover drill (bench.drill), small: a Redis Cluster of 3 masters and 3 replicas, 3 scorer replicas behind
the repository's nginx.conf, /score load and an event writer; one scorer replica killed, then one Redis master.
No acknowledged event may be lost, and no /score may fail beyond those in flight on the killed replica (nginx
passes those on, so none should); both kills are recovered from without help."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import run_command

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_the_drill_loses_no_acknowledged_event_and_fails_no_score(model_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "drill"
    sizes = ["--concurrency", "3", "--candidates", "30", "--users", "20", "--history", "10"]
    cmd = [sys.executable, "-m", "bench.drill", "--repository", str(model_repository / "repo"), *sizes]
    done = run_command([*cmd, "--phase-s", "3", "--out", str(out)], timeout=200, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads((out / "drill.json").read_text())
    score, events, scorer, master = report["score"], report["events"], report["scorer_kill"], report["master_kill"]

    # every event the writer saw acknowledged is in the cluster afterwards, the failover's included
    assert events["acknowledged"] > 100 and events["lost"] == 0, events
    # the master kill was felt (its users' events refused, the probe user scored without history) and never
    # turned into a failed /score
    assert master["events_refused_requests"] > 0 and master["probe_degraded_answers"] > 0, master
    assert master["probe_failed_answers"] == 0 and score["failed_in_master_phase"] == 0, (master, score)
    # ... and both recovered by themselves once the replica was promoted
    assert master["failover_s"] is not None and master["failover_s"] < 20, master
    assert master["probe_recovered"] and master["score_recovery_s"] < 30 and master["events_recovery_s"] < 30
    assert master["score_first_recovered_s"] is not None and master["events_first_recovered_s"] is not None

    # the scorer kill: nginx tried the dead replica (in flight, or sent before it knew), and passed /score on
    assert scorer["in_flight_on_killed"] + scorer["sent_to_killed_after"] >= 1, scorer
    assert score["failed"] <= scorer["score_in_flight_on_killed"], (score, scorer)
    assert scorer["lb_recovery_s"] < 5.0
    assert score["latency_after_master_kill"]["requests"] > 0

    table = (out / "drill.md").read_text()
    assert "| events acknowledged / lost |" in table and f"{events['acknowledged']:,} / 0" in table
