"""python -m app --host 0.0.0.0 --port 8000: run the scoring service (settings from the environment)."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from app.main import create_app
from app.scorer import ModelLoadError
from app.settings import Settings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--keep-alive", type=float, default=75.0,
                   help="seconds an idle connection stays open; longer than clients' pool expiry, so a client "
                   "never reuses a connection the server is closing")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    try:
        # fail before binding the port when the repository cannot be served
        from app.scorer import discover, latest_version

        latest_version(settings.model_repository, settings.default_model)
        discover(settings.model_repository)
    except ModelLoadError as e:
        logging.getLogger("app").error("cannot start: %s", e)
        sys.exit(2)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                access_log=False, timeout_keep_alive=args.keep_alive)  # fmt: skip


if __name__ == "__main__":
    main()
