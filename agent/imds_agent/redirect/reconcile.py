"""Keep the redirect rules in place: check every few seconds, re-apply when someone flushed or changed them.

Each repair is logged with what was wrong and counted, so an operator can see that something on the host keeps
removing the rules (a firewall manager reloading, a configuration tool) rather than the agent silently
fighting it.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from typing import Optional

from ..errors import AgentError
from .base import Backend, RedirectSpec, State

log = logging.getLogger(__name__)

EVENT_SETTLE = 0.02


class Reconciler:
    """A background thread that holds the rules at ``spec``."""

    def __init__(self, backend: Backend, spec: RedirectSpec, owned: bool, interval: float):
        self.backend = backend
        self.spec = spec
        self.owned = owned
        self.interval = interval
        self.repairs = 0
        self.failures = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by the kernel's change notifications: check now, not at the next poll
        self._thread: Optional[threading.Thread] = None
        self._events: Optional[socket.socket] = None

    def check_once(self) -> State:
        """Check the rules once and re-apply them unless they are fully present; return the state found."""
        try:
            result = self.backend.check(self.spec)
        except AgentError as exc:
            self.failures += 1
            log.error("cannot check the redirect rules: %s", exc)
            return State.ABSENT
        if result.state is State.PRESENT:
            return result.state
        log.warning(
            "redirect rules are %s (%s); re-applying",
            result.state.value,
            "; ".join(result.details) or "no details",
        )
        try:
            self.backend.apply(self.spec, owned=self.owned)
        except AgentError as exc:
            self.failures += 1
            log.error("cannot repair the redirect rules: %s", exc)
            return result.state
        self.repairs += 1
        log.warning("redirect rules repaired (%d repairs so far)", self.repairs)
        return result.state

    def start(self) -> None:
        """Start checking in the background (no-op when the interval is 0)."""
        if self.interval <= 0:
            return
        self._thread = threading.Thread(target=self._loop, name="imds-reconcile", daemon=True)
        self._thread.start()
        watch = getattr(self.backend, "change_events", None)
        self._events = watch() if watch is not None else None
        if self._events is not None:
            threading.Thread(target=self._listen, args=(self._events,), name="imds-rule-events", daemon=True).start()

    def stop(self) -> None:
        """Stop the background thread and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._events is not None:
            self._events.close()
        if self._thread is not None:
            self._thread.join(self.interval + 5)

    def alive(self) -> bool:
        """False once a started reconciler thread has ended without being stopped."""
        return self._thread is None or self._thread.is_alive() or self._stop.is_set()

    def _listen(self, events: socket.socket) -> None:
        """Wake the check on every change the kernel reports for the rule set (anyone's: a flush says nothing
        about whose rules it took); polling stays the fallback for what sends no notification."""
        while not self._stop.is_set():
            try:
                if not events.recv(1 << 16):
                    return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:  # ENOBUFS: notifications were lost, so something changed
                    return
            self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            if self._wake.is_set():
                time.sleep(EVENT_SETTLE)  # one flush sends a burst of notifications: check once, after them
                self._wake.clear()
            if self._stop.is_set():  # checked after the clear, so a stop that came meanwhile is never missed
                return
            try:
                self.check_once()
            except Exception:
                # A bug or an unexpected library error must not end the repairs for the rest of the agent's life.
                self.failures += 1
                log.exception("unexpected error while checking the redirect rules")
