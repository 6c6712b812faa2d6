"""Prometheus metrics: one registry per app instance (so tests can build several apps), or, in a worker of a
multi-process service (WORKERS > 1), prometheus_client's multiprocess mode.

In that mode every metric writes to memory-mapped files in PROMETHEUS_MULTIPROC_DIR (the supervisor sets it
before the workers start, so prometheus_client reads it at import), one file per process and kind, and
/metrics merges the files of all processes: counters and histograms summed, gauges by their
``multiprocess_mode``. The ``live*`` modes count only processes alive: a worker deletes its gauge files when
its lifespan ends (``mark_process_dead``), and a starting worker deletes those of workers that died without
doing so (``sweep_dead_processes``). Counters and histograms of finished processes stay: totals never go back.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

InfoLabels = tuple[str, str, str, str]  # ctr_model_info's model, version, provider, role

# The labelled series the dashboard and the alerts read exist at 0 from start-up: a series that appears with
# the first error shows "No data", and a rate over it starts one scrape late.
STORE_OPERATIONS = ("read", "write")
UNKNOWN_ID_KINDS = ("item", "category", "user_feature")
SCORE_STATUSES = ("200", "400", "404", "422", "500", "503", "504")
LOAD_OUTCOMES = ("loaded", "failed")
IMPRESSION_DROP_REASONS = ("queue_full", "write_error", "shutdown")
IMPRESSION_LOGS = ("impressions", "outcomes")
OUTCOME_LABELS = ("0", "1")


class Metrics:
    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()  # None: values live in this app's registry only
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ctr_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "ctr_request_latency_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.stage = Histogram(
            "ctr_stage_seconds",
            "one /score request's time per stage: parse (receive, JSON, "
            "validation), store, encode, queue, inference, serialize",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "ctr_queue_wait_seconds", "time a /score request waited for its batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "ctr_inference_seconds", "one ONNX Runtime run", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "ctr_batch_requests", "requests merged into one inference task", ["model"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_candidates = Histogram(
            "ctr_batch_candidates", "candidates scored in one run", ["model"], buckets=SIZE_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "ctr_queue_depth",
            "requests waiting for a batch",
            ["model", "version"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.candidates = Counter("ctr_candidates_scored_total", "candidates scored", ["model", "version"], registry=r)
        self.scored = Counter(
            "ctr_scored_requests_total",
            "/score requests answered, by the version that answered",
            ["model", "version"],
            registry=r,
        )
        self.model_loads = Counter(
            "ctr_model_loads_total", "model version loads (outcome: loaded or failed)", ["model", "outcome"], registry=r
        )
        self.auth_failures = Counter(
            "ctr_auth_failures_total", "requests refused for a missing or wrong API key", registry=r
        )
        self.history_length = Histogram(
            "ctr_history_length", "history items used per request", buckets=(0, 1, 5, 10, 20, 50, 100, 200), registry=r
        )
        self.store_errors = Counter("ctr_store_errors_total", "behaviour store failures", ["operation"], registry=r)
        self.unknown_ids = Counter(
            "ctr_unknown_ids_total", "ids mapped to the out-of-vocabulary index", ["kind"], registry=r
        )
        self.degraded = Counter(
            "ctr_degraded_responses_total", "/score answered without the stored history", registry=r
        )
        self.model_info = Gauge(
            "ctr_model_info",
            "loaded model versions (value 1); role: primary, split, standby",
            ["model", "version", "provider", "role"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.events = Counter("ctr_events_stored_total", "behaviours appended to the store", registry=r)
        self.processes = Gauge(
            "ctr_workers",
            "scorer processes serving (1 each; the workers of a WORKERS>1 service are summed)",
            multiprocess_mode="livesum",
            registry=r,
        )
        # the impression log (app/impression_log.py); impressions per version are ctr_scored_requests_total (every
        # answer is one), candidates shown ctr_candidates_scored_total
        self.impressions_logged = Counter(
            "ctr_impressions_logged_total", "impression records written to the impression log", registry=r
        )
        self.impressions_dropped = Counter(
            "ctr_impressions_dropped_total",
            "impressions not logged (reason: queue_full, write_error, shutdown); sampled-out ones are not counted",
            ["reason"],
            registry=r,
        )
        self.impression_log_errors = Counter(
            "ctr_impression_log_errors_total",
            "failed writes to the impression log: a batch of impressions, or an /events call's outcomes (503)",
            ["log"],
            registry=r,
        )
        self.impression_queue_depth = Gauge(
            "ctr_impression_log_queue_depth",
            "impressions waiting for the background writer",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.outcomes = Counter(
            "ctr_outcomes_total",
            "outcomes posted to /events, by the version that served the impression (label 1: a click)",
            ["model", "version", "label"],
            registry=r,
        )
        for reason in IMPRESSION_DROP_REASONS:
            self.impressions_dropped.labels(reason)
        for name in IMPRESSION_LOGS:
            self.impression_log_errors.labels(name)
        for status in SCORE_STATUSES:
            self.requests.labels("/score", status)
        self.latency.labels("/score")
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)
        for kind in UNKNOWN_ID_KINDS:
            self.unknown_ids.labels(kind)
        self._exposed = r if self.multiprocess_dir is None else CollectorRegistry()
        if self.multiprocess_dir is not None:
            self._exposed.register(ServedSeries(self.multiprocess_dir))
        self._info: set[InfoLabels] = set()

    def expose(self) -> bytes:
        """The /metrics exposition: this app's registry, or the files of every live worker merged."""
        return generate_latest(self._exposed)

    def model_known(self, model: str) -> None:
        """A model's load outcomes exist at 0 from its first load on."""
        for outcome in LOAD_OUTCOMES:
            self.model_loads.labels(model, outcome)

    def version_serving(self, model: str, version: str) -> None:
        """A version's series exist at 0 from its deployment on: its batches, queue and scored counts."""
        for histogram in (self.inference, self.batch_requests, self.batch_candidates):
            histogram.labels(model)
        self.candidates.labels(model, version)
        self.scored.labels(model, version)
        for label in OUTCOME_LABELS:
            self.outcomes.labels(model, version, label)
        self.queue_depth.labels(model, version).set(0)

    def publish_model_info(self, loaded: Iterable[InfoLabels]) -> None:
        """``ctr_model_info`` is 1 for each (model, version, provider, role) given; earlier ones are removed."""
        current = set(loaded)
        for labels in self._info - current:
            self.remove(self.model_info, *labels)
        for labels in current:
            self.model_info.labels(*labels).set(1)
        self._info = current

    def remove(self, gauge: Gauge, *labels: str) -> None:
        """Stop exporting one series of a gauge.

        prometheus_client cannot in multiprocess mode: ``remove()`` and ``clear()`` only forget the process's
        child object (and warn) while the series stays in the process's file, exported with its last value.
        There the series is set to 0 instead, which ``ServedSeries`` reads as gone: a ``ctr_model_info`` at 0, and
        the series of a (model, version) that no live process has in ``ctr_model_info`` any more."""
        if self.multiprocess_dir is None:
            gauge.remove(*labels)
        else:
            gauge.labels(*labels).set(0)

    def serving(self) -> None:
        """This process answers requests from now on; a worker first sweeps what dead workers left."""
        if self.multiprocess_dir is not None:
            sweep_dead_processes(self.multiprocess_dir)
        self.processes.set(1)

    def stopped(self) -> None:
        """This process serves no more: its live gauges (queue depth, model info, workers) leave the sums."""
        if self.multiprocess_dir is None:
            self.processes.set(0)
        else:
            mark_process_dead(os.getpid(), str(self.multiprocess_dir))


class ServedSeries(Collector):
    """The multiprocess files merged, without the series ``Metrics.remove`` took away: a ``ctr_model_info`` at
    0 (no live process has that version loaded in that role) and any other gauge's series of a (model, version)
    no live process has loaded (the queue depth of a retired version)."""

    def __init__(self, path: Path) -> None:
        self._files = MultiProcessCollector(None, str(path))

    def collect(self) -> Iterator[Metric]:
        families = list(self._files.collect())
        info = [s for f in families if f.name == "ctr_model_info" for s in f.samples]
        kept: set[tuple[str, str] | None] = {None}  # series of no version, and those of a loaded version
        kept |= {(s.labels["model"], s.labels["version"]) for s in info if s.value}
        for family in families:
            if family.name == "ctr_model_info":
                family.samples = [s for s in family.samples if s.value]
            elif family.type == "gauge":
                family.samples = [s for s in family.samples if _of_version(s.labels) in kept]
            yield family


def _of_version(labels: dict[str, str]) -> tuple[str, str] | None:
    """The (model, version) a series belongs to; None for series of no version."""
    return (labels["model"], labels["version"]) if "model" in labels and "version" in labels else None


def multiprocess_dir() -> Path | None:
    """PROMETHEUS_MULTIPROC_DIR when set: prometheus_client (which read it at import) then writes every value to
    a file of this process there."""
    path = os.environ.get(MULTIPROC_ENV)
    return Path(path) if path else None


def reset_multiprocess_dir(path: Path) -> None:
    """The supervisor's: the directory, created if need be and emptied of an earlier run's files (a restarted
    service must not add the old run's counters to its own)."""
    path.mkdir(parents=True, exist_ok=True)
    for f in path.glob("*.db"):
        f.unlink()


_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def sweep_dead_processes(path: Path) -> list[int]:
    """Delete the live-gauge files of processes that no longer exist: a worker killed before its lifespan ended
    (uvicorn's supervisor starts another) would otherwise count in ``ctr_workers`` and the queue depth forever.
    Returns their pids."""
    files: dict[int, list[Path]] = {}
    for f in path.iterdir():
        if m := _LIVE_GAUGE_FILE.fullmatch(f.name):
            files.setdefault(int(m.group(1)), []).append(f)
    dead = sorted(pid for pid in files if not _alive(pid))
    for pid in dead:
        for f in files[pid]:
            f.unlink(missing_ok=True)  # workers restarted together sweep the same files
        log.warning("metrics: process %d ended without saying so; its live gauges are dropped", pid)
    return dead


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True
