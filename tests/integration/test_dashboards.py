"""Every series the Grafana dashboard and the alerts read exists from start-up, at 0 on a healthy service."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SELECTOR = re.compile(r"\b(ctr_[a-z_]+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def _expressions() -> Iterator[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield from [value] if key == "expr" and isinstance(value, str) else walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    for dashboard in (ROOT / "deploy/grafana/dashboards").glob("*.json"):
        yield from walk(json.loads(dashboard.read_text()))
    yield from walk(yaml.safe_load((ROOT / "deploy/alerts.yml").read_text()))


def _selectors() -> set[tuple[str, tuple[tuple[str, str, str], ...]]]:
    """(metric name, label matchers) of every ctr_* selector in the expressions."""
    return {
        (name, tuple(MATCHER.findall(matchers or "")))
        for expr in _expressions()
        for name, matchers in SELECTOR.findall(expr)
    }


def _matches(labels: dict[str, str], matchers: tuple[tuple[str, str, str], ...]) -> bool:
    tests = {
        "=": lambda v, want: v == want,
        "!=": lambda v, want: v != want,
        "=~": lambda v, want: re.fullmatch(want, v) is not None,
        "!~": lambda v, want: re.fullmatch(want, v) is None,
    }
    return all(tests[op](labels.get(label, ""), want) for label, op, want in matchers)


def test_every_series_the_dashboard_and_alerts_read_exists_at_start_up(model_repository: Path) -> None:
    selectors = _selectors()
    assert len(selectors) > 15  # the regex found the expressions (a renamed file would make this test empty)
    settings = Settings(model_repository=model_repository / "repo", default_model="din")
    with TestClient(create_app(settings)) as c:
        exposition = c.get("/metrics").text  # the first request: nothing scored, no error yet
    samples = [s for family in text_string_to_metric_families(exposition) for s in family.samples]
    missing = [
        f"{name}{{{','.join(''.join(m) for m in matchers)}}}"
        for name, matchers in sorted(selectors)
        if not any(s.name == name and _matches(s.labels, matchers) for s in samples)
    ]
    assert missing == []
    store_errors = {s.labels["operation"]: s.value for s in samples if s.name == "ctr_store_errors_total"}
    assert store_errors == {"read": 0.0, "write": 0.0}  # what a healthy service has, not a missing series
