"""Threaded listeners on loopback: accept, one worker thread per client connection, hand requests to the Forwarder.

Connections are bounded (max_connections); past the bound a client gets an immediate 503 rather than a queue
that grows without limit. Two typed hooks connect the server to the rest of the pipeline: ``identify`` turns an
accepted socket into a Client once per TCP connection (never per request), and ``report`` receives the Answer for
every answer the server sent or tried to send, refusals before a request could be parsed included.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import ListenConfig
from ..errors import ListenError
from ..identity.procs import port_holder
from .admission import Admission, Slot
from .closer import Closer
from .handler import Forwarder
from .httpio import HttpError, RequestReader, error_response
from .types import Address, Answer, Client

log = logging.getLogger(__name__)
HEARTBEAT = 1.0  # the accept loop turns at least this often, so that a watchdog can tell it is alive
IDLE_WORKER_SECONDS = 60.0  # a worker with no connection for this long ends, so a burst does not leave threads
ACCEPT_PAUSE = 0.05  # how long the accept loop rests when the process is out of descriptors
QUEUE_DEADLINE = 1.0  # a connection that waited this long for a worker is refused before any work is done for it


@dataclass(frozen=True)
class Connection:
    """One accepted client connection, before it is identified, with its admission slot."""

    sock: socket.socket
    peer: Address
    local: Address
    slot: Optional[Slot] = None
    accepted_at: float = 0.0  # time.monotonic() at accept


class RefusalLog:
    """Refusals at the connection limit go to the journal as one summary line per interval, not one each."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._lock = threading.Lock()
        self._count = 0
        self._last = 0.0

    def note(self, why: str) -> None:
        """Count one refusal; log it with the count since the last line, at most once per interval."""
        now = time.monotonic()
        with self._lock:
            self._count += 1
            if now - self._last < self.interval:
                return
            count, self._count, self._last = self._count, 0, now
        log.warning("refused %d connection(s) in the last %.0f s: %s", count, self.interval, why)


Identify = Callable[[Connection], Client]
Report = Callable[[Answer], None]


def unidentified(conn: Connection) -> Client:
    """The ``identify`` hook of a server that identifies nobody (tests, and the listener's own checks)."""
    return Client.unidentified(conn.peer, conn.local, "the connection was not identified", time.time())


def _discard(answer: Answer) -> None:
    """The ``report`` hook of a server that records nothing."""


class ProxyServer:
    """Listens on the configured addresses and serves each connection in its own thread."""

    def __init__(
        self,
        config: ListenConfig,
        forwarder: Forwarder,
        identify: Identify = unidentified,
        report: Report = _discard,
        peer_uid: Optional[Callable[[Connection], Optional[int]]] = None,
        privileged: Callable[[], frozenset[int]] = frozenset,
        container_port: Optional[int] = None,
    ):
        self.config = config
        # The container listener: on every address, for connections the prerouting redirect hands over from
        # containers' own namespaces (identify.py serves only those). None: no container listener.
        self.container_port_wanted = container_port
        self.container_port: Optional[int] = None  # the container listener's port once bound
        self.forwarder = forwarder
        self.identify = identify
        self.report = report
        self._listeners: list[socket.socket] = []
        # Without a uid lookup every connection counts as one user's: only the total cap then applies.
        per_uid = config.max_connections_per_uid if peer_uid is not None else config.max_connections
        reserved = config.reserved_connections if peer_uid is not None else 0
        self.admission = Admission(config.max_connections, per_uid, reserved, privileged, time.monotonic)
        self.peer_uid = peer_uid
        self._refusals = RefusalLog()
        # Each refused socket waits up to a second for its client: keep that far below the descriptor limit.
        self._closer = Closer(capacity=256)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: Optional[threading.Thread] = None
        self._active: set[socket.socket] = set()
        self._active_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Optional[Connection]] = queue.SimpleQueue()
        self._pool_lock = threading.Lock()
        self._idle = 0
        self._heartbeat = 0.0  # monotonic time of the accept loop's last turn

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (address, port) pairs actually bound (port 0 in the config picks a free one)."""
        return [s.getsockname()[:2] for s in self._listeners]

    def bind(self) -> None:
        """Bind and listen on every address; raise AgentError naming the address that failed."""
        port = self.config.port
        for address in self.config.addresses:
            port = self._bind_one(address, port)
        if not self._listeners:
            raise ListenError(f"no listen address could be bound ({', '.join(self.config.addresses)})")
        if self.container_port_wanted is not None:
            cport = self.container_port_wanted
            for address in ("0.0.0.0", "::"):
                cport = self._bind_one(address, cport)
            self.container_port = cport

    def _bind_one(self, address: str, port: int) -> int:
        """Listen on ``address``:``port``; return the port bound (a free one when ``port`` is 0), so that every
        address of one listener has the same port and the redirect one target."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if _ipv6_unavailable(address, exc):
                log.warning("IPv6 is disabled on this host: not listening on [%s]", address)
                return port
            raise
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            if _ipv6_unavailable(address, exc):
                log.warning("IPv6 is disabled on this host: not listening on [%s]", address)
                return port
            self.close()
            host = f"[{address}]" if family == socket.AF_INET6 else address
            why = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                holder = port_holder(port)
                why += f" (held by {holder})" if holder else " (by a process the agent cannot see)"
            raise ListenError(f"cannot listen on {host}:{port}: {why}") from None
        self._listeners.append(sock)
        return int(sock.getsockname()[1])

    def start(self) -> None:
        """Bind if needed and start accepting in a background thread."""
        if not self._listeners:
            self.bind()
        self._heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._accept_loop, name="imds-accept", daemon=True)
        self._thread.start()
        log.info("listening on %s", ", ".join(_fmt(a) for a in self.addresses))

    def alive(self) -> bool:
        """False once a started accept thread has ended without being asked to."""
        return self._thread is None or self._thread.is_alive() or self._stop.is_set()

    def stalled(self, limit: float) -> Optional[str]:
        """Why a running accept loop looks hung (no turn for ``limit`` seconds), or None."""
        if self._thread is None or self._stop.is_set() or not self._thread.is_alive():
            return None
        quiet = time.monotonic() - self._heartbeat
        return f"the accept loop has not turned for {quiet:.0f}s" if quiet > limit else None

    def drain(self, timeout: float = 5.0) -> int:
        """Stop accepting and let the requests in flight finish (at most ``timeout`` seconds) before anything
        else stops: the redirect must not go while clients wait for answers, or they hang until their own
        timeouts. Idle keep-alive connections are closed at once; a connection finishes the request it is
        serving and then closes. Returns how many connections were still open at the deadline."""
        self._stop_accepting()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.admission.close_idle()
            with self._active_lock:
                if not self._active:
                    return 0
            time.sleep(0.02)
        with self._active_lock:
            left = len(self._active)
        log.warning("%d connection(s) still busy after %.0f s of draining; closing them", left, timeout)
        return left

    def _stop_accepting(self) -> None:
        """End the accept loop (and wait for it), then close the listening sockets."""
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for sock in self._listeners:
            sock.close()
        self._listeners = []

    def close(self) -> None:
        """Stop accepting, close listeners and every open client connection, wait for the accept thread."""
        self._closer.stop()
        self._stop_accepting()
        with self._active_lock:
            for sock in list(self._active):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        with self._pool_lock:
            idle, self._idle = self._idle, 0
        for _ in range(idle):
            self._queue.put(None)  # wake idle workers so they exit

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        for sock in self._listeners:
            sel.register(sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                for key, _ in sel.select(HEARTBEAT):
                    if key.fileobj is self._wake_r:
                        return
                    self._accept(key.fileobj)  # type: ignore[arg-type]
        except Exception:
            # The thread ends here; the agent's main loop sees it (alive() turns false) and stops the agent.
            log.exception("the accept loop failed")
        finally:
            sel.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, peer = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors (a flood of connections): the listener stays readable, so without a pause
                # the loop would spin and log once per turn. One summary line per interval instead.
                self._refusals.note(f"accept failed: {exc.strerror}; pausing accepts for {ACCEPT_PAUSE * 1000:.0f} ms")
                time.sleep(ACCEPT_PAUSE)
                return
            log.warning("accept failed: %s", exc)
            return
        conn = Connection(sock, peer[:2], sock.getsockname()[:2])
        uid = self.peer_uid(conn) if self.peer_uid is not None else None
        slot, why = self.admission.admit(uid, sock)
        if slot is None:
            self._refusals.note(why)
            self._refuse(conn, HttpError(503, why), f"refused at the connection limit: {why}", uid)
            return
        conn = Connection(sock, peer[:2], sock.getsockname()[:2], slot, time.monotonic())
        with self._pool_lock:
            need_worker = self._idle == 0
            if not need_worker:
                self._idle -= 1  # this connection is promised to an idle worker
        if need_worker:
            try:
                threading.Thread(target=self._worker, args=(conn,), name="imds-conn", daemon=True).start()
            except RuntimeError:
                self.admission.release(slot)
                self._refuse(conn, HttpError(503, "cannot start a worker"), "refused: no worker thread")
            return
        self._queue.put(conn)

    def _worker(self, first: Connection) -> None:
        """Serve connections one after another; an idle worker waits for the next one instead of exiting, which
        saves the ~80 us of starting a thread for every new client connection. Workers never outnumber the
        connection slots, because a new one starts only when no worker is idle."""
        conn: Optional[Connection] = first
        while conn is not None and not self._stop.is_set():
            self._serve(conn)
            with self._pool_lock:
                self._idle += 1
            conn = self._next_connection()

    def _next_connection(self) -> Optional[Connection]:
        """Wait for a connection; None tells the worker to end (the server closes, or it idled too long)."""
        while True:
            try:
                return self._queue.get(timeout=IDLE_WORKER_SECONDS)
            except queue.Empty:
                with self._pool_lock:
                    # _idle counts waiting workers not yet promised a connection. Above zero, one of them can
                    # go; at zero a connection is on its way to a waiting worker, which may be this one.
                    if self._idle > 0:
                        self._idle -= 1
                        return None

    def _serve(self, conn: Connection) -> None:
        sock = conn.sock
        with self._active_lock:
            self._active.add(sock)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if _gone(sock):
                return  # closed while it waited for a worker: nothing to identify or answer
            if conn.accepted_at and time.monotonic() - conn.accepted_at > QUEUE_DEADLINE:
                # Its client has most likely given up (the SDKs wait 1 s): answer at once, do no work for it.
                self._refuse(conn, HttpError(503, "the agent is overloaded; retry"), "waited too long for a worker")
                return
            client = self.identify(conn)
            reader = RequestReader(sock, self.config.idle_timeout, self.config.request_timeout)
            while not self._stop.is_set():
                try:
                    # Waiting for the next request with nothing of it received: the first to go if slots run short.
                    idle = not reader.pending
                    self._mark_idle(conn, idle)
                    req = reader.read(started=lambda: self._mark_idle(conn, False)) if idle else reader.read()
                except HttpError as exc:
                    log.info("bad request from %s: %s", _fmt(conn.peer), exc)
                    sent = _send(sock, error_response(exc.status, exc.message, close=True))
                    self._report(self.forwarder.refusal(client, exc), sent)
                    return
                if req is None:
                    return
                reply = self.forwarder.handle(req, client)
                sent = _send(sock, reply.data)
                self._report(reply.answer, sent)
                if not sent or reply.close:
                    return
        except Exception:
            # A bug in one connection must not take the listener down with it.
            log.exception("unexpected error serving %s", _fmt(conn.peer))
        finally:
            with self._active_lock:
                self._active.discard(sock)
            sock.close()
            if conn.slot is not None:
                self.admission.release(conn.slot)

    def _mark_idle(self, conn: Connection, idle: bool) -> None:
        if conn.slot is not None:
            self.admission.idle(conn.slot, idle)

    def _refuse(self, conn: Connection, error: HttpError, why: str, uid: Optional[int] = None) -> None:
        """Answer a connection the server will not serve, close it, and report it (its caller not looked up)."""
        client = Client.unidentified(conn.peer, conn.local, why, time.time(), uid)
        sent = _send(conn.sock, error_response(error.status, error.message, close=True))
        self._closer.close(conn.sock)
        self._report(self.forwarder.refusal(client, error), sent)

    def _report(self, answer: Answer, sent: bool) -> None:
        """Hand one Answer to the report hook; recording must never take a connection down."""
        try:
            self.report(answer if sent else dataclasses.replace(answer, sent=False))
        except Exception:
            log.exception("recording an answer failed")


def _ipv6_unavailable(address: str, exc: OSError) -> bool:
    """Whether binding IPv6 (loopback, or the container listener's any-address) failed because the host has IPv6
    switched off (ipv6.disable=1 or disable_ipv6 on lo): a host choice the agent follows, unlike any other failure
    to listen."""
    v6 = ipaddress.ip_address(address) in (ipaddress.IPv6Address("::1"), ipaddress.IPv6Address("::"))
    return v6 and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL)


def _gone(sock: socket.socket) -> bool:
    """Whether the client closed its end before sending anything (a peek that sees end-of-file)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.settimeout(10)
        sock.sendall(data)
        return True
    except OSError:
        return False


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
