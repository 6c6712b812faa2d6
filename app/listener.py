"""The listening sockets of a multi-process service: one per worker, bound with SO_REUSEPORT.

uvicorn's supervisor binds one socket and every worker accepts from it. A worker's event loop (uvloop)
accepts every pending connection when it wakes, so the few long-lived connections of a client often all
land on one worker: 31 of a load generator's 32 connections sat on one of two workers (``ss``), which
then did the work of both. With a socket of its own in each worker, all bound to the port with
SO_REUSEPORT, the kernel hands each new connection to one of them by a hash of its addresses.
"""

from __future__ import annotations

import socket
from typing import Any

REUSE_PORT = getattr(socket, "SO_REUSEPORT", None)  # Linux, BSDs and macOS have it


class WorkerSocket(socket.socket):
    """A socket that, when sent to a spawned worker, arrives there as a new socket of the worker's own bound
    to the same address. uvicorn's supervisor sends its sockets to each worker it starts by pickling them
    (``multiprocessing`` spawn), restarts included; this type's pickle is "bind a new one here"."""

    def __reduce__(self) -> tuple[Any, ...]:
        return bind, (self.family, self.getsockname()[:2])


def bind(family: int, address: tuple[str, int]) -> WorkerSocket:
    """A TCP socket bound to ``address`` with SO_REUSEPORT, not yet listening. The supervisor binds one too,
    which reserves the port (a port held by another program fails here, before any worker starts); it never
    listens, so the kernel never gives it a connection."""
    if REUSE_PORT is None:
        raise OSError("SO_REUSEPORT is not available on this platform")
    sock = WorkerSocket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, REUSE_PORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
