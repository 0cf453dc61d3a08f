"""The agent assembled: the pipeline's pieces built from the config, started in order and undone in reverse.

accept (proxy/server.py) -> identify (proxy/identify.py) -> decide (proxy/gate.py) -> forward (proxy/handler.py)
-> record (audit/recorder.py). Order of start matters: the listener is bound before the redirect goes in, so no
client ever meets a refused connection; the rules (and the fail-open guardian) are set up while still root;
privileges are dropped before any thread starts, because capabilities are per thread; then the accept loop and
the reconciler start. Each undo step runs in its own try so one failure does not skip the rest. The life around
it (signals, watchdog, reloads, status, pidfile) is supervisor.py's.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from . import config as configmod
from . import introspect, privileges, supervisor
from .audit import metrics
from .audit.recorder import open_records
from .audit.stats import status_line
from .config import Config
from .control import ControlServer
from .errors import AgentError
from .identity.containers import ContainerDirectory
from .identity.resolver import Identifier
from .imds.cache import ResponseCache
from .imds.token import TokenCache, fetch_from
from .imds.upstream import Upstream
from .policy.loader import load_policy
from .proxy.gate import AccessGate
from .proxy.handler import Forwarder
from .proxy.identify import ConnectionIdentifier, ContainerSide
from .proxy.server import ProxyServer
from .redirect.lifecycle import Interception, spec_for

log = logging.getLogger(__name__)


class Agent:
    """A running imds-agent: upstream pool, token cache, gate, forwarder, listeners, records and the redirect."""

    def __init__(self, config: Config, mode_override: Optional[str] = None):
        self.config = config
        self.mode_override = mode_override
        self.account = privileges.resolve_user(config.user, config.source)
        policy = load_policy(config.policy.dir, config.policy.default, config.policy.unknown)
        self.gate = AccessGate(mode_override or config.mode, policy)
        self.upstream = Upstream(config.upstream)
        self.tokens = TokenCache(fetch_from(self.upstream), config.token.ttl, config.token.refresh_margin)
        cache = config.cache
        self.forwarder = Forwarder(self.upstream, self.tokens, self.gate, cache=ResponseCache(
            cache.static_ttl, cache.credentials_ttl) if cache.enabled else None)  # fmt: skip
        self.identify = ConnectionIdentifier(Identifier(budget=config.identity.budget))
        cc = config.containers
        self.identify.directory = ContainerDirectory(cc.docker_root, cc.containerd_state, cc.containerd_namespaces)
        self.metrics = metrics.service(config.metrics, lambda: introspect.metrics_state(self), self.account.gid)
        self.control = ControlServer(config.control_socket, lambda c: introspect.control_answer(self, c),
                                     self.account.uid, self.account.gid)  # fmt: skip
        self.started_at = time.monotonic()
        self.recorder = open_records(config.audit, self.account.uid, self.account.gid, self.metrics.metrics
                                     if self.metrics else None)  # fmt: skip
        cport = config.containers.port if config.containers.enabled and config.redirect.enabled else None
        self.server = ProxyServer(config.listen, self.forwarder, identify=self.identify, report=self.recorder,
                                  peer_uid=self.identify.peer_uid, privileged=self.gate.reserved_uids,
                                  container_port=cport)  # fmt: skip
        self.interception: Optional[Interception] = None
        self._cleanup: list[tuple[str, Callable[[], object]]] = [
            ("close upstream pool", self.upstream.close),
            ("close the identity socket", self.identify.close),
            ("save and close the records", self.recorder.close),
        ]
        if self.metrics is not None:
            self._cleanup.append(("stop the metrics", self.metrics.close))
        self._cleanup.append(("close the control socket", self.control.close))

    @property
    def mode(self) -> str:
        """The mode in force (a reload may change it when the CLI did not fix it)."""
        return self.gate.mode

    def start(self) -> None:
        """Listen, install the redirect, drop privileges, then serve and reconcile."""
        self.server.bind()
        cport, up = self.server.container_port, self.config.upstream
        if cport is not None:  # the listener for containers' own namespaces serves what was dialled there only
            self.identify.containers = ContainerSide(cport, frozenset({(up.ipv4, up.port), (up.ipv6, up.port)}))
        self.control.bind()
        self._cleanup.append(("close listeners", self.server.close))
        if self.config.redirect.enabled:
            privileges.require_for_redirect()
            port = self.server.addresses[0][1]
            ifaces = self.config.containers.interfaces
            spec = spec_for(self.config.redirect, up, self.account.uid, port, ifaces, cport or 0)
            self.interception = Interception(self.config.redirect, spec)
            self._cleanup.append(("undo the redirect", self.interception.shutdown))
            self.interception.install()
            # A backend that attests callers at connect time (ebpf) names the process; no /proc search then.
            self.identify.attest = getattr(self.interception.backend, "record", None)
        # Undone first: the requests in flight finish before the redirect goes.
        self._cleanup.append(("drain the listener", self.server.drain))
        backend = self.interception.backend if self.interception is not None else None
        privileges.settle(self.account, privileges.caps_for(backend.capabilities if backend else None))
        self.server.start()
        self.control.start()
        if self.metrics is not None:
            self.metrics.start()
        if self.interception is not None:
            self.interception.start_reconciler()

    def stop(self) -> None:
        """Undo everything, in reverse order; every step runs even if an earlier one fails."""
        while self._cleanup:
            what, undo = self._cleanup.pop()
            try:
                undo()
            except Exception:
                log.exception("cleanup step failed: %s", what)

    def problem(self, stall_limit: float) -> tuple[Optional[str], bool]:
        """What keeps the agent from doing its job, if anything, and whether that is fatal (a thread it needs
        has ended) rather than possibly passing (the accept loop has not turned for ``stall_limit`` seconds)."""
        if not self.server.alive():
            return "the accept thread has ended", True
        if self.interception is not None and (reason := self.interception.problem()) is not None:
            return reason, True
        return self.server.stalled(stall_limit), False

    def status(self) -> str:
        """The one-line status for systemd: mode and running totals."""
        repairs = self.interception.repairs if self.interception is not None else 0
        return status_line(self.mode, self.recorder.tally.totals(), repairs, self.recorder.audit_dropped)

    def save_inventory(self) -> None:
        """Persist the inventory if it changed (and the metrics textfile)."""
        self.recorder.save()
        if self.metrics is not None:
            self.metrics.save()

    def reload(self) -> bool:
        """SIGHUP: re-read the configuration and the policy; apply both or neither. Returns whether it applied.
        Listener, upstream, redirect, user, audit and token settings need a restart; a reload says so."""
        try:
            config = configmod.reread(self.config)
            policy = load_policy(config.policy.dir, config.policy.default, config.policy.unknown)
        except AgentError as exc:
            log.error("reload refused, keeping the running configuration and policy: %s", exc)
            return False
        mode = self.mode_override or config.mode
        self.gate.replace(mode, policy)
        log.info("reloaded: %s mode, %d policy rules from %d files", mode, len(policy.rules), len(policy.files))
        return True


def run(config: Config, ready: Optional[Callable[[Agent], None]] = None, mode_override: Optional[str] = None) -> int:
    """Run the agent in the foreground until SIGTERM or SIGINT (SIGHUP reloads); return the exit code."""
    agent = Agent(config, mode_override)
    return supervisor.serve(agent, agent.start, agent.stop, lambda: ready(agent) if ready is not None else None)
