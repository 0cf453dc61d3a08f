"""Keep the redirect rules in place: check every few seconds, re-apply when someone flushed or changed them.

Each repair is logged with what was wrong and counted, so an operator can see that something on the host keeps
removing the rules (a firewall manager reloading, a configuration tool) rather than the agent silently
fighting it.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

from ..errors import AgentError
from .base import Backend, RedirectSpec, State

log = logging.getLogger(__name__)


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
        self._thread: Optional[threading.Thread] = None

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

    def stop(self) -> None:
        """Stop the background thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)

    def alive(self) -> bool:
        """False once a started reconciler thread has ended without being stopped."""
        return self._thread is None or self._thread.is_alive() or self._stop.is_set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_once()
            except Exception:
                # A bug or an unexpected library error must not end the repairs for the rest of the agent's life.
                self.failures += 1
                log.exception("unexpected error while checking the redirect rules")
