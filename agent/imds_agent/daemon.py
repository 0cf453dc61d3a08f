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
import time
from types import FrameType
from typing import Callable, Optional

from . import config as configmod
from . import privileges, sdnotify
from .audit.inventory import Inventory, path_class
from .audit.log import AuditLog, AuditRecord
from .audit.stats import Tally, status_line
from .config import Config
from .errors import AgentError, PrivilegeError
from .identity.caller import Caller
from .imds.token import TokenCache, fetch_from
from .imds.upstream import Upstream
from .policy.loader import load_policy
from .proxy.gate import AccessGate
from .proxy.handler import Exchange, Forwarder
from .proxy.origdst import original_dst
from .proxy.server import Connection, ProxyServer
from .redirect.lifecycle import Interception, spec_for

INVENTORY_SAVE_INTERVAL = 10.0

log = logging.getLogger(__name__)


class Agent:
    """A running imds-agent: upstream pool, token cache, forwarder, listeners and the kernel redirect."""

    def __init__(self, config: Config, mode_override: Optional[str] = None):
        self.config = config
        self.mode_override = mode_override
        self.account = privileges.resolve_user(config.user, config.source)
        policy = load_policy(config.policy.dir, config.policy.default, config.policy.unknown)
        self.gate = AccessGate(mode_override or config.mode, policy)
        self.upstream = Upstream(config.upstream)
        self.tokens = TokenCache(fetch_from(self.upstream), config.token.ttl, config.token.refresh_margin)
        self.forwarder = Forwarder(self.upstream, self.tokens, self.gate)
        self.server = ProxyServer(config.listen, self.forwarder, on_connect=self._accepted, on_exchange=self._record)
        self.interception: Optional[Interception] = None
        self.audit: Optional[AuditLog] = None
        self.inventory = Inventory(config.audit.state_dir)
        self.tally = Tally()
        self._cleanup: list[tuple[str, Callable[[], None]]] = []

    @property
    def mode(self) -> str:
        """The mode in force (a reload may change it when the CLI did not fix it)."""
        return self.gate.mode

    def start(self) -> None:
        """Listen, install the redirect, open the records, drop privileges, then serve and reconcile."""
        self._cleanup.append(("close upstream pool", self.upstream.close))
        self._cleanup.append(("close the identity socket", self.gate.identifier.close))
        self._open_records()
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

    def _open_records(self) -> None:
        """Audit log and inventory are opened as root and handed to the agent's uid, so that the agent can keep
        writing them after the drop (under systemd, LogsDirectory and StateDirectory do the same)."""
        audit = self.config.audit
        self.audit = AuditLog(audit.log, audit.max_bytes, audit.backups)
        self._cleanup.append(("close the audit log", self.audit.close))
        self.inventory.load()
        self._cleanup.append(("save the inventory", lambda: self.inventory.save(force=True)))
        if os.geteuid() == 0 and self.account.uid != 0:
            for path in (os.path.dirname(audit.log), audit.state_dir):
                os.makedirs(path, mode=0o750, exist_ok=True)
                os.chown(path, self.account.uid, self.account.gid)
            for path in (audit.log, self.inventory.path):
                if os.path.exists(path):
                    os.chown(path, self.account.uid, self.account.gid)

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
        return status_line(self.mode, self.tally.totals(), repairs)

    def save_inventory(self) -> None:
        """Persist the inventory if it changed (called periodically by run())."""
        self.inventory.save()

    def reload(self) -> bool:
        """SIGHUP: re-read the configuration and the policy; apply both or neither. Returns whether it applied.

        Listener, upstream and redirect settings need a restart; a reload that changes them says so.
        """
        try:
            source = self.config.source
            config = configmod.load(source, required=True) if source else Config()
            policy = load_policy(config.policy.dir, config.policy.default, config.policy.unknown)
        except AgentError as exc:
            log.error("reload refused, keeping the running configuration and policy: %s", exc)
            return False
        for part in ("listen", "upstream", "redirect", "user", "audit", "token"):
            if getattr(config, part) != getattr(self.config, part):
                log.warning("reload: %s settings changed; they take effect at the next restart", part)
        mode = self.mode_override or config.mode
        self.gate.replace(mode, policy)
        log.info("reloaded: %s mode, %d policy rules from %d files", mode, len(policy.rules), len(policy.files))
        return True

    def _check_capabilities(self) -> None:
        if os.geteuid() == 0:
            return
        missing = privileges.missing_caps((privileges.CAP_NET_ADMIN,))
        if missing:
            raise PrivilegeError(
                f"installing the redirect needs {', '.join(missing)}: run as root or with it as an ambient capability"
            )

    def _drop_privileges(self) -> None:
        keep = privileges.caps_for(self.interception.backend.name if self.interception is not None else None)
        if os.geteuid() != 0:
            missing = privileges.missing_caps(keep)
            if missing:
                log.warning("running without %s: some callers may not be identifiable", ", ".join(missing))
            privileges.limit_to(keep)
            return
        if self.account.uid == 0:
            log.warning("configured user is root: the agent keeps full privileges and root's traffic is not redirected")
            return
        privileges.drop_to(self.account, keep)

    def _accepted(self, conn: Connection) -> None:
        conn.context["original_dst"] = original_dst(conn.sock)
        self.gate.on_connect(conn)

    def _record(self, conn: Connection, ex: Exchange) -> None:
        caller: Caller = conn.context.get("caller") or Caller.unknown("connection was not identified")
        path = ex.shown_path
        record = AuditRecord(
            time=time.time(),
            mode=self.mode,
            caller=caller,
            method=ex.method,
            path=path,
            version=ex.kind,
            decision=ex.decision,
            decided_by=ex.decided_by,
            reason=ex.reason,
            status=ex.status,
            latency_ms=ex.latency * 1000,
            user_agent=ex.user_agent,
            injected=ex.injected,
            relayed=ex.relayed,
            sensitive=ex.path.sensitive if ex.path is not None else None,
        )
        if self.audit is not None:
            self.audit.write(record)
        cls = path_class(ex.path)
        first = self.inventory.add(
            caller.exe, caller.uid, caller.user, cls, ex.kind, ex.decision, record.time, caller.exe_verified
        )
        if first and ex.decision != "allow":
            # Once per caller and path class in the journal, so operators see denials without a flood; every
            # request is in the audit log.
            verb = "denied" if ex.decision == "deny" else "would deny (audit)"
            log.warning("%s: %s %s %s [%s] by %s: %s", verb, caller.describe(), ex.method, path, cls,
                        ex.decided_by, ex.reason)  # fmt: skip
        self.tally.add(ex.kind, ex.decision, ex.status, caller.known)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s %s -> %d %s", caller.describe(), ex.method, path, ex.kind, ex.status, ex.decision)


def run(config: Config, ready: Optional[Callable[[Agent], None]] = None, mode_override: Optional[str] = None) -> int:
    """Run the agent in the foreground until SIGTERM or SIGINT (SIGHUP reloads); return the exit code."""
    stop = threading.Event()
    hup = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        if signum == signal.SIGHUP:
            hup.set()
            return
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    agent = Agent(config, mode_override)
    rc = 0
    try:
        agent.start()
        log.info("imds-agent running in %s mode", agent.mode)
        sdnotify.notify("READY=1", f"STATUS={agent.status()}")
        _write_pidfile()
        if ready is not None:
            ready(agent)
        rc = _watch(agent, stop, hup)
        sdnotify.notify("STOPPING=1")
    finally:
        agent.stop()
        _remove_pidfile()
    return rc


def _watch(agent: Agent, stop: threading.Event, hup: threading.Event) -> int:
    """Look after the running agent about once a second until ``stop``: its health and the watchdog, reloads,
    the inventory and the status line. Returns the exit code."""
    interval = sdnotify.watchdog_interval()
    tick = min(interval, 1.0) if interval else 1.0
    stall_limit = max(2 * interval, 5.0) if interval else 5.0
    withheld = False
    last_save = time.monotonic()
    shown = ""
    while not stop.wait(tick):
        problem, fatal = agent.problem(stall_limit)
        if fatal:
            # Without that thread the agent cannot serve or hold its rules: exit so that the rules are handled
            # by fail_mode and the service manager restarts a fresh agent.
            log.error("stopping: %s", problem)
            return 1
        if problem is None:
            withheld = False
            if interval:
                sdnotify.notify("WATCHDOG=1")
        elif not withheld:
            # A hung accept loop: withholding the keep-alive lets systemd's watchdog restart the agent.
            log.error("not serving: %s%s", problem, "; withholding the watchdog keep-alive" if interval else "")
            withheld = True
        if hup.is_set():
            hup.clear()
            sdnotify.notify("RELOADING=1")
            agent.reload()
            sdnotify.notify("READY=1")
        if time.monotonic() - last_save >= INVENTORY_SAVE_INTERVAL:
            agent.save_inventory()
            last_save = time.monotonic()
        status = agent.status()
        if status != shown:
            sdnotify.notify(f"STATUS={status}")
            shown = status
    return 0


def _write_pidfile() -> None:
    """/run/imds-agent/imds-agent.pid, when the runtime directory exists (systemd creates it), for set-mode."""
    from .setmode import PIDFILE

    if os.path.isdir(os.path.dirname(PIDFILE)):
        try:
            with open(PIDFILE, "w", encoding="ascii") as fh:
                fh.write(f"{os.getpid()}\n")
        except OSError as exc:
            log.warning("cannot write %s: %s", PIDFILE, exc)


def _remove_pidfile() -> None:
    from .setmode import PIDFILE

    try:
        with open(PIDFILE, encoding="ascii") as fh:
            if fh.read().strip() == str(os.getpid()):
                os.unlink(PIDFILE)
    except (OSError, ValueError):
        pass
