"""The agent's lifecycle: build the pieces from the config, listen, serve until told to stop, clean up.

Order matters: the listener is bound before anything sends traffic to it, and everything started is undone in
reverse order, each step in its own try so that one failure does not skip the rest.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Callable, Optional

from .config import Config
from .imds.token import TokenCache, fetch_from
from .imds.upstream import Upstream
from .proxy.handler import Exchange, Forwarder
from .proxy.server import Connection, ProxyServer

log = logging.getLogger(__name__)


class Agent:
    """A running imds-agent: upstream pool, token cache, forwarder and listeners."""

    def __init__(self, config: Config):
        self.config = config
        self.upstream = Upstream(config.upstream)
        self.tokens = TokenCache(fetch_from(self.upstream), config.token.ttl, config.token.refresh_margin)
        self.forwarder = Forwarder(self.upstream, self.tokens)
        self.server = ProxyServer(config.listen, self.forwarder, on_exchange=self._record)
        self._cleanup: list[tuple[str, Callable[[], None]]] = []

    def start(self) -> None:
        """Bind the listeners and start serving."""
        self.server.bind()
        self._cleanup.append(("close listeners", self.server.close))
        self._cleanup.append(("close upstream pool", self.upstream.close))
        self.server.start()

    def stop(self) -> None:
        """Undo everything start() did, in reverse order; every step runs even if an earlier one fails."""
        while self._cleanup:
            what, undo = self._cleanup.pop()
            try:
                undo()
            except Exception:
                log.exception("cleanup step failed: %s", what)

    def _record(self, conn: Connection, ex: Exchange) -> None:
        log.debug(
            "%s %s %s -> %d (%s%s) %.1f ms",
            conn.peer[0],
            ex.method,
            ex.target,
            ex.status,
            ex.kind,
            ", injected" if ex.injected else "",
            ex.latency * 1000,
        )


def run(config: Config, ready: Optional[Callable[[Agent], None]] = None) -> int:
    """Run the agent in the foreground until SIGTERM or SIGINT; return the process exit code."""
    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = Agent(config)
    try:
        agent.start()
        log.info("imds-agent running in %s mode", config.mode)
        if ready is not None:
            ready(agent)
        while not stop.wait(1.0):
            pass
    finally:
        agent.stop()
    return 0
