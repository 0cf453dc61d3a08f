"""A Debian 12 root booted with systemd as its init (systemd-nspawn) inside a sandbox's host network namespace.

This is how the packaged unit is tested under a real service manager: the container shares the sandbox's host
namespace, so the agent's rules, the emulator behind the veth and the clients are the same as in every other
privileged test, while systemd inside starts, watches, reloads and stops the agent the way it does on an instance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from imds_agent.sandbox.netns import wait_for

ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}


class Container:
    """A booted container: commands run inside all of its namespaces (pid, mount, net, ...) via nsenter."""

    def __init__(self, leader: int, root: Path):
        self.leader = leader
        self.root = root

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container as root; raise with its output when ``check`` and it fails."""
        full = ["nsenter", f"--target={self.leader}", "--all", *argv]
        proc = subprocess.run(full, env=ENV, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        return proc

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show` properties of ``unit``."""
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str) -> str:
        """The unit's journal, for assertion messages."""
        return self.run("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout[-4000:]


def _leader(nspawn_pid: int, timeout: float = 30) -> int:
    """The container's init as seen from here: nspawn's child named systemd."""
    found: list[int] = []

    def look() -> bool:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                    stat = fh.read()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if comm == "systemd" and ppid == nspawn_pid:
                found.append(int(entry))
                return True
        return False

    if not wait_for(look, timeout, 0.1):
        raise AssertionError(f"no init appeared in the container started by nspawn pid {nspawn_pid}")
    return found[0]


@contextmanager
def booted(root: Path, netns: str, log: Path) -> Iterator[Container]:
    """Boot ``root`` in network namespace ``netns`` and wait until systemd says the boot is done; power it off
    afterwards (killing it if it will not go)."""
    argv = ["systemd-nspawn", "--quiet", f"--directory={root}", "--boot", "--register=no", "--keep-unit",
            f"--network-namespace-path=/run/netns/{netns}", "--console=pipe",
            # nspawn grants CAP_NET_ADMIN only with a network of its own making; this one is the sandbox's.
            "--capability=CAP_NET_ADMIN"]  # fmt: skip
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(argv, env=ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        container = Container(_leader(proc.pid), root)
        deadline = time.monotonic() + 90
        while True:
            state = container.run("systemctl", "is-system-running", "--wait", check=False, timeout=90).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"container boot ended {state!r}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield container
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # nspawn turns it into an orderly poweroff of the container
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
