"""Closing a refused connection so that its answer arrives: half-close, read what the client still sends, then
close, on one background thread.

Closing a socket with unread bytes in its receive queue (the client's request, sent right after connecting)
makes the kernel send a reset, and a reset can destroy the 503 the client has not read yet: 304 of 454 refused
connections lost their answer that way. The accept loop cannot wait for each client, so refused sockets are
handed here; each gets ``linger`` seconds to finish (the client reads the answer and closes), and at most
``capacity`` wait at once (past that a socket is closed at once, as before), so that a flood of refused
connections cannot hold the agent's descriptors.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import deque

log = logging.getLogger(__name__)


class Closer:
    """One thread that finishes closing sockets handed to it."""

    def __init__(self, linger: float = 1.0, capacity: int = 256):
        self.linger = linger
        self.capacity = capacity
        self._lock = threading.Lock()
        self._waiting: deque[tuple[float, socket.socket]] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="imds-closer", daemon=True)
        self._thread.start()

    def close(self, sock: socket.socket) -> None:
        """Half-close ``sock`` now and close it once the client is done (or ``linger`` passed)."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        with self._lock:
            if len(self._waiting) >= self.capacity or self._stop.is_set():
                sock.close()
                return
            self._waiting.append((time.monotonic() + self.linger, sock))
        self._wake.set()

    def stop(self) -> None:
        """Close every waiting socket and end the thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(2)
        with self._lock:
            while self._waiting:
                self._waiting.popleft()[1].close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        registered: dict[socket.socket, float] = {}
        try:
            while not self._stop.is_set():
                with self._lock:
                    while self._waiting:
                        deadline, sock = self._waiting.popleft()
                        sel.register(sock, selectors.EVENT_READ)
                        registered[sock] = deadline
                if not registered:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                for key, _ in sel.select(0.05):
                    sock = key.fileobj  # type: ignore[assignment]
                    try:
                        done = not sock.recv(65536)  # drained to the client's FIN
                    except BlockingIOError:
                        done = False
                    except OSError:
                        done = True
                    if done:
                        sel.unregister(sock)
                        del registered[sock]
                        sock.close()
                now = time.monotonic()
                for sock, deadline in list(registered.items()):
                    if now >= deadline:
                        sel.unregister(sock)
                        del registered[sock]
                        sock.close()
        except Exception:
            log.exception("the closer thread failed; refused connections are closed at once from now on")
            self._stop.set()
        finally:
            for sock in registered:
                sock.close()
            sel.close()
