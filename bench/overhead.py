"""The service's own CPU per /score request, without HTTP, sockets or a client: the ASGI app called in-process.

    python -m bench.overhead --repository runs/repository --name din [--candidates 200 --history 50]
        [--against DIR[:key=value,...]] ...

Measures this checkout's app and, side by side, the app of each other checkout given with --against (an
earlier commit, a branch); ``:key=value`` passes keyword arguments to that checkout's ``create_app``
(values read as JSON, e.g. ``/work/old:score_fast_path=false``), or, for a key that is a field of its
``Settings``, sets that setting (``$PWD:impression_log=false``: this checkout without its impression log).
Each app runs in a process of its own, with its checkout first on PYTHONPATH, from the same settings
(environment as for `python -m app`, plus --repository); each seeds the same users through POST /events,
and then the processes take turns, one round each, sending the same /score requests. Each round is one
request at a time, and ONNX Runtime runs on the calling thread (INFERENCE_WORKERS=0, one intra-op
thread), so that thread's CPU time is the request's (a background task on the event loop, such as the
impression log's writer, included), and the inference calls inside it are timed apart. Reports per app the
median over rounds of CPU-ms per request, of inference, and of the rest (parse, store, encode, answer,
framework): the rest is what the service adds to the model. Writes JSON. The rounds alternate, so the
machine's speed swings hit every app alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("bench/results/overhead.json")
Message = dict[str, Any]


class InferenceClock:
    """Thread CPU time spent in ONNX Runtime calls (``LoadedModel._run_users``), while installed."""

    def __init__(self) -> None:
        from app.scorer import LoadedModel

        self.seconds = 0.0
        self._model: Any = LoadedModel  # patched, whichever checkout it comes from
        self._original = LoadedModel._run_users

    def __enter__(self) -> InferenceClock:
        original, clock = self._original, self

        def timed(model: Any, batch: list[Any]) -> Any:
            t = time.thread_time()
            try:
                return original(model, batch)
            finally:
                clock.seconds += time.thread_time() - t

        self._model._run_users = timed
        return self

    def __exit__(self, *exc: object) -> None:
        self._model._run_users = self._original


async def post(app: Any, path: str, body: bytes) -> tuple[int, bytes]:
    """One POST through the app's ASGI interface; the status and the body of its answer."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
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


def requests(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The events that seed the users and the /score bodies, the same in every process (seeded)."""
    folder = max((p for p in (args.repository / args.name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    meta = json.loads((folder / "metadata.json").read_text())
    items = json.loads((folder / meta["files"]["vocabulary"]).read_text())["items"]
    rng = random.Random(0)
    users = [f"overhead-{u}" for u in range(args.users)]
    events = [{"user_id": u, "item_id": rng.choice(items), "timestamp": t} for u in users for t in range(args.history)]
    bodies = [
        orjson.dumps({"user_id": rng.choice(users), "candidates": [{"item_id": i} for i in rng.sample(items, n)]})
        for n in [args.candidates] * 64
    ]
    return events, bodies


async def serve_rounds(args: argparse.Namespace, kwargs: dict[str, Any]) -> None:
    """The worker: builds this process's app, then runs a round per line read on stdin, a JSON line out each."""
    from app.main import create_app
    from app.settings import Settings

    fields = Settings.model_fields
    settings = Settings(
        model_repository=args.repository,
        default_model=args.name,
        inference_workers=0,
        intra_op_threads=1,
        **{k: v for k, v in kwargs.items() if k in fields},
    )
    app = create_app(settings, **{k: v for k, v in kwargs.items() if k not in fields})
    events, bodies = requests(args)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        for k in range(0, len(events), 1000):
            status, answer = await post(app, "/events", orjson.dumps({"events": events[k : k + 1000]}))
            if status != 200:
                raise SystemExit(f"/events answered {status}: {answer[:200]!r}")
        for body in bodies[:20]:  # warm-up
            await post(app, "/score", body)
        print(json.dumps({"ready": True, "store": "redis" if settings.redis_url else "memory"}), flush=True)
        for _ in sys.stdin:
            with InferenceClock() as clock:
                t = time.thread_time()
                for k in range(args.requests):
                    status, answer = await post(app, "/score", bodies[k % len(bodies)])
                    if status != 200:
                        raise SystemExit(f"/score answered {status}: {answer[:200]!r}")
                spent = time.thread_time() - t
            ms = {"total": 1e3 * spent / args.requests, "inference": 1e3 * clock.seconds / args.requests}
            print(json.dumps(ms), flush=True)


def parse_app(spec: str) -> tuple[Path, dict[str, Any]]:
    """``DIR[:key=value,...]`` → the checkout and create_app's keyword arguments."""
    folder, _, options = spec.partition(":")
    kwargs = {k: json.loads(v) for k, _, v in (o.partition("=") for o in options.split(",") if o)}
    return Path(folder).resolve(), kwargs


def measure(args: argparse.Namespace) -> dict[str, Any]:
    apps = {"this checkout": str(ROOT)} | {spec: spec for spec in args.against}
    workers: dict[str, subprocess.Popen[str]] = {}
    try:
        for name, spec in apps.items():
            folder, kwargs = parse_app(spec)
            env = {**os.environ, "PYTHONPATH": str(folder)}
            env.pop("WORKERS", None)  # one process per app, whatever the environment says
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(kwargs)]
            command += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in WORKER_ARGS]
            workers[name] = subprocess.Popen(
                command, cwd=folder, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
        stores = {name: _reply(w)["store"] for name, w in workers.items()}
        rounds: dict[str, dict[str, list[float]]] = {name: {"total": [], "inference": []} for name in apps}
        for _ in range(args.rounds):
            for name, worker in workers.items():
                assert worker.stdin is not None
                worker.stdin.write("round\n")
                worker.stdin.flush()
                ms = _reply(worker)
                rounds[name]["total"].append(ms["total"])
                rounds[name]["inference"].append(ms["inference"])
    finally:
        for worker in workers.values():
            if worker.stdin is not None:
                worker.stdin.close()
            worker.wait(30)
    result: dict[str, Any] = {
        "model": args.name,
        "candidates": args.candidates,
        "history": args.history,
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "apps": {},
    }
    for name, r in rounds.items():
        rest = [t - i for t, i in zip(r["total"], r["inference"], strict=True)]
        result["apps"][name] = {
            "checkout": str(parse_app(apps[name])[0]),
            "store": stores[name],
            "cpu_ms_per_request": statistics.median(r["total"]),
            "inference_ms_per_request": statistics.median(r["inference"]),
            "rest_ms_per_request": statistics.median(rest),
            "rest_ms_per_round": rest,
        }
    return result


def _reply(worker: subprocess.Popen[str]) -> dict[str, Any]:
    assert worker.stdout is not None
    line = worker.stdout.readline()
    if not line:
        raise SystemExit(f"a worker exited ({worker.wait()}); its errors are above")
    reply: dict[str, Any] = json.loads(line)
    return reply


WORKER_ARGS = ("repository", "name", "candidates", "history", "users", "requests")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--name", default="din")
    p.add_argument("--candidates", type=int, default=200)
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--rounds", type=int, default=8, help="alternated rounds per app")
    p.add_argument("--requests", type=int, default=150, help="requests per round")
    another = "another checkout to measure side by side (repeatable)"
    p.add_argument("--against", action="append", default=[], metavar="DIR[:key=value,...]", help=another)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # create_app's keyword arguments, JSON: run one app
    args = p.parse_args(argv)
    args.repository = args.repository.resolve()
    if args.worker is not None:
        asyncio.run(serve_rounds(args, json.loads(args.worker)))
        return
    result = measure(args)
    print(
        f"{args.candidates} candidates × {args.history} history; CPU-ms per request "
        f"(median of {args.rounds} alternated rounds of {args.requests}):"
    )
    this = result["apps"]["this checkout"]["cpu_ms_per_request"]
    for name, r in result["apps"].items():
        print(
            f"  {name}: total {r['cpu_ms_per_request']:.3f}  inference {r['inference_ms_per_request']:.3f}  "
            f"rest {r['rest_ms_per_request']:.3f}  (store: {r['store']}; this checkout's total "
            f"{this / r['cpu_ms_per_request']:.3f}× this one's)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
