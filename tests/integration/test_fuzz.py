"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis).

The real server process (uvicorn, real Redis, API key on) gets a few thousand generated requests, valid
and invalid, admin endpoints included, under all of schemathesis' checks: no answer may be a 5xx, every
answer must match the status codes, content types, headers and schemas the OpenAPI document declares,
a request the schema allows must not be refused as invalid, nor one it forbids accepted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks

from app.main import create_app
from app.settings import Settings
from tests.conftest import RedisServer, service_env, start_service, stop_process

ROOT = Path(__file__).resolve().parents[2]
KEY = "fuzz-key"
EXAMPLES_PER_OPERATION = 250  # × 11 operations, valid and invalid: over 3,000 requests
# a fixed sequence by default, so a red build reproduces; FUZZ_RANDOM=1 explores new cases on each run
DERANDOMIZE = os.environ.get("FUZZ_RANDOM") != "1"
load_all_checks()
# every check the CLI's `--checks all` runs: valid inputs accepted (positive_data_acceptance), invalid ones
# refused, and each 405's Allow header naming all the methods of its path, besides the answers' own schemas
ALL_CHECKS = CHECKS.get_all()


@pytest.fixture(scope="module")
def server(model_repository: Path, redis_server: RedisServer) -> Iterator[str]:
    if redis_server.proc is None:
        redis_server.start()
    env = service_env(model_repository / "repo", redis_server.url, API_KEY=KEY, REQUEST_TIMEOUT_MS="5000")
    proc, url = start_service(env, ROOT)
    yield url
    stop_process(proc)


@pytest.fixture(scope="module")
def api_schema(server: str) -> Any:
    return schemathesis.openapi.from_url(f"{server}/openapi.json")


# the operations, read from the app's own schema (building the app loads nothing); invalid requests only
# where there is an input to make invalid
def _operations() -> list[Any]:
    cases = []
    for path, ops in create_app(Settings()).openapi()["paths"].items():
        for method, op in ops.items():
            has_input = "requestBody" in op or any(p["in"] != "header" for p in op.get("parameters", []))
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_input else (GenerationMode.POSITIVE,):
                cases.append(pytest.param(method.upper(), path, mode, id=f"{method.upper()} {path} {mode.value}"))
    return cases


@pytest.mark.parametrize(("method", "path", "mode"), _operations())
def test_api_honours_its_schema(api_schema: Any, method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=DERANDOMIZE,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=ALL_CHECKS)

    run()


def test_the_fuzzing_sent_thousands_of_requests(server: str) -> None:
    """Runs after the operations above (same module): what the server itself counted."""
    import httpx

    text = httpx.get(f"{server}/metrics").text
    total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ctr_requests_total{"))
    print(f"fuzzing: {total:.0f} requests answered")
    assert total >= 3000
