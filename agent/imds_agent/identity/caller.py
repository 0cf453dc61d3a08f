"""The Caller: who is on the other end of an intercepted connection."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ContainerInfo:
    """The container a caller runs in, as its runtime's own state describes it (never guessed from an address).

    ``labels`` are the container's labels (Docker) or annotations (containerd), sorted, as (key, value) pairs.
    The pod fields are filled for Kubernetes pods only; ``netns`` is the inode of the container's network
    namespace when it has one of its own (0 when it shares the host's).
    """

    id: str
    runtime: str  # "docker", "containerd", "cri-o", "podman" or "unknown"
    name: str = ""
    image: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    pod_namespace: str = ""
    pod_name: str = ""
    service_account: str = ""
    netns: int = 0

    def label(self, key: str) -> Optional[str]:
        """The value of label ``key``, or None."""
        for k, v in self.labels:
            if k == key:
                return v
        return None


@dataclass(frozen=True)
class Caller:
    """A process identified as the client of one TCP connection.

    ``known`` is False when the process could not be identified (it vanished, its /proc entry was unreadable,
    the socket was not found); such a caller carries ``reason`` and is never trusted as anyone in particular.

    ``exe_verified`` says the file at ``exe``, as the agent sees the filesystem, is the very file the process
    runs. It is False for a process in another mount namespace that shows its own file under that path (a
    container's image) and for a binary replaced or deleted since the process started: the path alone then
    proves nothing, and only rules written for containers match it.
    """

    known: bool
    pid: Optional[int] = None
    exe: Optional[str] = None
    uid: Optional[int] = None
    user: Optional[str] = None
    cmdline: tuple[str, ...] = ()
    create_time: Optional[float] = None
    unit: Optional[str] = None
    container: Optional[str] = None
    exe_verified: bool = True
    reason: str = ""
    # Related processes running other executables that hold the same socket: any of them may be the one writing
    # the requests, so a request is allowed only if it would be allowed to each.
    sharers: tuple[Caller, ...] = ()
    # Loader variables (LD_PRELOAD, LD_AUDIT) in the environment the process started with: code its user chose
    # may run inside the executable. Recorded; rules with refuse_preload do not match such callers.
    preload: tuple[str, ...] = ()
    # The container the process runs in, from the runtime's state, when it runs in one the agent can describe;
    # ``exe`` is then the path inside the container's image and ``uid_inside`` the uid its user namespace shows.
    workload: Optional[ContainerInfo] = None
    uid_inside: Optional[int] = None
    # The network namespace (inode) the client's socket is in when it is a container's own, not the agent's (0).
    netns: int = 0

    @property
    def budget_key(self) -> Optional[int]:
        """Whose share of the agent's per-user limits (connections, audit lines) this caller spends: its uid, or,
        for a caller in a container's own network namespace, that namespace (as a negative number, so that it is
        never root's or a named uid's: root in a container must not get the host root's exemptions)."""
        return -self.netns if self.netns else self.uid

    @classmethod
    def unknown(cls, reason: str, uid: Optional[int] = None) -> Caller:
        """An unidentified caller; ``uid`` is kept when the socket lookup found it but the process did not."""
        return cls(known=False, uid=uid, reason=reason)

    def describe(self) -> str:
        """A short human description for logs and deny messages (never contains secrets). An executable's path is
        the caller's choice, newlines included, so anything unprintable in it is escaped: no caller can end a
        log line early or forge the next one."""
        if not self.known:
            return f"unknown caller (uid={self.uid if self.uid is not None else '?'}: {printable(self.reason)})"
        return f"{printable(self.exe or '?')} (pid={self.pid}, uid={self.uid})"


def printable(text: str, limit: int = 512) -> str:
    """``text`` with every unprintable character (newlines, controls, line and paragraph separators) escaped as
    \\xNN or \\uNNNN, and cut at ``limit`` characters."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


ADDRESS_SHARES = 1 << 130  # below -ADDRESS_SHARES: a source address's share; above: a network namespace's


def address_share(address: str) -> int:
    """The share of the connection slots a container connection takes before it is identified: its source
    address's (negative, below every namespace's share, so never root's or a named uid's)."""
    return -ADDRESS_SHARES - int(ipaddress.ip_address(address))


def share_owner(key: Optional[int]) -> str:
    """Who a share of the per-user limits (Caller.budget_key, address_share) stands for, in words."""
    if key is None:
        return "unidentified callers"
    if key >= 0:
        return f"uid {key}"
    if key <= -ADDRESS_SHARES:
        return f"container address {ipaddress.ip_address(-key - ADDRESS_SHARES)}"
    return f"the container network namespace {-key}"
