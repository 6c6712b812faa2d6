from __future__ import annotations

import asyncio
import random

import pytest

from app.store import Behaviour, MemoryStore, decode_stored, pack_history, prepend_packed, unpack_history


def test_encoding_round_trips_with_and_without_category() -> None:
    for b in (Behaviour("i1", "Drama", 5), Behaviour("x y", None, 0)):
        assert Behaviour.decode(b.encode()) == b


def test_encoding_round_trips_labels_and_reads_entries_written_without_one() -> None:
    for b in (Behaviour("i1", "Drama", 5, 1), Behaviour("i2", None, 6, 0)):
        assert Behaviour.decode(b.encode()) == b
    assert Behaviour.decode("i1\x1fDrama\x1f5") == Behaviour("i1", "Drama", 5, None)  # stored before labels


def test_packed_history_round_trips_every_field_and_any_timestamp_order() -> None:
    history = [
        Behaviour("i1", "Drama", 1_700_000_500, 1),
        Behaviour("42", None, 1_700_000_100, None),  # times go down ...
        Behaviour("x y/é", "c7", 1_700_000_900, 0),  # ... and up again (appends are ordered by arrival)
        Behaviour("big", None, 2**70, None),  # any size: the schema bounds timestamps only below
        Behaviour("zero", "k", 0, 1),
    ]
    assert unpack_history(pack_history(history)) == history
    assert unpack_history(pack_history(history), limit=2) == history[:2]
    assert unpack_history(pack_history(history), limit=50) == history
    assert unpack_history(pack_history(history[:1])) == history[:1]
    assert unpack_history(pack_history([])) == []


def test_packed_history_is_smaller_than_its_entries_and_refuses_other_values() -> None:
    history = [Behaviour(f"i{k % 37}", f"c{k % 5}", 1_700_000_000 + 60 * k, k % 2) for k in range(200)][::-1]
    assert len(pack_history(history)) < 0.3 * sum(len(b.encode()) for b in history)
    with pytest.raises(ValueError, match="not a packed history"):
        unpack_history(b"i1\x1fDrama\x1f5")
    with pytest.raises(ValueError, match="label is 0, 1 or None"):
        pack_history([Behaviour("i1", None, 5, 2)])


def test_prepending_to_a_packed_value_gives_the_bytes_of_packing_the_whole_history() -> None:
    """An append's shortcut (cut and join the stored columns as text) against decoding and packing again:
    new entries older or newer than the stored ones, categories and labels absent or not, cut at the cap."""
    rng = random.Random(0)

    def behaviours(n: int) -> list[Behaviour]:
        return [
            Behaviour(
                rng.choice(["i1", "42", "x y/é"]) + str(rng.randrange(99)),
                rng.choice([None, "Drama", "c3"]),
                rng.randrange(2**40) if rng.random() < 0.2 else 1_700_000_000 + rng.randrange(-9999, 9999),
                rng.choice([None, 0, 1]),
            )
            for _ in range(n)
        ]

    for _ in range(200):
        stored, new, cap = behaviours(rng.randint(1, 30)), behaviours(rng.randint(1, 8)), rng.randint(1, 40)
        merged = [*new, *stored][:cap]
        assert prepend_packed(pack_history(stored), new, cap) == pack_history(merged)
        assert unpack_history(prepend_packed(pack_history(stored), new, cap)) == merged


def test_stored_values_of_either_format_decode() -> None:
    """READ returns the packed string, a list of entries written before it (3 or 4 fields), or nothing."""
    legacy = [b"i1\x1fDrama\x1f5", b"i2\x1f\x1f4\x1f1"]
    assert decode_stored(legacy) == [Behaviour("i1", "Drama", 5, None), Behaviour("i2", None, 4, 1)]
    assert decode_stored(legacy, 1) == [Behaviour("i1", "Drama", 5, None)]
    assert decode_stored(pack_history([Behaviour("a", None, 3, 0)]), 10) == [Behaviour("a", None, 3, 0)]
    assert decode_stored(None, 10) == []


def test_memory_store_keeps_most_recent_first_capped() -> None:
    async def main() -> None:
        store = MemoryStore(cap=3, ttl_s=100)
        await store.append(
            [("u", Behaviour("a", None, 3)), ("u", Behaviour("b", None, 1)), ("v", Behaviour("z", None, 9))]
        )
        await store.append([("u", Behaviour("c", "k", 7)), ("u", Behaviour("d", None, 8))])
        assert [b.item_id for b in await store.recent("u", 10)] == ["d", "c", "a"]
        assert [b.item_id for b in await store.recent("u", 2)] == ["d", "c"]
        assert [b.item_id for b in await store.recent("v", 10)] == ["z"]
        assert await store.recent("nobody", 10) == []

    asyncio.run(main())


def test_memory_store_expires_idle_users() -> None:
    async def main() -> None:
        store = MemoryStore(cap=3, ttl_s=0)
        await store.append([("u", Behaviour("a", None, 1))])
        await asyncio.sleep(0.01)
        assert await store.recent("u", 10) == []

    asyncio.run(main())
