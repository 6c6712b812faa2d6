from __future__ import annotations

import asyncio

from app.store import Behaviour, MemoryStore


def test_encoding_round_trips_with_and_without_category() -> None:
    for b in (Behaviour("i1", "Drama", 5), Behaviour("x y", None, 0)):
        assert Behaviour.decode(b.encode()) == b


def test_encoding_round_trips_labels_and_reads_entries_written_without_one() -> None:
    for b in (Behaviour("i1", "Drama", 5, 1), Behaviour("i2", None, 6, 0)):
        assert Behaviour.decode(b.encode()) == b
    assert Behaviour.decode("i1\x1fDrama\x1f5") == Behaviour("i1", "Drama", 5, None)  # stored before labels


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
