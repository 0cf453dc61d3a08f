"""The listener's connection handling on loopback: the connection cap, worker reuse and retirement."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import pytest

from imds_agent.config import ListenConfig
from imds_agent.proxy import server as servermod
from imds_agent.proxy.handler import Reply
from imds_agent.proxy.httpio import HttpError, Request, render_response
from imds_agent.proxy.server import ProxyServer
from imds_agent.proxy.types import Answer, Client, Kind, Outcome


class Echo:
    """A forwarder stand-in that answers every request with its path."""

    def handle(self, req: Request, client: Client) -> Reply:
        data = render_response(200, "OK", [("Content-Type", "text/plain")], req.target.encode())
        return Reply(data, False, Answer(0.0, "audit", client, req.method, req.target, Kind.V1, 200, Outcome.ALLOW))

    def refusal(self, client: Client, error: HttpError, kind: Kind = Kind.INVALID, req: Optional[Request] = None,
                latency: float = 0.0) -> Answer:  # fmt: skip
        return Answer(0.0, "audit", client, "", "", kind, error.status, Outcome.REFUSED, cause=error.message)


def make_server(report: Optional[list[Answer]] = None, **listen: Any) -> ProxyServer:
    listen.setdefault("reserved_connections", 0)
    config = ListenConfig(port=0, addresses=("127.0.0.1",), idle_timeout=5.0, request_timeout=1.0, **listen)
    if report is None:
        srv = ProxyServer(config, Echo())  # type: ignore[arg-type]
    else:
        srv = ProxyServer(config, Echo(), report=report.append)  # type: ignore[arg-type]
    srv.start()
    return srv


def wait_for(answers: list[Answer], n: int) -> None:
    deadline = time.monotonic() + 5
    while len(answers) < n and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.fixture
def server() -> Iterator[ProxyServer]:
    srv = make_server()
    yield srv
    srv.close()


def ask(sock: socket.socket, path: str) -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock.recv(4096)


def workers() -> set[threading.Thread]:
    """Connection worker threads alive now (compare sets: other tests' workers may end meanwhile)."""
    return {t for t in threading.enumerate() if t.name == "imds-conn"}


def test_past_the_cap_a_client_gets_503_at_once_and_a_freed_slot_is_reused() -> None:
    srv = make_server(max_connections=2)
    try:
        # Both slots busy: each connection is in the middle of sending its request (not idle, not evictable).
        held = [socket.create_connection(srv.addresses[0], timeout=3) for _ in range(2)]
        for sock in held:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.1)
        with socket.create_connection(srv.addresses[0], timeout=3) as extra:
            started = time.monotonic()
            assert extra.recv(4096).startswith(b"HTTP/1.1 503")
            assert time.monotonic() - started < 1
        held.pop().close()
        time.sleep(0.2)  # the worker notices the close and frees the slot
        with socket.create_connection(srv.addresses[0], timeout=3) as again:
            assert ask(again, "/again").endswith(b"/again")
        for sock in held:
            sock.close()
    finally:
        srv.close()


def test_when_slots_run_short_the_longest_idle_keep_alive_connection_makes_room() -> None:
    srv = make_server(max_connections=2)
    try:
        held = [socket.create_connection(srv.addresses[0], timeout=3) for _ in range(2)]
        for i, sock in enumerate(held):
            assert ask(sock, f"/held{i}").endswith(f"/held{i}".encode())  # served, now idle between requests
            time.sleep(0.05)
        with socket.create_connection(srv.addresses[0], timeout=3) as extra:
            assert ask(extra, "/new").endswith(b"/new")  # admitted, not 503
        assert held[0].recv(4096) == b""  # the one idle longest was closed for it
        assert ask(held[1], "/still").endswith(b"/still")
        for sock in held:
            sock.close()
    finally:
        srv.close()


def test_sequential_connections_reuse_one_worker(server: ProxyServer) -> None:
    before = workers()
    for i in range(20):
        with socket.create_connection(server.addresses[0], timeout=3) as sock:
            assert ask(sock, f"/{i}").endswith(f"/{i}".encode())
        time.sleep(0.01)  # closed before the next: its worker is idle again
    assert len(workers() - before) == 1


def test_idle_workers_end_after_a_burst_and_service_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servermod, "IDLE_WORKER_SECONDS", 0.3)
    srv = make_server()
    try:
        before = workers()
        burst = [socket.create_connection(srv.addresses[0], timeout=3) for _ in range(8)]
        for i, sock in enumerate(burst):
            assert ask(sock, f"/b{i}").endswith(f"/b{i}".encode())
        assert len(workers() - before) == 8
        for sock in burst:
            sock.close()
        deadline = time.monotonic() + 5
        while workers() - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not workers() - before
        with socket.create_connection(srv.addresses[0], timeout=3) as sock:
            assert ask(sock, "/after").endswith(b"/after")
    finally:
        srv.close()


def test_every_answer_is_reported_refusals_before_parsing_included() -> None:
    answers: list[Answer] = []
    srv = make_server(report=answers, max_connections=1)
    try:
        with socket.create_connection(srv.addresses[0], timeout=3) as held:
            assert ask(held, "/ok").endswith(b"/ok")
            wait_for(answers, 1)
            held.sendall(b"GET /slow HTTP/1.1\r\n")  # busy now: its slot cannot be taken
            time.sleep(0.1)
            with socket.create_connection(srv.addresses[0], timeout=3) as extra:
                assert extra.recv(4096).startswith(b"HTTP/1.1 503")
            wait_for(answers, 2)
        time.sleep(0.2)  # the held slot is free again
        with socket.create_connection(srv.addresses[0], timeout=3) as tls:
            tls.sendall(b"\x16\x03\x01\x02\x00\x01")  # a TLS ClientHello's first bytes
            assert tls.recv(4096).startswith(b"HTTP/1.1 400")
        wait_for(answers, 4)
    finally:
        srv.close()
    # The held connection left in the middle of its request is a 400 of its own.
    assert [(a.status, a.outcome) for a in answers] == [(200, Outcome.ALLOW), (503, Outcome.REFUSED),
                                                        (400, Outcome.REFUSED), (400, Outcome.REFUSED)]  # fmt: skip
    at_cap = answers[1].caller
    assert not at_cap.known and "connection limit" in at_cap.reason


def test_a_failing_report_hook_never_costs_the_client_its_answer() -> None:
    config = ListenConfig(port=0, addresses=("127.0.0.1",), idle_timeout=5.0, request_timeout=1.0)

    def broken(answer: Answer) -> None:
        raise RuntimeError("disk on fire")

    srv = ProxyServer(config, Echo(), report=broken)  # type: ignore[arg-type]
    srv.start()
    try:
        with socket.create_connection(srv.addresses[0], timeout=3) as sock:
            assert ask(sock, "/one").endswith(b"/one")
            assert ask(sock, "/two").endswith(b"/two")  # the same keep-alive connection goes on
    finally:
        srv.close()


def test_a_refused_client_gets_its_whole_503_not_a_reset() -> None:
    """Closing with the client's request unread made the kernel reset the connection, destroying the 503."""
    srv = make_server(max_connections=1)
    try:
        with socket.create_connection(srv.addresses[0], timeout=3) as held:
            held.sendall(b"GET /slow HTTP/1.1\r\n")  # busy: the only slot stays taken
            time.sleep(0.1)
            complete = resets = 0
            for _ in range(100):
                with socket.create_connection(srv.addresses[0], timeout=3) as sock:
                    sock.sendall(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n\r\n" + b"X" * 4096)
                    time.sleep(0.002)
                    try:
                        reply = b""
                        while chunk := sock.recv(4096):
                            reply += chunk
                        complete += reply.startswith(b"HTTP/1.1 503") and reply.endswith(b"\n")
                    except ConnectionResetError:
                        resets += 1
    finally:
        srv.close()
    assert (complete, resets) == (100, 0)


class SlowEcho(Echo):
    def handle(self, req: Request, client: Client) -> Reply:
        time.sleep(0.5)
        return super().handle(req, client)


def test_drain_lets_the_request_in_flight_finish_and_closes_idle_connections_at_once() -> None:
    config = ListenConfig(port=0, addresses=("127.0.0.1",), idle_timeout=30.0, request_timeout=1.0)
    srv = ProxyServer(config, SlowEcho())  # type: ignore[arg-type]
    srv.start()
    address = srv.addresses[0]
    try:
        idle = socket.create_connection(address, timeout=3)
        assert ask(idle, "/first").endswith(b"/first")
        busy = socket.create_connection(address, timeout=3)
        busy.sendall(b"GET /in-flight HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.1)  # being served now
        result: list[int] = []
        drainer = threading.Thread(target=lambda: result.append(srv.drain(timeout=3)))
        started = time.monotonic()
        drainer.start()
        assert idle.recv(4096) == b""  # the idle keep-alive connection is closed at once
        assert busy.recv(4096).endswith(b"/in-flight")  # the request in flight gets its whole answer
        drainer.join(5)
        assert result == [0] and time.monotonic() - started < 2
        with pytest.raises(OSError):
            socket.create_connection(address, timeout=1)  # no longer accepting
        idle.close()
        busy.close()
    finally:
        srv.close()


def test_work_for_clients_that_are_gone_is_not_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that waited past the deadline for a worker is answered 503 at once, before identification;
    one whose client already closed is dropped without any work."""
    alive, other = socket.socketpair()
    assert servermod._gone(alive) is False
    other.close()
    left, right = socket.socketpair()
    right.close()
    assert servermod._gone(left) is True
    identified: list[object] = []
    answers: list[Answer] = []

    def identify(conn: servermod.Connection) -> Client:
        identified.append(conn)
        return servermod.unidentified(conn)

    monkeypatch.setattr(servermod, "QUEUE_DEADLINE", -1.0)  # every connection has waited too long
    config = ListenConfig(port=0, addresses=("127.0.0.1",), reserved_connections=0)
    srv = ProxyServer(config, Echo(), identify=identify, report=answers.append)  # type: ignore[arg-type]
    srv.start()
    try:
        with socket.create_connection(srv.addresses[0], timeout=3) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 503")
        wait_for(answers, 1)
    finally:
        srv.close()
    assert identified == [] and answers[0].caller.reason == "waited too long for a worker"


def test_out_of_descriptors_the_accept_loop_pauses_and_logs_one_summary(caplog: pytest.LogCaptureFixture) -> None:
    import errno

    srv = make_server()
    try:

        class Exhausted:
            def accept(self) -> None:
                raise OSError(errno.EMFILE, "Too many open files")

        started = time.monotonic()
        for _ in range(5):
            srv._accept(Exhausted())  # type: ignore[arg-type]
        assert time.monotonic() - started >= 5 * servermod.ACCEPT_PAUSE * 0.9  # rests instead of spinning
        assert caplog.text.count("Too many open files") == 1  # one summary line, not one per turn
    finally:
        srv.close()
