"""The load generator's HTTP/1.1 client: keep-alive connections on asyncio protocols, answers parsed by
httptools (llhttp, the parser uvicorn itself uses) and counted, never copied or decoded.

The client runs on the server's 2 cores, so each of its CPU-milliseconds is taken from the service it
measures. For a 200 × 50 /score answer with attention (≈ 130 kB) this client spent 0.31 CPU-ms per
request against aiohttp's 0.66, and the service answered 11–13% more requests in the same runs
(bench/README.md). It does what perf_analyzer's HTTP client does: POST a prepared body, read the status,
consume the body, keep the connection.
"""

from __future__ import annotations

import asyncio
from typing import cast
from urllib.parse import urlparse

import httptools


class ServerDisconnected(ConnectionError):
    """The server closed the connection before the answer was complete."""


class BadAnswer(ConnectionError):
    """The server's bytes are not an HTTP/1.1 answer."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[int] | None = None
        self.reusable = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport does not subclass it

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(BadAnswer(str(e)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._fail(exc or ServerDisconnected("the server closed the connection"))

    # httptools callbacks
    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(self.parser.get_status_code())

    async def send(self, request: bytes) -> int:
        """Write one request and wait for its answer's status (the body is read and dropped)."""
        if self.transport is None or not self.reusable or self.transport.is_closing():
            raise ServerDisconnected("the server closed the connection before the request was sent")
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.answer

    def _fail(self, exc: BaseException) -> None:
        self.reusable = False
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Pool:
    """At most ``size`` connections to one server; a request waits for a free one, and that wait is part of
    its latency (an open loop past saturation), not an error."""

    def __init__(self, url: str, size: int, headers: dict[str, str], timeout_s: float = 30.0) -> None:
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        lines = [f"Host: {parsed.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
        self.head = "\r\n".join(lines).encode()
        self.timeout_s = timeout_s
        self.slots = asyncio.Semaphore(size)
        self.idle: list[_Connection] = []

    async def post(self, path: str, body: bytes) -> int:
        """The status of ``POST path`` with ``body``; connection failures and timeouts raise."""
        request = b"POST %s HTTP/1.1\r\n%s\r\nContent-Length: %d\r\n\r\n%s" % (
            path.encode(),
            self.head,
            len(body),
            body,
        )
        async with self.slots:
            conn = self._idle() or await self._connect()
            try:
                async with asyncio.timeout(self.timeout_s):
                    status = await conn.send(request)
            except BaseException:
                conn.close()
                raise
            if conn.reusable:
                self.idle.append(conn)
            else:
                conn.close()
            return status

    def _idle(self) -> _Connection | None:
        """The last connection put back that the server has not closed meanwhile (keep-alive timeout)."""
        while self.idle:
            conn = self.idle.pop()
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.timeout_s):
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
        return conn

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()
