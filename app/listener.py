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
        return _bind, (self.family, self.getsockname())


def bind(family: int, address: tuple[Any, ...]) -> WorkerSocket:
    """The supervisor's socket: bound to ``address`` with SO_REUSEPORT and never listening, so the kernel
    never gives it a connection; it holds the port for the workers' sockets.

    The port is first bound without SO_REUSEPORT and released: every socket of a running service has
    SO_REUSEPORT, so a second service started on the same port would otherwise join the first one's group
    and take part of its connections, where it must fail (as another program holding the port fails it)."""
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no owner
        probe.bind(address)
        address = probe.getsockname()  # port 0: the one the system chose
    finally:
        probe.close()
    return _bind(family, address)


def _bind(family: int, address: tuple[Any, ...]) -> WorkerSocket:
    """A TCP socket bound to ``address`` with SO_REUSEPORT, not yet listening (a worker's, or the
    supervisor's)."""
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
    return sock
