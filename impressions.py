"""The impression log: what the service served and what came of it, defined once for both halves.

The service (``app/``) appends one ``Impression`` per answered ``/score`` request and one ``Outcome`` per
``/events`` entry that names an impression; ``training.served`` joins them into served samples. Both sides
read the record shapes, stream names and field name from here, so a sample's history is, field for field,
the history the model received. Plain Python on purpose, like ``contract.py``: no torch, no FastAPI.

Each stream entry holds one record as compact JSON under ``RECORD_FIELD``; ``record_version`` tells the
shapes apart. Version 2 (written now) holds the history and the candidates as columns, one list per field
(``{"item_id": [...], "category_id": [...], ...}``): 200 candidates as rows repeated their three key names
200 times, 8 kB of an 18 kB record, and cost the service 2.4× the time to build (bench/README.md, issue 20).
Version 1 (rows, one object per behaviour or candidate) is still read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

IMPRESSIONS_STREAM = "ctr:impressions"  # default stream names (a service's prefix may change them)
OUTCOMES_STREAM = "ctr:outcomes"
RECORD_FIELD = "r"
RECORD_VERSION = 2


@dataclass(frozen=True)
class ServedBehaviour:
    """One history behaviour as the model received it: ids as stored, its time and its known outcome."""

    item_id: str
    category_id: str | None
    timestamp: int | None  # seconds, as stored; None for a history the request supplied (it carries no times)
    label: int | None = None  # history feedback: 1 liked/clicked, 0 not, None unknown


@dataclass(frozen=True)
class ServedCandidate:
    item_id: str
    category_id: str | None
    probability: float


@dataclass(frozen=True)
class Impression:
    """One answered /score request: who, which model version, what it saw and what it answered."""

    impression_id: str
    time_ms: int  # Unix milliseconds when the answer was built
    user_id: str
    model: str
    version: str
    history_source: str  # "store" or "request": where the history came from
    history: tuple[ServedBehaviour, ...]  # most recent first, exactly the answer's ``history``
    candidates: tuple[ServedCandidate, ...]
    user_features: dict[str, str] = field(default_factory=dict)
    record_version: int = RECORD_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["history"] = _columns(d["history"], ServedBehaviour)
        d["candidates"] = _columns(d["candidates"], ServedCandidate)
        return json.dumps(d, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Impression:
        d: dict[str, Any] = json.loads(raw)
        return cls(
            impression_id=d["impression_id"],
            time_ms=int(d["time_ms"]),
            user_id=d["user_id"],
            model=d["model"],
            version=str(d["version"]),
            history_source=d.get("history_source", "store"),
            history=tuple(ServedBehaviour(**b) for b in _rows(d["history"])),
            candidates=tuple(ServedCandidate(**c) for c in _rows(d["candidates"])),
            user_features=dict(d.get("user_features") or {}),
            record_version=int(d.get("record_version", RECORD_VERSION)),
        )


def _columns(rows: list[dict[str, Any]], kind: type) -> dict[str, list[Any]]:
    """Rows as one list per field (the record's version-2 layout), every field present even with no rows."""
    return {f.name: [r[f.name] for r in rows] for f in fields(kind)}


def _rows(block: dict[str, list[Any]] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A history or candidates block as rows, from either layout (version 2 columns, version 1 rows)."""
    if isinstance(block, list):
        return block
    names = list(block)
    return [dict(zip(names, values, strict=True)) for values in zip(*block.values(), strict=True)]


@dataclass(frozen=True)
class Outcome:
    """What the user did with one candidate of an impression: label 1 a click, 0 an explicit negative."""

    impression_id: str
    user_id: str
    item_id: str
    label: int
    time_ms: int
    record_version: int = RECORD_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Outcome:
        d: dict[str, Any] = json.loads(raw)
        return cls(
            impression_id=d["impression_id"],
            user_id=d["user_id"],
            item_id=d["item_id"],
            label=int(d["label"]),
            time_ms=int(d["time_ms"]),
            record_version=int(d.get("record_version", RECORD_VERSION)),
        )
