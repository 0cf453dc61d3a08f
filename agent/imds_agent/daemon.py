"""The agent's lifecycle: build the pieces from the config, listen, redirect, drop privileges, serve, clean up.

Order matters. The listener is bound before the redirect goes in, so no client ever meets a refused connection;
the rules (and the fail-open guardian) are set up while still root; privileges are dropped before any thread
starts, because capabilities are per thread; then the accept loop and the reconciler start and systemd hears
READY. Everything started is undone in reverse order, each step in its own try so one failure does not skip the
rest.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Callable, Optional

from . import privileges, sdnotify
from .config import Config
from .errors import PrivilegeError
from .imds.token import TokenCache, fetch_from
from .imds.upstream import Upstream
from .proxy.handler import Exchange, Forwarder
from .proxy.origdst import original_dst
from .proxy.server import Connection, ProxyServer
from .redirect.lifecycle import Interception, spec_for

log = logging.getLogger(__name__)


class Agent:
    """A running imds-agent: upstream pool, token cache, forwarder, listeners and the kernel redirect."""

    def __init__(self, config: Config):
        self.config = config
        self.account = privileges.resolve_user(config.user, config.source)
        self.upstream = Upstream(config.upstream)
        self.tokens = TokenCache(fetch_from(self.upstream), config.token.ttl, config.token.refresh_margin)
        self.forwarder = Forwarder(self.upstream, self.tokens)
        self.server = ProxyServer(config.listen, self.forwarder, on_connect=self._accepted, on_exchange=self._record)
        self.interception: Optional[Interception] = None
        self._cleanup: list[tuple[str, Callable[[], None]]] = []

    def start(self) -> None:
        """Listen, install the redirect, drop privileges, then start serving and reconciling."""
        self._cleanup.append(("close upstream pool", self.upstream.close))
        self.server.bind()
        self._cleanup.append(("close listeners", self.server.close))
        if self.config.redirect.enabled:
            self._check_capabilities()
            port = self.server.addresses[0][1]
            spec = spec_for(self.config.redirect, self.config.upstream, self.account.uid, port)
            self.interception = Interception(self.config.redirect, spec)
            self._cleanup.append(("undo the redirect", self.interception.shutdown))
            self.interception.install()
        self._drop_privileges()
        self.server.start()
        if self.interception is not None:
            self.interception.start_reconciler()

    def stop(self) -> None:
        """Undo everything start() did, in reverse order; every step runs even if an earlier one fails."""
        while self._cleanup:
            what, undo = self._cleanup.pop()
            try:
                undo()
            except Exception:
                log.exception("cleanup step failed: %s", what)

    def _check_capabilities(self) -> None:
        if os.geteuid() == 0:
            return
        missing = privileges.missing_caps((privileges.CAP_NET_ADMIN,))
        if missing:
            raise PrivilegeError(
                f"installing the redirect needs {', '.join(missing)}: run as root or with it as an ambient capability"
            )

    def _drop_privileges(self) -> None:
        if os.geteuid() != 0:
            missing = privileges.missing_caps()
            if missing:
                log.warning("running without %s: some callers may not be identifiable", ", ".join(missing))
            return
        if self.account.uid == 0:
            log.warning("configured user is root: the agent keeps full privileges and root's traffic is not redirected")
            return
        privileges.drop_to(self.account)

    def _accepted(self, conn: Connection) -> None:
        conn.context["original_dst"] = original_dst(conn.sock)

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
        sdnotify.notify("READY=1", f"STATUS=serving in {config.mode} mode")
        if ready is not None:
            ready(agent)
        interval = sdnotify.watchdog_interval()
        tick = min(interval, 1.0) if interval else 1.0
        while not stop.wait(tick):
            if interval:
                sdnotify.notify("WATCHDOG=1")
        sdnotify.notify("STOPPING=1")
    finally:
        agent.stop()
    return 0
