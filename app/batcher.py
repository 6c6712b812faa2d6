"""Dynamic batching: concurrent requests merged into one inference task (Triton's max_queue_delay idea).

A request waits in a bounded queue; a batch closes when it holds ``max_candidates`` candidates or its
oldest request has waited ``max_delay_s``, then runs on a worker thread, off the event loop (or, with
``workers=0``, on the event loop itself), and every result or exception goes back to its own request.
Knows nothing of HTTP or models.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(Exception):
    """The queue is at its limit: the caller should retry later (503)."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before it ran (504)."""


class BatchFailed(Exception):
    """The inference call that held this request failed (500); other batches are unaffected."""


@dataclass
class BatchStats:
    requests: int
    candidates: int
    queue_waits: list[float]  # seconds each request waited before its batch started
    run_seconds: float


@dataclass
class _Pending(Generic[T, R]):
    item: T
    size: int
    future: asyncio.Future[R]
    timeout_s: float
    enqueued: float = field(default_factory=time.monotonic)

    def late(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"not scored within {1e3 * self.timeout_s:.0f} ms")


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        *,
        max_candidates: int,
        max_delay_s: float,
        queue_limit: int,
        workers: int = 1,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        """``on_depth`` gets the number of waiting requests whenever it changes (a gauge's ``set``: read at
        scrape time instead, it would miss the other processes of a multi-process service)."""
        self._run = run
        self.max_candidates, self.max_delay_s, self.queue_limit = max_candidates, max_delay_s, queue_limit
        self._queue: deque[_Pending[T, R]] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(max(1, workers))
        # workers=0: batches run on the event loop's own thread, one at a time (no hand-off between threads)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference") if workers else None
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not counting those running)."""
        return len(self._queue)

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for p in self._queue:
            if not p.future.done():
                p.future.set_exception(QueueFull("the service is shutting down"))
        self._queue.clear()
        self._depth_changed()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, item: T, size: int, timeout_s: float) -> R:
        """Queue ``item`` (``size`` candidates) and wait for its result."""
        if len(self._queue) >= self.queue_limit:
            raise QueueFull(f"{len(self._queue)} requests already queued")
        pending: _Pending[T, R] = _Pending(item, size, asyncio.get_running_loop().create_future(), timeout_s)
        self._queue.append(pending)
        self._depth_changed()
        self._arrived.set()
        try:
            async with asyncio.timeout(timeout_s):  # on expiry the future is cancelled: _collect drops it
                return await pending.future
        except TimeoutError:
            if pending.future.done() and not pending.future.cancelled():  # scored in the tick the deadline hit
                return pending.future.result()
            raise pending.late() from None

    async def _loop(self) -> None:
        while True:
            await self._arrived.wait()
            await self._slots.acquire()  # a worker is free: close the next batch
            batch = await self._collect()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _collect(self) -> list[_Pending[T, R]]:
        self._drop_abandoned()
        if not self._queue:
            self._arrived.clear()
            return []
        fill_until = self._queue[0].enqueued + self.max_delay_s
        while sum(p.size for p in self._queue) < self.max_candidates:
            remaining = fill_until - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        self._drop_abandoned()
        batch: list[_Pending[T, R]] = []
        total = 0
        while self._queue and (not batch or total + self._queue[0].size <= self.max_candidates):
            p = self._queue.popleft()
            batch.append(p)
            total += p.size
        if not self._queue:
            self._arrived.clear()
        self._depth_changed()
        return batch

    def _drop_abandoned(self) -> None:
        """Requests whose caller stopped waiting (deadline, disconnect) are not run. A deadline is checked here
        too, not only by the caller's timer: with workers=0 a run blocks the loop, and the timers of requests
        that expired meanwhile fire only after the next batch has been taken."""
        now = time.monotonic()
        kept: deque[_Pending[T, R]] = deque()
        for p in self._queue:
            if not p.future.done() and now >= p.enqueued + p.timeout_s:
                p.future.set_exception(p.late())
            if not p.future.done():
                kept.append(p)
        if len(kept) != len(self._queue):
            self._queue = kept
            self._depth_changed()

    def _depth_changed(self) -> None:
        if self._on_depth is not None:
            self._on_depth(len(self._queue))

    async def _execute(self, batch: list[_Pending[T, R]]) -> None:
        started = time.monotonic()
        try:
            items = [p.item for p in batch]
            if self._executor is None:
                results = self._run(items)
            else:
                results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, items)
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} requests")
        except Exception as e:  # the batch fails alone; the loop keeps serving
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(BatchFailed(f"inference failed: {e!r}"))
            return
        finally:
            self._slots.release()
        run_seconds = time.monotonic() - started
        for p, r in zip(batch, results, strict=True):
            if not p.future.done():  # its caller may have given up meanwhile
                p.future.set_result(r)
        if self._on_batch is not None:
            self._on_batch(
                BatchStats(len(batch), sum(p.size for p in batch), [started - p.enqueued for p in batch], run_seconds)
            )
