"""The impression log alone: ids, sampling, the record's bytes against impressions.py's dataclasses, and the
background writer driven with asyncio against sinks that fail on purpose (no server, no Redis)."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from app.impression_log import (
    ImpressionLog,
    LogError,
    Served,
    attribution,
    impression_record,
    new_impression_id,
    sampled,
)
from app.metrics import Metrics
from app.schemas import IMPRESSION_ID_PATTERN
from impressions import Impression, ServedBehaviour, ServedCandidate


@dataclass
class FakeModel:
    name: str = "din"
    version: str = "7"
    feature_names: list[str] = field(default_factory=lambda: ["age", "gender"])
    table: dict[str, str] = field(default_factory=lambda: {"i1": "c1", "i2": "c2", "i3": "c3"})

    def category_of(self, item_id: str) -> str | None:
        return self.table.get(item_id)


def _served(impression_id: str | None = None, **kw: Any) -> Served:
    model: Any = FakeModel()
    args: dict[str, Any] = {
        "impression_id": impression_id or new_impression_id("din", "7"),
        "time_ms": 1_700_000_000_123,
        "user_id": "u1",
        "model": model,
        "history_source": "store",
        "history": [
            {"item_id": "i3", "category_id": "c3", "label": 1},
            {"item_id": "i1", "category_id": "c1", "label": None},
        ],
        "timestamps": [200, 100],
        "user_features": {"age": "30", "unused": "x"},
        "candidates": [("i2", None), ("i9", "given"), ("i8", None)],
        "probabilities": [0.25, 0.5, 0.125],
    }
    args.update(kw)
    return Served(**args)


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_ids_are_unique_match_the_schema_and_carry_the_version() -> None:
    ids = {new_impression_id("din-2_x", "12") for _ in range(2000)}
    assert len(ids) == 2000
    assert all(re.fullmatch(IMPRESSION_ID_PATTERN, i) for i in ids)
    assert {attribution(i) for i in ids} == {("din-2_x", "12")}


def test_the_record_is_the_impression_dataclass_field_for_field() -> None:
    s = _served()
    raw = impression_record(s)
    expected = Impression(
        impression_id=s.impression_id,
        time_ms=1_700_000_000_123,
        user_id="u1",
        model="din",
        version="7",
        history_source="store",
        history=(ServedBehaviour("i3", "c3", 200, 1), ServedBehaviour("i1", "c1", 100, None)),
        # a candidate's category: the request's, else the model's item table (what the model received)
        candidates=(
            ServedCandidate("i2", "c2", 0.25),
            ServedCandidate("i9", "given", 0.5),
            ServedCandidate("i8", None, 0.125),
        ),
        user_features={"age": "30"},  # only the features the model reads
    )
    assert Impression.from_json(raw) == expected
    assert json.loads(raw) == json.loads(expected.to_json())  # same keys, same values, as the dataclass writes them


def test_a_request_history_has_no_timestamps() -> None:
    raw = impression_record(_served(history_source="request", timestamps=None))
    assert [b.timestamp for b in Impression.from_json(raw).history] == [None, None]


def test_sampling_is_decided_by_the_id_alone() -> None:
    ids = [new_impression_id("din", "1") for _ in range(4000)]
    assert all(sampled(i, 1.0) for i in ids) and not any(sampled(i, 0.0) for i in ids)
    kept = [i for i in ids if sampled(i, 0.25)]
    assert 0.2 < len(kept) / len(ids) < 0.3
    assert kept == [i for i in ids if sampled(i, 0.25)]  # the same answer wherever it is asked
    assert set(kept) <= {i for i in ids if sampled(i, 0.5)}  # a larger rate keeps what a smaller one kept


class Sink:
    """Records what it is given; ``fail`` makes writes raise, ``gate`` holds them until set."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.fail: Exception | None = None
        self.refuse = 0  # the last n records of the next batch are refused (a partial pipeline failure)
        self.gate: asyncio.Event | None = None
        self.closed = False

    async def write(self, records: list[bytes]) -> int:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        refused, self.refuse = self.refuse, 0
        self.batches.append(records[: len(records) - refused])
        return len(records) - refused

    async def store_with_outcomes(self, store: Any, events: Any, outcomes: Any) -> int:
        raise AssertionError("not used here")

    async def close(self) -> None:
        self.closed = True


def _log(sink: Sink, **kw: Any) -> tuple[ImpressionLog, Metrics]:
    metrics = Metrics()
    opts = {"sample": 1.0, "queue_size": 100, "batch_size": 10, "timeout_s": 1.0, **kw}
    return ImpressionLog(sink, metrics, **opts), metrics  # type: ignore[arg-type]


async def _until(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_impressions_are_written_in_batches_off_the_request_path() -> None:
    sink = Sink()

    async def main() -> Metrics:
        log, metrics = _log(sink)
        log.start()
        for _ in range(25):
            log.served(_served())  # returns at once: nothing is written yet
        assert sink.batches == [] and _value(metrics, "ctr_impression_log_queue_depth") == 25
        await _until(lambda: sum(map(len, sink.batches)) == 25, "the batch to be written")
        await log.close()
        return metrics

    metrics = asyncio.run(main())
    assert [len(b) for b in sink.batches] == [10, 10, 5]  # batch_size records a round trip
    assert _value(metrics, "ctr_impressions_logged_total") == 25
    assert _value(metrics, "ctr_impression_log_queue_depth") == 0 and sink.closed


def test_a_full_queue_drops_new_impressions_and_counts_them() -> None:
    sink = Sink()
    sink.gate = asyncio.Event()

    async def main() -> Metrics:
        log, metrics = _log(sink, queue_size=3)
        log.start()
        for _ in range(5):
            log.served(_served())
        sink.gate.set()  # type: ignore[union-attr]
        await log.close()
        return metrics

    metrics = asyncio.run(main())
    assert _value(metrics, "ctr_impressions_dropped_total", reason="queue_full") == 2
    assert _value(metrics, "ctr_impressions_logged_total") == 3  # close() wrote what was queued


def test_write_errors_drop_the_batch_count_it_and_the_writer_goes_on() -> None:
    sink = Sink()
    sink.fail = LogError("down")

    async def main() -> Metrics:
        log, metrics = _log(sink)
        log.start()
        for _ in range(4):
            log.served(_served())
        await _until(lambda: _value(metrics, "ctr_impressions_dropped_total", reason="write_error") == 4, "drops")
        sink.fail = None
        sink.refuse = 1
        for _ in range(3):
            log.served(_served())
        await _until(lambda: sink.batches, "the log to work again")
        await log.close()
        return metrics

    metrics = asyncio.run(main())
    assert _value(metrics, "ctr_impressions_dropped_total", reason="write_error") == 5  # 4, then 1 refused
    assert _value(metrics, "ctr_impressions_logged_total") == 2
    assert _value(metrics, "ctr_impression_log_errors_total", log="impressions") == 2


def test_a_slow_log_times_out_and_a_record_that_cannot_be_built_does_not_stop_the_writer() -> None:
    sink = Sink()
    sink.gate = asyncio.Event()  # never set: every write hangs

    async def main() -> Metrics:
        log, metrics = _log(sink, timeout_s=0.05)
        log.start()
        log.served(_served())
        await _until(lambda: _value(metrics, "ctr_impressions_dropped_total", reason="write_error") == 1, "timeout")
        sink.gate = None
        log.served(_served(probabilities=[0.5]))  # fewer probabilities than candidates: the record fails
        log.served(_served())
        await _until(lambda: sink.batches, "a good batch")
        await log.close()
        return metrics

    metrics = asyncio.run(main())
    assert _value(metrics, "ctr_impressions_dropped_total", reason="write_error") == 2  # the slow one, the bad one
    assert _value(metrics, "ctr_impressions_logged_total") == 1  # its batch-mate


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_only_sampled_impressions_are_queued(rate: float) -> None:
    sink = Sink()
    served = [_served() for _ in range(200)]

    async def main() -> None:
        log, _ = _log(sink, sample=rate, queue_size=1000, batch_size=1000)
        log.start()
        for s in served:
            log.served(s)
        await log.close()

    asyncio.run(main())
    written = [json.loads(r)["impression_id"] for b in sink.batches for r in b]
    assert written == [s.impression_id for s in served if sampled(s.impression_id, rate)]
