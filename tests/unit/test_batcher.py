"""The batcher alone, driven with asyncio: no server, no model."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.batcher import BatchFailed, BatchStats, DeadlineExceeded, DynamicBatcher, QueueFull


def _batcher(run, **kw):  # type: ignore[no-untyped-def]
    opts = {"max_candidates": 100, "max_delay_s": 0.01, "queue_limit": 50, "workers": 1}
    opts.update(kw)
    return DynamicBatcher(run, **opts)


async def _until(condition, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Yield to the loop until ``condition()`` holds: the batcher's worker thread reached a point, not a guess
    at how long that takes on a loaded machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def test_concurrent_requests_are_merged_while_a_run_is_busy() -> None:
    gate = threading.Event()
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            gate.wait(10)  # hold the worker so the next requests queue up
        return [i * 10 for i in items]

    async def main() -> list[int]:
        b = _batcher(run)
        b.start()
        first = asyncio.create_task(b.submit(0, 1, 5))
        await _until(lambda: calls == [[0]], "the first run to hold the worker")
        rest = [asyncio.create_task(b.submit(i, 1, 5)) for i in range(1, 9)]
        await _until(lambda: b.depth == 8, "eight requests queued")
        gate.set()
        out = await asyncio.gather(first, *rest)
        await b.stop()
        return out

    assert asyncio.run(main()) == [i * 10 for i in range(9)]
    assert calls == [[0], list(range(1, 9))]  # eight requests, one run


def test_a_lone_request_runs_after_the_max_delay() -> None:
    stats: list[BatchStats] = []

    async def main() -> int:
        b = _batcher(lambda items: items, max_delay_s=0.02, on_batch=stats.append)
        b.start()
        out = await b.submit(7, 3, 1)
        await b.stop()
        return out

    assert asyncio.run(main()) == 7
    assert stats[0].requests == 1 and stats[0].candidates == 3
    assert 0.015 <= stats[0].queue_waits[0] < 0.5


def test_batches_close_at_max_candidates() -> None:
    sizes: list[int] = []

    def run(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return items

    async def main() -> None:
        b = _batcher(run, max_candidates=30, max_delay_s=0.05)
        b.start()
        await asyncio.gather(*(b.submit(i, 10, 5) for i in range(7)))
        await b.stop()

    asyncio.run(main())
    assert sizes == [3, 3, 1]


def test_a_full_queue_refuses_at_once() -> None:
    started, gate = threading.Event(), threading.Event()

    def run(items: list[int]) -> list[int]:
        started.set()
        gate.wait(10)
        return items

    async def main() -> None:
        b = _batcher(run, queue_limit=2, max_delay_s=0)
        b.start()
        running = asyncio.create_task(b.submit(0, 1, 5))
        await _until(started.is_set, "the first run to hold the only worker")
        queued = [asyncio.create_task(b.submit(i, 1, 5)) for i in (1, 2)]
        await _until(lambda: b.depth == 2, "the queue to fill")
        with pytest.raises(QueueFull):
            await b.submit(3, 1, 5)
        gate.set()
        await asyncio.gather(running, *queued)
        await b.stop()

    asyncio.run(main())


def test_a_request_past_its_deadline_gets_an_error_and_is_not_run() -> None:
    gate = threading.Event()
    seen: list[int] = []

    def run(items: list[int]) -> list[int]:
        seen.extend(items)
        gate.wait(10)
        return items

    async def main() -> None:
        b = _batcher(run, max_delay_s=0)
        b.start()
        blocker = asyncio.create_task(b.submit(0, 1, 5))
        await _until(lambda: seen == [0], "the blocker to hold the only worker")
        with pytest.raises(DeadlineExceeded):
            await b.submit(1, 1, 0.05)
        gate.set()
        await blocker
        assert await b.submit(2, 1, 5) == 2
        await b.stop()

    asyncio.run(main())
    assert seen == [0, 2]  # request 1 expired in the queue and never ran


def test_a_failing_run_fails_only_its_own_requests() -> None:
    def run(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("bad batch")
        return items

    async def main() -> None:
        b = _batcher(run, max_delay_s=0)
        b.start()
        with pytest.raises(BatchFailed, match="bad batch"):
            await b.submit(13, 1, 5)
        assert await b.submit(4, 1, 5) == 4
        await b.stop()

    asyncio.run(main())


def test_queue_depth_is_reported_on_every_change() -> None:
    """on_depth follows the queue: up as requests wait, down as a batch takes them or their callers give up."""
    started, gate = threading.Event(), threading.Event()
    depths: list[int] = []

    def run(items: list[int]) -> list[int]:
        started.set()
        gate.wait(10)
        return items

    async def main() -> None:
        b = _batcher(run, max_delay_s=0, on_depth=depths.append)
        b.start()
        running = asyncio.create_task(b.submit(0, 1, 5))
        await _until(started.is_set, "the first run to hold the only worker")  # the next ones wait
        queued = [asyncio.create_task(b.submit(i, 1, 5)) for i in (1, 2)]
        with pytest.raises(DeadlineExceeded):
            await b.submit(3, 1, 0.02)  # gives up while queued; dropped when the next batch forms
        gate.set()
        await asyncio.gather(running, *queued)
        await b.stop()

    asyncio.run(main())
    assert depths == [1, 0, 1, 2, 3, 2, 0, 0]  # the last 0: stop() emptied the (already empty) queue


def test_without_workers_batches_run_on_the_event_loop_thread_one_at_a_time() -> None:
    """INFERENCE_WORKERS=0: no hand-off between threads; requests that arrive during a run form the next batch,
    and a failing batch still fails alone."""
    threads: list[int] = []
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        threads.append(threading.get_ident())
        calls.append(list(items))
        if 13 in items:
            raise ValueError("bad batch")
        return [i + 1 for i in items]

    async def main() -> tuple[list[int], BaseException | None]:
        b = _batcher(run, workers=0, max_delay_s=0.0)
        b.start()
        first = await b.submit(0, 1, 5)
        together = await asyncio.gather(*(b.submit(i, 1, 5) for i in range(1, 5)))
        failed = await asyncio.gather(b.submit(13, 1, 5), return_exceptions=True)
        after = await b.submit(20, 1, 5)
        await b.stop()
        return [first, *together, after], failed[0]

    out, failure = asyncio.run(main())
    assert out == [1, 2, 3, 4, 5, 21]
    assert isinstance(failure, BatchFailed) and "bad batch" in str(failure)
    assert set(threads) == {threading.get_ident()}  # asyncio.run's loop runs on this thread
    assert calls[1] == [1, 2, 3, 4]  # queued while the loop was busy: one batch


@pytest.mark.parametrize("workers", [0, 1])
def test_requests_that_expire_behind_a_long_run_are_not_run(workers: int) -> None:
    """With workers=0 the run blocks the loop, so the callers' own timers fire only after the next batch has
    been taken: the batcher checks deadlines itself and never runs a request that has already had its 504."""
    calls: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        calls.append(list(items))
        time.sleep(0.2)
        return [i.lower() for i in items]

    async def main() -> list[object]:
        b = _batcher(run, workers=workers, max_candidates=1, max_delay_s=0.0)
        b.start()
        submitted = (b.submit("A", 1, 5), b.submit("B", 1, 0.1), b.submit("C", 1, 0.1))
        out = await asyncio.gather(*submitted, return_exceptions=True)
        await b.stop()
        return out

    a, b_, c = asyncio.run(main())
    assert a == "a" and isinstance(b_, DeadlineExceeded) and isinstance(c, DeadlineExceeded)
    assert calls == [["A"]]
