"""Prometheus metrics, one registry per app instance (so tests can build several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ctr_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.latency = Histogram("ctr_request_latency_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.stage = Histogram("ctr_stage_seconds", "one /score request's time per stage: parse (receive, JSON, "
                               "validation), store, encode, queue, inference, serialize", ["stage"],
                               buckets=STAGE_BUCKETS, registry=r)  # fmt: skip
        self.queue_wait = Histogram("ctr_queue_wait_seconds", "time a /score request waited for its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.inference = Histogram("ctr_inference_seconds", "one ONNX Runtime run", ["model"],
                                   buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_requests = Histogram("ctr_batch_requests", "requests merged into one inference task", ["model"],
                                        buckets=SIZE_BUCKETS, registry=r)  # fmt: skip
        self.batch_candidates = Histogram("ctr_batch_candidates", "candidates scored in one run", ["model"],
                                          buckets=SIZE_BUCKETS, registry=r)  # fmt: skip
        self.queue_depth = Gauge("ctr_queue_depth", "requests waiting for a batch", ["model", "version"], registry=r)
        self.candidates = Counter("ctr_candidates_scored_total", "candidates scored", ["model", "version"],
                                  registry=r)  # fmt: skip
        self.scored = Counter("ctr_scored_requests_total", "/score requests answered, by the version that answered",
                              ["model", "version"], registry=r)  # fmt: skip
        self.model_loads = Counter("ctr_model_loads_total", "model version loads (outcome: loaded or failed)",
                                   ["model", "outcome"], registry=r)  # fmt: skip
        self.auth_failures = Counter("ctr_auth_failures_total", "requests refused for a missing or wrong API key",
                                     registry=r)  # fmt: skip
        self.history_length = Histogram("ctr_history_length", "history items used per request",
                                        buckets=(0, 1, 5, 10, 20, 50, 100, 200), registry=r)  # fmt: skip
        self.store_errors = Counter("ctr_store_errors_total", "behaviour store failures", ["operation"], registry=r)
        self.unknown_ids = Counter("ctr_unknown_ids_total", "ids mapped to the out-of-vocabulary index", ["kind"],
                                   registry=r)  # fmt: skip
        self.degraded = Counter("ctr_degraded_responses_total", "/score answered without the stored history",
                                registry=r)  # fmt: skip
        self.model_info = Gauge("ctr_model_info", "loaded model versions (value 1); role: primary, split, standby",
                                ["model", "version", "provider", "role"], registry=r)  # fmt: skip
        self.events = Counter("ctr_events_stored_total", "behaviours appended to the store", registry=r)
