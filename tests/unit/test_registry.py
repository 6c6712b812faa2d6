"""The registry's background loops, alone: no models, no Redis."""

from __future__ import annotations

import asyncio

from app.periodic import Periodic


def test_close_ends_a_loop_whose_job_lost_the_cancellation() -> None:
    """redis-py 8 can swallow a cancellation that arrives during a command (the command returns normally):
    close() must still end the loop instead of waiting for it forever."""
    rounds = 0
    started = asyncio.Event()

    async def job_that_swallows_cancellation() -> list[str]:
        nonlocal rounds
        rounds += 1
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if rounds > 1:  # (without the fix: fail in 5 s instead of hanging)
                raise
            # what the library did: no CancelledError reaches the loop
        return []

    async def main() -> None:
        loop = Periodic("test-loop", 0.001, job_that_swallows_cancellation)
        loop.start()
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.wait_for(loop.close(), 5)

    asyncio.run(main())
    assert rounds == 1  # no round started after close
