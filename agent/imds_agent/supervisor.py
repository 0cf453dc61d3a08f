"""The agent's life under a service manager: signals, readiness, the watchdog, reloads, the status line, the
pidfile, and the periodic inventory save. It only looks after an agent; it builds nothing (daemon.py does).

About once a second (or half the watchdog interval, if shorter) the supervisor asks the agent whether it is
healthy. A thread the agent needs has ended: exit 1, so that fail_mode handles the rules and systemd restarts a
fresh agent. The accept loop has not turned for a while: withhold the watchdog keep-alive, so systemd's watchdog
restarts a hung agent. SIGHUP reloads between two turns; SIGTERM and SIGINT stop it.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
import time
from types import FrameType
from typing import Callable, Optional, Protocol

from . import sdnotify

log = logging.getLogger(__name__)

PIDFILE = "/run/imds-agent/imds-agent.pid"
INVENTORY_SAVE_INTERVAL = 10.0
Notify = Callable[..., bool]


class Supervised(Protocol):
    """What the supervisor needs of a running agent."""

    @property
    def mode(self) -> str:
        """The mode in force."""
        ...

    def problem(self, stall_limit: float) -> tuple[Optional[str], bool]:
        """What keeps the agent from its job, and whether that is fatal."""
        ...

    def reload(self) -> bool:
        """Re-read configuration and policy; whether they were applied."""
        ...

    def save_inventory(self) -> None:
        """Persist the inventory if it changed."""
        ...

    def status(self) -> str:
        """The one-line status."""
        ...


class Supervisor:
    """Looks after one started agent until ``stop`` is set; every outside effect goes through a seam."""

    def __init__(
        self,
        agent: Supervised,
        notify: Notify = sdnotify.notify,
        watchdog: Optional[float] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.agent = agent
        self.notify = notify
        self.watchdog = watchdog  # seconds between keep-alives (half of WATCHDOG_USEC), None without a watchdog
        self.clock = clock
        self.stop = threading.Event()
        self.hup = threading.Event()
        self.tick = min(watchdog, 1.0) if watchdog else 1.0
        self.stall_limit = max(2 * watchdog, 5.0) if watchdog else 5.0
        self._withheld = False
        self._last_save = clock()
        self._shown = ""

    def on_signal(self, signum: int, frame: Optional[FrameType] = None) -> None:
        """SIGHUP asks for a reload; SIGTERM and SIGINT for a stop."""
        if signum == signal.SIGHUP:
            self.hup.set()
            return
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.stop.set()

    def install_signals(self) -> None:
        """Route SIGTERM, SIGINT and SIGHUP to this supervisor (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)

    def ready(self) -> None:
        """Tell systemd the agent serves, with its first status line."""
        self._shown = self.agent.status()
        self.notify("READY=1", f"STATUS={self._shown}")

    def turn(self) -> Optional[int]:
        """One look at the agent; an exit code when it must stop now, else None."""
        problem, fatal = self.agent.problem(self.stall_limit)
        if fatal:
            log.error("stopping: %s", problem)
            return 1
        if problem is None:
            self._withheld = False
            if self.watchdog:
                self.notify("WATCHDOG=1")
        elif not self._withheld:
            log.error("not serving: %s%s", problem, "; withholding the watchdog keep-alive" if self.watchdog else "")
            self._withheld = True
        if self.hup.is_set():
            self.hup.clear()
            self.notify("RELOADING=1")
            self.agent.reload()
            self.notify("READY=1")
        if self.clock() - self._last_save >= INVENTORY_SAVE_INTERVAL:
            self.agent.save_inventory()
            self._last_save = self.clock()
        status = self.agent.status()
        if status != self._shown:
            self.notify(f"STATUS={status}")
            self._shown = status
        return None

    def watch(self) -> int:
        """Turn until ``stop`` is set or the agent must stop; return the exit code."""
        while not self.stop.wait(self.tick):
            code = self.turn()
            if code is not None:
                return code
        self.notify("STOPPING=1")
        return 0


def serve(agent: Supervised, start: Callable[[], None], stop: Callable[[], None],
          ready: Callable[[], object] = lambda: None) -> int:  # fmt: skip
    """Start ``agent``, tell systemd, look after it until SIGTERM/SIGINT or a fatal problem, and always stop it;
    return the exit code."""
    watch = Supervisor(agent, watchdog=sdnotify.watchdog_interval())
    watch.install_signals()
    raise_descriptor_limit()
    try:
        start()
        log.info("imds-agent running in %s mode", agent.mode)
        watch.ready()
        write_pidfile()
        ready()
        return watch.watch()
    finally:
        stop()
        remove_pidfile()


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd's soft default is 1024, which a flood of
    connections exhausts: then identification, upstream sockets and accepts all fail); return the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, hard, exc)
    return soft


def write_pidfile(path: str = PIDFILE) -> None:
    """Write our pid where set-mode looks, when the runtime directory exists (systemd creates it)."""
    if os.path.isdir(os.path.dirname(path)):
        try:
            with open(path, "w", encoding="ascii") as fh:
                fh.write(f"{os.getpid()}\n")
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)


def remove_pidfile(path: str = PIDFILE) -> None:
    """Remove the pidfile if it is still ours."""
    try:
        with open(path, encoding="ascii") as fh:
            if fh.read().strip() == str(os.getpid()):
                os.unlink(path)
    except (OSError, ValueError):
        pass
