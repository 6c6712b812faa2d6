"""A job run every few seconds on the event loop until closed (repository polling, deployment sync)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from app.deployment import BoardError

log = logging.getLogger(__name__)


class Periodic:
    """``job`` every ``interval_s``; each change it returns is logged, and a failed round does not end it."""

    def __init__(self, name: str, interval_s: float, job: Callable[[], Awaitable[list[str]]]) -> None:
        self.name, self.interval_s, self.job = name, interval_s, job
        self.closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self.name)

    async def _loop(self) -> None:
        # the flag as well as the cancellation: redis-py 8 loses a cancellation that arrives during some commands
        # (the command returns normally), and a loop waiting for CancelledError alone ran on while close() waited
        # for it (a hung shutdown, seen in the shared-deployment tests)
        while not self.closing:
            await asyncio.sleep(self.interval_s)
            try:
                for change in await self.job():
                    log.info("%s: %s", self.name, change)
            except BoardError as e:
                log.warning("%s: %s", self.name, e)
            except Exception:  # the loop must outlive any one bad round
                log.exception("%s round failed", self.name)

    async def close(self) -> None:
        self.closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
