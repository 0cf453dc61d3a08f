"""Which network namespaces on this host the redirect does not cover: who can still reach the metadata service
without the agent (`imds-agent report`, `check-config`).

A container with a network namespace of its own reaches the service through the host: its connections enter the
host's namespace on a veth, or on the bridge the veth is enslaved to. The redirect catches them when that entry's
name is one of ``containers.interfaces``. For every namespace a process is in, this module finds its links into the
agent's namespace (RTM_GETNSID for the namespace, then the host's links whose peer is there) and says whether any
of them is covered. A namespace with a network device but no link here (macvlan, ipvlan, a device of its own)
reaches the network some other way, which no rule here sees; one with only loopback reaches nothing and is left out.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Optional

from ..config import ContainersConfig
from ..identity.containers import ContainerDirectory
from ..identity.netns import NetnsSockets

PROC = "/proc"


@dataclass(frozen=True)
class Uncovered:
    """A network namespace whose connections to the metadata service would not pass the agent, and why."""

    netns: int
    pid: int  # the lowest pid in it
    comm: str
    container: str  # the container's name (or id) where a runtime describes it
    entries: tuple[str, ...]  # the host-side interfaces its traffic enters on
    reason: str

    def describe(self) -> str:
        """One line for the report."""
        who = f"container {self.container}" if self.container else f"pid {self.pid} ({self.comm})"
        return f"netns {self.netns}, {who}: {self.reason}"


def _devices(proc: str, pid: int) -> list[str]:
    """The network devices of ``pid``'s namespace, from its /proc/PID/net/dev."""
    try:
        with open(f"{proc}/{pid}/net/dev", encoding="ascii", errors="replace") as fh:
            lines = fh.read(65536).splitlines()[2:]
    except OSError:
        return []
    return [line.split(":", 1)[0].strip() for line in lines if ":" in line]


def _read(path: str, limit: int = 65536) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(limit)
    except OSError:
        return ""


def links_by_nsid() -> dict[int, list[str]]:
    """The host's links whose peer is in another namespace, by that namespace's id: the name traffic from there
    enters on (the bridge a veth is enslaved to, else the veth)."""
    from pyroute2 import IPRoute

    out: dict[int, list[str]] = {}
    with IPRoute() as ipr:
        links = list(ipr.get_links())
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        for link in links:
            nsid = link.get_attr("IFLA_LINK_NETNSID")
            if nsid is None:
                continue
            master = link.get_attr("IFLA_MASTER")
            out.setdefault(int(nsid), []).append(str(names.get(master) or link.get_attr("IFLA_IFNAME")))
    return out


def nsid_of(pid: int, proc: str = PROC) -> Optional[int]:
    """The id this namespace gives ``pid``'s network namespace (None when it has none: nothing links them)."""
    from pyroute2 import IPRoute

    try:
        fd = os.open(f"{proc}/{pid}/ns/net", os.O_RDONLY)
    except OSError:
        return None
    try:
        with IPRoute() as ipr:
            answer = ipr.get_netnsid(fd=fd)
    except Exception:  # noqa: BLE001 - pyroute2 raises several kinds; any of them means "no id"
        return None
    finally:
        os.close(fd)
    nsid = answer.get("nsid") if isinstance(answer, dict) else None
    return int(nsid) if isinstance(nsid, int) and nsid >= 0 else None


def uncovered(
    patterns: tuple[str, ...], enabled: bool, directory: Optional[ContainerDirectory] = None, proc: str = PROC
) -> list[Uncovered]:
    """The namespaces the container redirect (``enabled``, on interfaces matching ``patterns``) does not cover."""
    links = links_by_nsid()
    out: list[Uncovered] = []
    for netns, pid in sorted(NetnsSockets(proc).namespaces().items()):
        devices = [d for d in _devices(proc, pid) if d != "lo"]
        if not devices:
            continue  # loopback only: it reaches nothing
        nsid = nsid_of(pid, proc)
        entries = tuple(links.get(nsid, [])) if nsid is not None else ()
        if not entries:
            reason = f"reaches the network without passing this host's namespace ({', '.join(devices)}): not covered"
        elif not enabled:
            reason = f"enters on {', '.join(entries)}; containers.enabled is false"
        elif not any(fnmatch.fnmatchcase(e, p) for e in entries for p in patterns):
            reason = f"enters on {', '.join(entries)}, which containers.interfaces does not name"
        else:
            continue
        comm = _read(f"{proc}/{pid}/comm").strip()
        container = ""
        if directory is not None:
            info = directory.describe(None, _read(f"{proc}/{pid}/cgroup"))
            container = (info.name or info.id[:12]) if info is not None else ""
        out.append(Uncovered(netns, pid, comm, container, entries, reason))
    return out


def coverage_lines(containers: ContainersConfig, proc: str = PROC) -> list[str]:
    """The uncovered namespaces as lines for operators; a line saying why nothing could be looked at (not root)
    rather than an empty list that would read as "all covered"."""
    directory = ContainerDirectory(
        containers.docker_root, containers.containerd_state, containers.containerd_namespaces
    )
    try:
        found = uncovered(containers.interfaces, containers.enabled, directory, proc)
    except OSError as exc:
        return [f"cannot tell which network namespaces the redirect covers: {exc.strerror or exc}"]
    if os.geteuid() != 0:
        return ["cannot see other users' network namespaces: run as root to list what the redirect does not cover"]
    return [f"not covered by the redirect: {u.describe()}" for u in found] + ehash_advice(containers, proc)


EHASH = "sys/net/ipv4/tcp_child_ehash_entries"


def ehash_advice(containers: ContainersConfig, proc: str = PROC) -> list[str]:
    """Advice when container namespaces share the host's TCP hash: each container connection's identification
    then reads all of it (about 5 ms on a 24 GB host, against 0.08 ms with a table of 1024 of its own)."""
    try:
        with open(f"{proc}/{EHASH}", encoding="ascii") as fh:
            entries = int(fh.read().strip() or 0)
    except (OSError, ValueError):
        return []
    if not containers.enabled or entries:
        return []
    return ["net.ipv4.tcp_child_ehash_entries is 0: container namespaces share the host's TCP hash, and identifying "
            "each container connection reads all of it; 1024 (sysctl, before the containers start) gives each new "
            "namespace its own"]  # fmt: skip
