"""A disposable EC2-like network: a "host" namespace and a "metadata" namespace joined by a veth pair.

    host ns (imds-sbx-<id>-host)                      metadata ns (imds-sbx-<id>-imds)
    veth 169.254.0.1/16, fd00:ec2::1/64   <──────>    veth 169.254.169.254/16, fd00:ec2::254/64
    no default route: anything else fails at once      the emulator listens on :80, tokens required

The agent, its kernel rules and the clients live in the host namespace; clients run as other uids through
setpriv. ``add_container`` adds namespaces that stand for containers with networks of their own: each behind a
bridge ``docker0`` (172.30.0.1/24) in the host namespace, one routed hop from the metadata service, as on an
instance (the emulator's hop limit then really keeps its token answers from them).

Teardown kills every process the sandbox started (by pid: a namespace with live processes stays around)
and deletes both namespaces, each step on its own so that one failure does not leave the rest behind.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any, Optional

from pyroute2 import IPRoute, netns

from .. import subproc
from .control import EmulatorControl

log = logging.getLogger(__name__)

PREFIX = "imds-sbx-"
IFA_F_NODAD = 0x02
HOST_V4, IMDS_V4 = "169.254.0.1", "169.254.169.254"
HOST_V6, IMDS_V6 = "fd00:ec2::1", "fd00:ec2::254"
BRIDGE, BRIDGE_V4, BRIDGE_NET = "docker0", "172.30.0.1", "172.30.0.0/24"


def _netns_pids(name: str) -> list[int]:
    try:
        return [int(p) for p in subproc.run(["ip", "netns", "pids", name], check=False).stdout.split()]
    except (subproc.ProcessError, ValueError):
        return []


def _delete_namespace(name: str) -> bool:
    """Kill whatever still runs inside ``name`` (a namespace with live processes stays around), then delete it."""
    for pid in _netns_pids(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        netns.remove(name)
    except OSError as exc:
        log.warning("cannot remove namespace %s: %s", name, exc)
        return False
    return True


def sweep_stale() -> list[str]:
    """Delete sandbox namespaces whose creator process is gone (left by a crashed run); return their names."""
    removed = []
    for name in netns.listnetns():
        if not name.startswith(PREFIX):
            continue
        parts = name[len(PREFIX) :].split("-")
        creator = int(parts[0]) if parts and parts[0].isdigit() else 0
        if creator and os.path.exists(f"/proc/{creator}"):
            continue
        if _delete_namespace(name):
            removed.append(name)
    return removed


class Sandbox:
    """Two namespaces, a veth pair, the emulator; see the module docstring."""

    def __init__(
        self,
        tokens: str = "required",
        emulator: bool = True,
        workdir: Optional[str] = None,
        ministack: Optional[str] = None,
        hop_limit: int = 1,
    ):
        """``ministack``: path of a ministack executable to serve as the metadata service instead of the emulator
        (IMDSv2 required), behind a counting tap; its counters come through ``emulator_control`` all the same."""
        ident = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.host_ns = f"{PREFIX}{ident}-host"
        self.imds_ns = f"{PREFIX}{ident}-imds"
        self.tokens = tokens
        self.hop_limit = hop_limit
        self.containers: dict[str, str] = {}  # container name -> its namespace
        self._on_own_bridge: dict[str, bool] = {}
        self.with_emulator = emulator
        self.ministack = ministack
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="imds-sandbox-")
        self.control_path = os.path.join(self.workdir, "emulator.sock")
        self.emulator_control = EmulatorControl(self.control_path)
        self.emulator: Optional[subprocess.Popen[str]] = None
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._closed = False

    # --- building -----------------------------------------------------------------------------------------------
    def start(self) -> Sandbox:
        """Build the topology and start the emulator; on any failure, undo what was built and re-raise."""
        sweep_stale()
        os.chmod(self.workdir, 0o755)
        try:
            for name in (self.host_ns, self.imds_ns):
                netns.create(name)
                self._created.append(name)
            self._wire()
            if self.ministack:
                self._start_ministack(self.ministack)
            elif self.with_emulator:
                self._start_emulator()
        except BaseException:
            self.close()
            raise
        return self

    def _wire(self) -> None:
        host_if, imds_if = "veth-host", "veth-imds"
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": imds_if, "net_ns_fd": self.imds_ns})
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=idx, net_ns_fd=self.host_ns)
        for ns, ifname, v4, v6 in (
            (self.host_ns, host_if, HOST_V4, HOST_V6),
            (self.imds_ns, imds_if, IMDS_V4, IMDS_V6),
        ):
            with IPRoute(netns=ns) as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=idx, address=v4, prefixlen=16)
                ipr.addr("add", index=idx, address=v6, prefixlen=64, flags=IFA_F_NODAD)
                ipr.link("set", index=idx, state="up")

    def _start_emulator(self) -> None:
        argv = [sys.executable, "-m", "imds_agent.sandbox.emulator", "--listen", f"{IMDS_V4}:80",
                "--listen", f"[{IMDS_V6}]:80", "--tokens", self.tokens, "--control", self.control_path,
                "--hop-limit", str(self.hop_limit)]  # fmt: skip
        self._start_and_wait(argv)

    def add_container(
        self, name: str, address: str, bridge: Optional[str] = None, gateway: str = BRIDGE_V4, prefixlen: int = 24
    ) -> str:
        """A namespace standing for a container with its own network: ``address`` (in 172.30.0.0/24) on its
        eth0, a veth to the host namespace's bridge, the bridge as its default route. Returns the namespace.
        Another ``bridge`` (one a container runtime made, with its ``gateway``) is joined, never created."""
        ns = f"{self.host_ns[: -len('host')]}{name}"
        if bridge is None and not any(self._on_own_bridge.values()):
            self._bridge()
        self._on_own_bridge[name] = bridge is None
        bridge = bridge or BRIDGE
        netns.create(ns)
        self._created.append(ns)
        self.containers[name] = ns
        host_if = f"vc-{name}"[:15]
        with IPRoute() as ipr:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=idx, net_ns_fd=self.host_ns)
        with IPRoute(netns=self.host_ns) as ipr:
            idx = ipr.link_lookup(ifname=host_if)[0]
            ipr.link("set", index=idx, master=ipr.link_lookup(ifname=bridge)[0], state="up")
        with IPRoute(netns=ns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            idx = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=idx, address=address, prefixlen=prefixlen)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=gateway)
        return ns

    def _bridge(self) -> None:
        """The host side of the containers' network: the bridge, forwarding on, the way back from the service."""
        with IPRoute(netns=self.host_ns) as ipr:
            ipr.link("add", ifname=BRIDGE, kind="bridge")
            idx = ipr.link_lookup(ifname=BRIDGE)[0]
            ipr.addr("add", index=idx, address=BRIDGE_V4, prefixlen=24)
            ipr.link("set", index=idx, state="up")
        self.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], check=True)
        with IPRoute(netns=self.imds_ns) as ipr:
            ipr.route("add", dst=BRIDGE_NET, gateway=HOST_V4)

    def _start_ministack(self, executable: str) -> None:
        env = {"SERVICES": "imds", "MINISTACK_IMDS_V2_REQUIRED": "1", "GATEWAY_PORT": "4566",
               "BIND_HOST": "127.0.0.1", "HOME": self.workdir}  # fmt: skip
        log = open(os.path.join(self.workdir, "ministack.log"), "w", encoding="utf-8")  # noqa: SIM115
        self.spawn([executable], ns="imds", env=env, stdout=log, stderr=log)
        log.close()
        probe = [sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 4566), 1)"]
        if not wait_for(lambda: self.run(probe, ns="imds").returncode == 0, timeout=30, interval=0.2):
            with open(os.path.join(self.workdir, "ministack.log"), encoding="utf-8") as fh:
                raise RuntimeError(f"ministack did not start: {fh.read()[-2000:]}")
        argv = [sys.executable, "-m", "imds_agent.sandbox.tap", "--listen", f"{IMDS_V4}:80", "--listen",
                f"[{IMDS_V6}]:80", "--upstream", "127.0.0.1:4566", "--control", self.control_path]  # fmt: skip
        self._start_and_wait(argv)

    def _start_and_wait(self, argv: list[str]) -> None:
        proc = self.spawn(argv, ns="imds", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.emulator = proc
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            err = proc.stderr.read() if proc.stderr is not None else ""
            raise RuntimeError(f"the emulator did not start in {self.imds_ns}: {err.strip() or 'no output'}")
        info = json.loads(line)
        if not info.get("ready"):
            raise RuntimeError(f"the emulator said {line.strip()}")

    # --- running things -----------------------------------------------------------------------------------------
    def _argv(self, argv: Sequence[str], ns: str, uid: Optional[int], gid: Optional[int]) -> list[str]:
        name = {"host": self.host_ns, "imds": self.imds_ns}.get(ns) or self.containers[ns]
        prefix = ["ip", "netns", "exec", name]
        if uid is not None:
            g = uid if gid is None else gid
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={g}", "--clear-groups"]
        return prefix + list(argv)

    def _env(self, env: Optional[Mapping[str, str]]) -> dict[str, str]:
        full = {"PATH": subproc.PATH, "LANG": "C", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        full.update(env or {})
        return full

    def run(
        self,
        argv: Sequence[str],
        uid: Optional[int] = None,
        gid: Optional[int] = None,
        timeout: float = 30,
        check: bool = False,
        env: Optional[Mapping[str, str]] = None,
        ns: str = "host",
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in a namespace, as ``uid`` when given."""
        return subproc.run(self._argv(argv, ns, uid, gid), timeout=timeout, check=check, env=self._env(env))

    def spawn(
        self,
        argv: Sequence[str],
        uid: Optional[int] = None,
        ns: str = "host",
        env: Optional[Mapping[str, str]] = None,
        stdout: Any = subprocess.DEVNULL,
        stderr: Any = None,
    ) -> subprocess.Popen[str]:
        """Start a long-running process in a namespace; the sandbox kills it at teardown."""
        proc: subprocess.Popen[str] = subprocess.Popen(
            self._argv(argv, ns, uid, None), env=self._env(env), stdout=stdout, stderr=stderr, text=True
        )
        self._procs.append(proc)
        return proc

    @contextmanager
    def enter(self) -> Iterator[None]:
        """Move the calling thread into the host namespace for the duration (threads it starts inherit it)."""
        netns.pushns(self.host_ns)
        try:
            yield
        finally:
            netns.popns()

    # --- teardown -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill every process started here, delete both namespaces, remove the workdir; idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self._procs):
            self._stop(proc)
        for name in reversed(self._created):
            _delete_namespace(name)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _stop(proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            except OSError:
                pass
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                _close(stream)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close(stream: IO[Any]) -> None:
    try:
        stream.close()
    except OSError:
        pass


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
