"""bench/client.py against a scripted HTTP server: statuses, keep-alive, chunked answers, and failures."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import uvloop

from bench.client import BadAnswer, Pool, ServerDisconnected

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head, await reader.readexactly(length)


def _run(handler: Handler, client: Callable[[str], Awaitable[object]]) -> object:
    """The client on uvloop, as bench.load runs it (its transports are not asyncio.Transport subclasses)."""

    async def main() -> object:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await client(f"http://127.0.0.1:{port}")
        finally:
            server.close()

    return uvloop.run(main())


def test_keep_alive_answers_content_length_and_chunked() -> None:
    connections: list[int] = []
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        for n in range(3):
            head, body = await _read_request(reader)
            seen.append(head + body)
            if n == 1:
                writer.write(b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbusy\r\n0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100_000)
            await writer.drain()
        writer.close()

    async def client(url: str) -> list[int]:
        pool = Pool(url, 1, {"Content-Type": "application/json", "Authorization": "Bearer k"})
        try:
            return [await pool.post("/score", b'{"a": %d}' % i) for i in range(3)]
        finally:
            pool.close()

    assert _run(handler, client) == [200, 503, 200]
    assert len(connections) == 1  # one connection kept for all three
    assert seen[0].startswith(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"\r\nAuthorization: Bearer k\r\n" in seen[0] and seen[2].endswith(b'\r\n\r\n{"a": 2}')


def test_connection_close_opens_a_new_connection() -> None:
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def client(url: str) -> list[int]:
        pool = Pool(url, 2, {})
        try:
            return [await pool.post("/score", b"{}") for _ in range(3)]
        finally:
            pool.close()

    assert _run(handler, client) == [200, 200, 200]
    assert len(connections) == 3


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", ServerDisconnected),
        (b"not http at all\r\n\r\n", BadAnswer),
    ],
)
def test_a_broken_answer_is_an_os_error(answer: bytes, error: type[Exception]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(answer)
        await writer.drain()
        writer.close()

    async def client(url: str) -> object:
        pool = Pool(url, 1, {})
        with pytest.raises(error) as caught:
            await pool.post("/score", b"{}")
        assert isinstance(caught.value, OSError)  # what bench.load counts by name as a client-side error
        return True

    assert _run(handler, client) is True


def test_no_answer_within_the_timeout_raises_timeout_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        try:
            await asyncio.sleep(5)
        finally:
            writer.close()

    async def client(url: str) -> object:
        pool = Pool(url, 1, {}, timeout_s=0.2)
        with pytest.raises(TimeoutError):
            await pool.post("/score", b"{}")
        return True

    assert _run(handler, client) is True
