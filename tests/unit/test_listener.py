"""app/listener.py: a worker's socket of its own on the supervisor's port, and the kernel spreading connections."""

from __future__ import annotations

import pickle
import select
import socket

import pytest

from app import listener


def _accepted(sockets: list[socket.socket], expected: int) -> list[int]:
    """How many of ``expected`` pending connections each listening socket accepts."""
    counts = [0] * len(sockets)
    while sum(counts) < expected:
        ready, _, _ = select.select(sockets, [], [], 5)
        assert ready, "connections were not accepted"
        for sock in ready:
            conn, _ = sock.accept()
            conn.close()
            counts[sockets.index(sock)] += 1
    return counts


def test_a_pickled_socket_arrives_as_a_new_socket_on_the_same_port() -> None:
    parent = listener.bind(socket.AF_INET, ("127.0.0.1", 0))  # what the supervisor holds: bound, not listening
    workers = [pickle.loads(pickle.dumps(parent)) for _ in range(2)]  # what spawn does for each worker
    try:
        for w in workers:
            assert isinstance(w, listener.WorkerSocket) and w.fileno() != parent.fileno()
            assert w.getsockname() == parent.getsockname()
            w.listen(64)
        clients = [socket.create_connection(parent.getsockname()) for _ in range(32)]
        counts = _accepted(list(workers), 32)
        assert all(n > 0 for n in counts), counts  # by hash: all 32 on one of two would be a 1 in 2^31 event
        for c in clients:
            c.close()
    finally:
        for s in (parent, *workers):
            s.close()


def test_a_port_held_by_another_program_is_refused_before_any_worker_starts() -> None:
    other = socket.socket()
    other.bind(("127.0.0.1", 0))
    other.listen()
    try:
        with pytest.raises(OSError):
            listener.bind(socket.AF_INET, other.getsockname())
    finally:
        other.close()


def test_a_second_service_on_the_same_port_is_refused() -> None:
    first = listener.bind(socket.AF_INET, ("127.0.0.1", 0))
    worker = pickle.loads(pickle.dumps(first))
    worker.listen()
    try:
        with pytest.raises(OSError):  # it would join the first service's SO_REUSEPORT group otherwise
            listener.bind(socket.AF_INET, first.getsockname())
    finally:
        worker.close()
        first.close()


def test_ipv6_addresses_keep_their_scope() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        parent = listener.bind(socket.AF_INET6, ("::1", 0))
    except OSError as e:  # IPv6 present in the kernel but no loopback address configured
        pytest.skip(f"::1 cannot be bound here: {e}")
    worker = pickle.loads(pickle.dumps(parent))
    try:
        assert worker.family == socket.AF_INET6 and worker.getsockname() == parent.getsockname()
    finally:
        worker.close()
        parent.close()
