"""The closer: a refused socket is half-closed at once and fully closed when the client is done or time is up."""

from __future__ import annotations

import socket
import time

from imds_agent.proxy.closer import Closer


def test_the_client_reads_everything_sent_and_the_socket_is_closed_after_its_fin() -> None:
    closer = Closer(linger=2.0)
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(b"a request nobody will read" * 100)
        ours.sendall(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
        closer.close(ours)
        assert theirs.recv(4096).startswith(b"HTTP/1.1 503") and theirs.recv(4096) == b""  # our FIN arrived
        theirs.close()
        deadline = time.monotonic() + 2
        while ours.fileno() != -1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ours.fileno() == -1  # closed once the client closed
    finally:
        closer.stop()


def test_a_client_that_never_closes_is_cut_off_after_the_linger() -> None:
    closer = Closer(linger=0.2)
    ours, theirs = socket.socketpair()
    try:
        closer.close(ours)
        time.sleep(0.6)
        assert ours.fileno() == -1
    finally:
        theirs.close()
        closer.stop()


def test_past_its_capacity_a_socket_is_closed_at_once() -> None:
    closer = Closer(linger=5.0, capacity=0)
    ours, theirs = socket.socketpair()
    closer.close(ours)
    assert ours.fileno() == -1
    theirs.close()
    closer.stop()
