"""The service's own CPU per /score request, without HTTP, sockets or a client: the ASGI app called in-process.

    python -m bench.overhead --repository runs/repository --name din [--candidates 200 --history 50]

Builds the app twice from the same settings (environment as for `python -m app`, plus --repository),
with the /score fast path and without it (FastAPI's own route), runs their lifespans, seeds users through
POST /events, and then sends the same /score requests to the two apps in alternating rounds. Each round is
one request at a time, and ONNX Runtime runs on the calling thread (INFERENCE_WORKERS=0, one intra-op
thread), so that thread's CPU time is the request's, and the inference calls inside it are timed apart.
Reports per app the median over rounds of CPU-ms per request, of inference, and of the rest (parse,
store, encode, answer, framework): the rest is what the service adds to the model. Writes JSON.
Measured side by side in one process, so the machine's speed swings hit both apps alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson
from starlette.types import ASGIApp, Message

from app.main import create_app
from app.scorer import LoadedModel
from app.settings import Settings
from bench.inprocess import load_version

DEFAULT_OUT = Path("bench/results/overhead.json")


class InferenceClock:
    """Thread CPU time spent in ONNX Runtime calls (``LoadedModel._run_users``), while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._original = LoadedModel._run_users

    def __enter__(self) -> InferenceClock:
        original, clock = self._original, self

        def timed(model: LoadedModel, batch: list[Any]) -> Any:
            t = time.thread_time()
            try:
                return original(model, batch)
            finally:
                clock.seconds += time.thread_time() - t

        LoadedModel._run_users = timed  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        LoadedModel._run_users = self._original  # type: ignore[method-assign]


async def post(app: ASGIApp, path: str, body: bytes) -> tuple[int, bytes]:
    """One POST through the app's ASGI interface; the status and the body of its answer."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    sent = False
    answer: dict[str, Any] = {"status": 0, "body": b""}

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never goes away
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["body"]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings(model_repository=args.repository, default_model=args.name, inference_workers=0,
                        intra_op_threads=1)  # fmt: skip
    apps = {"fast path": create_app(settings), "FastAPI route": create_app(settings, score_fast_path=False)}
    folder, meta = load_version(args.repository, args.name, None)
    items = json.loads((folder / meta["files"]["vocabulary"]).read_text())["items"]
    rng = random.Random(0)
    users = [f"overhead-{u}" for u in range(args.users)]
    events = [{"user_id": u, "item_id": rng.choice(items), "timestamp": t} for u in users for t in range(args.history)]
    bodies = [
        orjson.dumps({"user_id": rng.choice(users), "candidates": [{"item_id": i} for i in rng.sample(items, n)]})
        for n in [args.candidates] * 64
    ]
    rounds: dict[str, dict[str, list[float]]] = {name: {"total": [], "inference": []} for name in apps}
    async with AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        first = next(iter(apps.values()))
        for k in range(0, len(events), 1000):  # one store behind both apps
            status, answer = await post(first, "/events", orjson.dumps({"events": events[k : k + 1000]}))
            if status != 200:
                raise SystemExit(f"/events answered {status}: {answer[:200]!r}")
        for app in apps.values():  # warm-up
            for body in bodies[:20]:
                await post(app, "/score", body)
        for _ in range(args.rounds):
            for name, app in apps.items():
                with InferenceClock() as clock:
                    t = time.thread_time()
                    for k in range(args.requests):
                        status, answer = await post(app, "/score", bodies[k % len(bodies)])
                        if status != 200:
                            raise SystemExit(f"/score answered {status}: {answer[:200]!r}")
                    spent = time.thread_time() - t
                rounds[name]["total"].append(1e3 * spent / args.requests)
                rounds[name]["inference"].append(1e3 * clock.seconds / args.requests)
    result: dict[str, Any] = {
        "model": args.name, "version": meta["version"], "candidates": args.candidates, "history": args.history,
        "rounds": args.rounds, "requests_per_round": args.requests,
        "store": "redis" if settings.redis_url else "memory", "apps": {},
    }  # fmt: skip
    for name, r in rounds.items():
        rest = [t - i for t, i in zip(r["total"], r["inference"], strict=True)]
        result["apps"][name] = {
            "cpu_ms_per_request": statistics.median(r["total"]),
            "inference_ms_per_request": statistics.median(r["inference"]),
            "rest_ms_per_request": statistics.median(rest),
            "rest_ms_per_round": rest,
        }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--name", default="din")
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--rounds", type=int, default=8, help="alternated rounds per app")
    p.add_argument("--requests", type=int, default=150, help="requests per round")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    os.environ.pop("WORKERS", None)  # one process here, whatever the environment says
    result = asyncio.run(measure(args))
    print(f"{args.candidates} candidates × {args.history} history, store: {result['store']}; CPU-ms per request "
          f"(median of {args.rounds} rounds of {args.requests}):")  # fmt: skip
    for name, r in result["apps"].items():
        print(f"  {name:14s} total {r['cpu_ms_per_request']:.3f}  inference {r['inference_ms_per_request']:.3f}  "
              f"rest {r['rest_ms_per_request']:.3f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
