"""The registry's background loops, alone: no models, no Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.metrics import Metrics
from app.registry import ModelRegistry
from app.settings import Settings


def test_close_ends_a_loop_whose_job_lost_the_cancellation(tmp_path: Path) -> None:
    """redis-py 8 can swallow a cancellation that arrives during a command (the command returns normally):
    close() must still end the loop instead of waiting for it forever."""
    rounds = 0

    async def job_that_swallows_cancellation() -> list[str]:
        nonlocal rounds
        rounds += 1
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if rounds > 1:  # (without the fix: fail in 5 s instead of hanging)
                raise
            # what the library did: no CancelledError reaches the loop
        return []

    async def main() -> None:
        registry = ModelRegistry(Settings(model_repository=tmp_path), Metrics())
        registry._every(0.001, "test-loop", job_that_swallows_cancellation)
        while rounds == 0:
            await asyncio.sleep(0.001)
        await asyncio.wait_for(registry.close(), 5)

    asyncio.run(main())
    assert rounds == 1  # no round started after close
