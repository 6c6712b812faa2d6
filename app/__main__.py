"""python -m app --host 0.0.0.0 --port 8000: run the scoring service (settings from the environment).

With WORKERS > 1, uvicorn's supervisor binds the port and runs that many worker processes on it (restarting
any that dies); each builds its own app and settings from the environment (``create_app()``), and /metrics
in any of them reports all of them (prometheus_client's multiprocess mode, app/metrics.py).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from app import listener
from app.main import create_app
from app.metrics import MULTIPROC_ENV, reset_multiprocess_dir
from app.runtime import session_threads
from app.scorer import ModelLoadError, discover, latest_version
from app.settings import Settings

log = logging.getLogger("app")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--keep-alive",
        type=float,
        default=75.0,
        help="seconds an idle connection stays open; longer than clients' pool expiry, so a client "
        "never reuses a connection the server is closing",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    try:
        settings = Settings()
        # fail before binding the port when the repository cannot be served
        latest_version(settings.model_repository, settings.default_model)
        discover(settings.model_repository)
    except (ValidationError, ModelLoadError) as e:
        log.error("cannot start: %s", e)
        sys.exit(2)
    if settings.workers == 1:
        uvicorn.run(
            create_app(settings),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            timeout_keep_alive=args.keep_alive,
        )
    else:
        supervise(settings, args)


def supervise(settings: Settings, args: argparse.Namespace) -> None:
    """uvicorn.run(workers=N), but exiting 3 (uvicorn's start-up failure) when a worker could not start: uvicorn
    stops then and exits 0, and a service that never served must not look like one that was stopped."""
    metrics_dir, temporary = _metrics_dir()
    threads = session_threads(settings.intra_op_threads, settings.workers)
    log.info(
        "%d workers, %d ONNX Runtime intra-op thread(s) each%s; metrics in %s",
        settings.workers,
        threads,
        "" if settings.intra_op_threads else f" ({os.cpu_count()} cores / WORKERS)",
        metrics_dir,
    )
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        workers=settings.workers,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=_worker_logging(args.log_level),
        access_log=False,
        timeout_keep_alive=args.keep_alive,
    )
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        try:
            listening = listener.bind(family, (args.host, args.port))
        except OSError as e:
            log.error("cannot listen on %s:%d: %s", args.host, args.port, e)
            sys.exit(STARTUP_FAILURE)
        log.info("listening on http://%s:%d, a socket per worker (SO_REUSEPORT)", args.host, listening.getsockname()[1])
        supervisor = Multiprocess(config, sockets=[listening])
        supervisor.run()
    finally:
        if temporary:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    if any(worker.process.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
        sys.exit(STARTUP_FAILURE)


def _metrics_dir() -> tuple[Path, bool]:
    """PROMETHEUS_MULTIPROC_DIR (the operator's, else a fresh temporary one, removed at exit), emptied and set
    in the environment before any worker starts: workers are spawned, fresh interpreters, and prometheus_client
    reads it when they import it. Returns the directory and whether it is temporary."""
    given = os.environ.get(MULTIPROC_ENV)
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="ctr-metrics-"))
    reset_multiprocess_dir(path)
    os.environ[MULTIPROC_ENV] = str(path)
    return path, not given


def _worker_logging(level: str) -> dict[str, Any]:
    """uvicorn's logging configuration plus the service's own loggers, applied in each worker (a spawned
    process runs no ``basicConfig``); the pid says which worker wrote a line."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["app"] = {"format": LOG_FORMAT.replace("%(name)s", "%(name)s[%(process)d]")}
    config["handlers"]["app"] = {"class": "logging.StreamHandler", "formatter": "app", "stream": "ext://sys.stderr"}
    config["root"] = {"handlers": ["app"], "level": level.upper()}
    return config


if __name__ == "__main__":
    main()
