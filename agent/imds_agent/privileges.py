"""Resolve the agent's user and drop from root to it, keeping only the capabilities the agent needs.

Capabilities are per thread in Linux, so the drop must happen before the agent starts any thread; the daemon
calls drop_to() after the listener is bound and the rules are in, and before it starts accepting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import pwd
from dataclasses import dataclass

from .errors import ConfigError, PrivilegeError

log = logging.getLogger(__name__)

CAP_DAC_READ_SEARCH = 2
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_BPF = 39
CAP_NAMES = {
    CAP_DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH",
    CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE",
    CAP_NET_ADMIN: "CAP_NET_ADMIN",
    CAP_NET_RAW: "CAP_NET_RAW",
    CAP_SYS_PTRACE: "CAP_SYS_PTRACE",
    CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
    CAP_BPF: "CAP_BPF",
}
# NET_ADMIN: repair the redirect rules (netlink, xtables). NET_RAW: libiptc talks to the kernel over a raw socket.
# SYS_PTRACE and DAC_READ_SEARCH: read other users' /proc/PID/fd links to find which process owns a socket.
REQUIRED_CAPS = (CAP_DAC_READ_SEARCH, CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_PTRACE)

_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_CAP_VERSION_3 = 0x20080522


@dataclass(frozen=True)
class Account:
    """The user the agent runs as; ``name`` is None for a numeric uid with no passwd entry."""

    uid: int
    gid: int
    name: str | None


def resolve_user(user: str, source: str | None = None) -> Account:
    """Look up ``user`` (a name or a numeric uid); an unknown name is a configuration error."""
    if user.isdigit():
        uid = int(user)
        try:
            entry = pwd.getpwuid(uid)
            return Account(uid, entry.pw_gid, entry.pw_name)
        except KeyError:
            return Account(uid, uid, None)
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            f"user {user!r} does not exist (the package creates it via sysusers.d)", path=source, key="user"
        ) from None
    return Account(entry.pw_uid, entry.pw_gid, entry.pw_name)


def _cap_sets() -> dict[str, int]:
    """The calling thread's capability sets as masks, by their /proc name (CapInh, CapPrm, CapEff, ...)."""
    with open("/proc/thread-self/status", encoding="ascii") as fh:
        return {line[:6]: int(line.split()[1], 16) for line in fh if line.startswith("Cap")}


def effective_caps() -> set[int]:
    """The calling thread's effective capabilities, read from /proc."""
    mask = _cap_sets().get("CapEff", 0)
    return {bit for bit in range(64) if mask >> bit & 1}


#: What identification needs whatever the backend: reading other users' /proc/PID entries and fd links.
IDENTITY_CAPS = (CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE)


def caps_for(backend_caps: tuple[int, ...] | None) -> tuple[int, ...]:
    """The capabilities the agent keeps once it runs: identification's, plus what the redirect backend asks for
    (``Backend.capabilities``; None when the agent installs no redirect)."""
    wanted = set(IDENTITY_CAPS) | set(backend_caps or ())
    if backend_caps is None:
        wanted.add(CAP_NET_ADMIN)  # sock_diag over netlink, even with the redirect managed elsewhere
    return tuple(sorted(wanted))


def missing_caps(wanted: tuple[int, ...] = REQUIRED_CAPS) -> list[str]:
    """Names of the ``wanted`` capabilities the process does not hold."""
    have = effective_caps()
    return [CAP_NAMES.get(c, str(c)) for c in wanted if c not in have]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"{what} failed: {os.strerror(err)}")


def _capset(permitted: int, effective: int, inheritable: int) -> None:
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)(
        _CapData(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF),
        _CapData(effective >> 32, permitted >> 32, inheritable >> 32),
    )
    _check(_libc().capset(ctypes.byref(header), data), "capset")


def _mask(caps: tuple[int, ...]) -> int:
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    return mask


def limit_to(keep: tuple[int, ...]) -> None:
    """Give up every capability not in ``keep`` (for an agent started unprivileged with ambient capabilities).

    Lowering the permitted and inheritable sets also clears those capabilities from the ambient set, so the
    helper processes the agent starts get no more than it kept. Only ever removes capabilities.
    """
    sets = _cap_sets()
    keep_mask = _mask(keep)
    surplus = sets["CapPrm"] & ~keep_mask
    if not surplus:
        return
    try:
        _capset(sets["CapPrm"] & keep_mask, sets["CapEff"] & keep_mask, sets["CapInh"] & keep_mask)
    except PrivilegeError as exc:
        # A seccomp filter that forbids capset (a unit without the shipped one's exception) must not stop the
        # agent: it keeps what it was given, which its service manager chose.
        extra = [CAP_NAMES.get(c, str(c)) for c in range(64) if surplus >> c & 1]
        log.warning("could not give up %s (%s); running with them", ", ".join(extra), exc)


def drop_to(account: Account, keep: tuple[int, ...] = REQUIRED_CAPS) -> None:
    """Switch from root to ``account`` keeping exactly ``keep`` as permitted and effective capabilities.

    Also empties the bounding set of everything else and sets no_new_privs, so nothing the agent might exec
    could regain privileges.
    """
    if os.geteuid() != 0:
        raise PrivilegeError("dropping privileges needs root")
    libc = _libc()
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as fh:
        last_cap = int(fh.read())
    for cap in range(last_cap + 1):
        if cap not in keep:
            _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap} from the bounding set")
    _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setresgid(account.gid, account.gid, account.gid)
    os.setresuid(account.uid, account.uid, account.uid)
    mask = _mask(keep)
    _capset(mask, mask, mask)
    # Ambient too, so the helper processes the agent runs (the iptables worker) keep the same capabilities,
    # exactly as under systemd's AmbientCapabilities; nothing else is ever executed.
    for cap in keep:
        _check(libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0), f"raising ambient capability {cap}")
    _check(libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS, 0)")
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    log.info(
        "running as uid %d with %s", account.uid, ", ".join(CAP_NAMES.get(c, str(c)) for c in sorted(keep)) or "none"
    )


def require_for_redirect() -> None:
    """Raise PrivilegeError unless this process may install the redirect (root, or CAP_NET_ADMIN ambient)."""
    if os.geteuid() == 0:
        return
    missing = missing_caps((CAP_NET_ADMIN,))
    if missing:
        raise PrivilegeError(
            f"installing the redirect needs {', '.join(missing)}: run as root or with it as an ambient capability"
        )


def settle(account: Account, keep: tuple[int, ...]) -> None:
    """Give up everything but ``keep``: from root, switch to ``account``; started as that user with ambient
    capabilities (as the systemd unit does), only narrow them. Call before any thread starts."""
    if os.geteuid() != 0:
        missing = missing_caps(keep)
        if missing:
            log.warning("running without %s: some callers may not be identifiable", ", ".join(missing))
        limit_to(keep)
        return
    if account.uid == 0:
        log.warning("configured user is root: the agent keeps full privileges and root's traffic is not redirected")
        return
    drop_to(account, keep)
