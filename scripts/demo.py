"""Serve an exported repository, seed a few users' behaviours, and print a ready-to-paste curl.

    python scripts/demo.py --repository runs/repository [--port 8000]

Starts `python -m app` (Redis when REDIS_URL is set, the embedded store otherwise), waits until it is
ready, appends behaviours for three demo users through POST /events, prints a /score request for one of
them, and keeps serving until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.scorer import latest_version

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repository", type=Path, default=Path("runs/repository"))
    p.add_argument("--model", default="din")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args()
    env = {**os.environ, "MODEL_REPOSITORY": str(args.repository), "DEFAULT_MODEL": args.model}
    server = subprocess.Popen(
        [sys.executable, "-m", "app", "--host", args.host, "--port", str(args.port)], cwd=ROOT, env=env
    )
    url = f"http://{args.host}:{args.port}"
    try:
        _wait_until_ready(server, url, timeout=120)
        folder = latest_version(args.repository, args.model)
        version = folder.name
        vocab = json.loads((folder / "vocab.json").read_text())
        by_cat: dict[str, list[str]] = {}
        for item, cat in vocab["item_category"].items():
            by_cat.setdefault(cat, []).append(item)
        cats = sorted(by_cat, key=lambda c: -len(by_cat[c]))[:3]
        events = [
            {"user_id": f"demo-{u}", "item_id": item, "category_id": cat, "timestamp": 1_700_000_000 + t}
            for u, cat in enumerate(cats)
            for t, item in enumerate(by_cat[cat][:20])
        ]
        stored = httpx.post(f"{url}/events", json={"events": events}, timeout=10).json()["stored"]
        candidates = [{"item_id": by_cat[c][-1]} for c in cats] + [{"item_id": by_cat[cats[0]][-2]}]
        body = json.dumps({"user_id": "demo-0", "candidates": candidates, "return_attention": True})
        print(
            f"\nserving {args.model} v{version} at {url}; seeded {stored} behaviours for demo-0..demo-{len(cats) - 1}"
        )
        print(f"demo-0 likes category {cats[0]!r}; try:\n")
        print(f"curl -s -X POST {url}/score -H 'content-type: application/json' -d '{body}'\n")
        print(f"metrics: {url}/metrics   models: {url}/models   API docs: {url}/docs   (Ctrl-C stops)")
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_until_ready(server: subprocess.Popen[bytes], url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the service exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    sys.exit(f"the service at {url} was not ready after {timeout:.0f} s")


if __name__ == "__main__":
    main()
