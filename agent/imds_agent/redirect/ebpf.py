"""The ebpf backend (experimental, off by default): rewrite metadata connects in the kernel, and record who made them.

Two cgroup sock_addr programs (BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT) run inside connect(2), before
the route lookup and before any packet exists. A TCP connect to 169.254.169.254:80, [fd00:ec2::254]:80 or the
IPv4-mapped [::ffff:169.254.169.254]:80, made in the agent's network namespace by any uid but the agent's, is
rewritten to the listener (127.0.0.1, [::1] or [::ffff:127.0.0.1] on the listen port). At that moment the program
records the caller, {tgid, tid, uid, gid, cgroup id, comm, original destination}, in an LRU hash map keyed by the
socket cookie; the agent reads the record back with the cookie of the accepted connection's peer socket
(``SocketOwner.cookie``), so the caller is the task that called connect(), not a guess from /proc afterwards.

What differs from the netfilter backends: no conntrack, so SO_ORIGINAL_DST has nothing to say (the record holds
the original destination); the hook covers processes in the cgroup (the v2 root by default: every process), so
the program also checks the network namespace's cookie, otherwise a container with its own namespace would be
sent to a loopback where nothing listens; and a connection opened before the programs were attached is not
redirected (no guard yet). The programs are assembled in Python (bpfasm: why not C) and loaded with bpf(2)
through ctypes (bpfsys). The links belong to the agent's fds and vanish when it exits, so ``can_own`` is true;
pinning them under bpffs for fail_mode closed is left for a later piece, and until then ``apply(owned=False)``
is refused rather than silently not persisting.

Capabilities: CAP_BPF (39, Linux 5.8) and CAP_NET_ADMIN to load and attach cgroup programs; before 5.8, CAP_SYS_ADMIN
(21) instead of CAP_BPF. Reading the map through its fd needs none.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Optional

from ..errors import RedirectError
from . import bpfsys
from .base import CheckResult, RedirectSpec, RuleView, State
from .bpfasm import FP, R0, R1, R2, R3, R4, R6, R7, R8, Program

log = logging.getLogger(__name__)

CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF = 21, 12, 39
SO_COOKIE, SO_NETNS_COOKIE = 57, 71
IPPROTO_MPTCP = 262
# Helpers (enum bpf_func_id); all are allowed in cgroup sock_addr programs on 6.x kernels.
MAP_UPDATE_ELEM, GET_CURRENT_PID_TGID, GET_CURRENT_UID_GID, GET_CURRENT_COMM = 2, 14, 15, 16
GET_SOCKET_COOKIE, GET_CURRENT_CGROUP_ID, GET_NETNS_COOKIE = 46, 80, 122
# struct bpf_sock_addr offsets.
USER_IP4, USER_IP6, USER_PORT, PROTOCOL = 4, 8, 24, 36
# The record (struct connect_record, 64 bytes) at fp-64 and its key, the socket cookie, at fp-72.
RECORD = struct.Struct("=IIIIQ16s16s2sHI")
REC, KEY = -64, -72
TGID, TID, UID, GID, CGROUP, COMM, ADDR, PORT, FAMILY = (REC + o for o in (0, 4, 8, 12, 16, 24, 40, 56, 58))
MAP_NAME, MAP_ENTRIES = "imds_connects", 65536
PROG_NAMES = {"ipv4": "imds_connect4", "ipv6": "imds_connect6"}
ATTACH = {"ipv4": bpfsys.BPF_CGROUP_INET4_CONNECT, "ipv6": bpfsys.BPF_CGROUP_INET6_CONNECT}


@dataclass(frozen=True)
class ConnectRecord:
    """What the connect hook saw of the caller of one redirected connection."""

    tgid: int
    tid: int
    uid: int
    gid: int
    cgroup_id: int
    comm: str
    original_dst: tuple[str, int]

    @classmethod
    def decode(cls, raw: bytes) -> ConnectRecord:
        """From the map's value bytes."""
        tgid, tid, uid, gid, cgroup_id, comm, addr, port, family, _ = RECORD.unpack(raw[: RECORD.size])
        host = socket.inet_ntop(family, addr[:4] if family == socket.AF_INET else addr)
        name = comm.split(b"\0", 1)[0].decode(errors="backslashreplace")
        return cls(tgid, tid, uid, gid, cgroup_id, name, (host, struct.unpack("!H", port)[0]))


def word(raw: bytes) -> int:
    """Four bytes in network order as the program's u32 load sees them."""
    return int.from_bytes(raw, sys.byteorder)


def port_word(port: int) -> int:
    """A port as bpf_sock_addr.user_port holds it: network order in the low 16 bits."""
    return word(struct.pack("!H", port) + b"\0\0")


def targets(family: str, spec: RedirectSpec) -> list[tuple[bytes, bytes]]:
    """(address to catch, address to send it to) for one program, in network order. The v6 program also catches
    the IPv4-mapped address: tcp_v6_connect hands such a connect to tcp_v4_connect directly, so the INET4 hook
    never sees it, and netfilter's rules (which see an IPv4 packet) would have caught it."""
    if family == "ipv4":
        return [(socket.inet_aton(spec.ipv4), socket.inet_aton(spec.to_ipv4))]
    mapped = [(socket.inet_pton(socket.AF_INET6, "::ffff:" + spec.ipv4),
               socket.inet_pton(socket.AF_INET6, "::ffff:" + spec.to_ipv4))]  # fmt: skip
    if spec.with_ipv6:
        mapped.append((socket.inet_pton(socket.AF_INET6, spec.ipv6), socket.inet_pton(socket.AF_INET6, spec.to_ipv6)))
    return mapped


def build_program(family: str, spec: RedirectSpec, netns_cookie: int) -> Program:
    """The connect hook for ``family`` ("ipv4" or "ipv6"). It always returns 1 (let connect proceed); r6 holds
    the context, r7 the uid/gid, r8 which target matched."""
    p = Program()
    ip, size = (USER_IP4, 4) if family == "ipv4" else (USER_IP6, 16)
    p.mov(R6, R1)
    p.load(4, R2, R6, PROTOCOL)
    p.jump("jeq", R2, socket.IPPROTO_TCP, "tcp", wide=False).jump("jne", R2, IPPROTO_MPTCP, "out", wide=False)
    p.label("tcp").load(4, R2, R6, USER_PORT).jump("jne", R2, port_word(spec.port), "out", wide=False)
    catch = targets(family, spec)
    for n, (addr, _) in enumerate(catch):
        miss = f"try{n + 1}" if n + 1 < len(catch) else "out"
        for i in range(0, size, 4):
            p.load(4, R2, R6, ip + i).jump("jne", R2, word(addr[i : i + 4]), miss, wide=False)
        p.mov(R8, n).goto("caught")
        if n + 1 < len(catch):
            p.label(miss)
    p.label("caught").mov(R1, R6).call(GET_NETNS_COOKIE)
    p.load_imm64(R2, netns_cookie).jump("jne", R0, R2, "out")
    p.call(GET_CURRENT_UID_GID).mov(R7, R0).jump("jeq", R7, spec.exempt_uid, "out", wide=False)
    _record(p, ip, size)
    for n, (_, to) in enumerate(catch):
        p.label(f"rewrite{n}").jump("jne", R8, n, f"rewrite{n + 1}" if n + 1 < len(catch) else "out")
        for i in range(0, size, 4):
            p.mov32(R2, word(to[i : i + 4])).store(4, R6, ip + i, R2)
        p.goto("port")
    p.label("port").mov32(R2, port_word(spec.listen_port)).store(4, R6, USER_PORT, R2)
    return p.label("out").mov(R0, 1).exit()


def _record(p: Program, ip: int, size: int) -> None:
    """Fill the record on the stack (zeroed first: helpers may read only initialised stack) and store it."""
    for off in range(KEY, 0, 8):
        p.store_imm(8, FP, off, 0)
    p.store(4, FP, UID, R7).alu("rsh", R7, 32).store(4, FP, GID, R7)
    p.call(GET_CURRENT_PID_TGID).store(4, FP, TID, R0).alu("rsh", R0, 32).store(4, FP, TGID, R0)
    p.call(GET_CURRENT_CGROUP_ID).store(8, FP, CGROUP, R0)
    p.mov(R1, FP).alu("add", R1, COMM).mov(R2, 16).call(GET_CURRENT_COMM)
    for i in range(0, size, 4):
        p.load(4, R2, R6, ip + i).store(4, FP, ADDR + i, R2)
    p.load(4, R2, R6, USER_PORT).store(2, FP, PORT, R2)
    p.store_imm(2, FP, FAMILY, socket.AF_INET if size == 4 else socket.AF_INET6)
    p.mov(R1, R6).call(GET_SOCKET_COOKIE).store(8, FP, KEY, R0)
    # A full LRU map evicts its oldest entry rather than refuse; a record that is missing anyway leaves the
    # caller unidentified, which the agent already treats as unknown. So the result is not checked.
    p.load_map(R1, MAP_NAME).mov(R2, FP).alu("add", R2, KEY).mov(R3, FP).alu("add", R3, REC).mov(R4, 0)
    p.call(MAP_UPDATE_ELEM)


def netns_cookie() -> int:
    """This network namespace's cookie, as bpf_get_netns_cookie() returns it (SO_NETNS_COOKIE, Linux 5.14)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return int(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0])


def kernel_capabilities(cap_last_cap: str = "/proc/sys/kernel/cap_last_cap") -> tuple[int, ...]:
    """CAP_BPF and CAP_NET_ADMIN where the kernel knows CAP_BPF (5.8), else CAP_SYS_ADMIN and CAP_NET_ADMIN."""
    try:
        with open(cap_last_cap) as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = CAP_BPF
    return (CAP_BPF, CAP_NET_ADMIN) if last >= CAP_BPF else (CAP_SYS_ADMIN, CAP_NET_ADMIN)


def default_cgroup(mountinfo: str = "/proc/self/mountinfo") -> Optional[str]:
    """The cgroup v2 root: /sys/fs/cgroup on a pure v2 host, /sys/fs/cgroup/unified on a hybrid one."""
    found: list[str] = []
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2":
                    found.append(fields[4])
    except (OSError, ValueError, IndexError):
        return None
    for preferred in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if preferred in found:
            return preferred
    return found[0] if found else None


@dataclass
class _Hook:
    family: str
    prog_fd: int
    link_fd: int
    prog_id: int
    link_id: int
    verifier: str

    def close(self) -> None:
        for fd in (self.link_fd, self.prog_fd):
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                log.exception("cannot close bpf fd %d", fd)


# --- the caller of an accepted connection -----------------------------------------------------------------------
def peer_cookie(conn: socket.socket) -> Optional[int]:
    """The socket cookie of the client end of an accepted loopback connection (the key of its ConnectRecord),
    from the identity module's exact sock_diag lookup; None when the client's socket is gone."""
    from ..identity.sockets import SocketLookup

    lookup = SocketLookup()
    try:
        owner = lookup.owner(conn.getpeername()[:2], conn.getsockname()[:2])
    finally:
        lookup.close()
    return owner.cookie if owner is not None else None


# --- the backend ------------------------------------------------------------------------------------------------
class EbpfBackend:
    """Redirect with connect hooks linked to one cgroup (the v2 root unless told otherwise)."""

    name = "ebpf"

    containers = False  # its hooks see container sockets, but rewrite towards loopback only so far

    def __init__(self, cgroup: Optional[str] = None) -> None:
        self.cgroup = cgroup if cgroup is not None else default_cgroup()
        self.capabilities: tuple[int, ...] = kernel_capabilities()
        self._map_fd: Optional[int] = None
        self._hooks: list[_Hook] = []
        self._spec: Optional[RedirectSpec] = None
        self._supported: Optional[bool] = None
        self._reason = ""

    def can_own(self) -> bool:
        """Always: the links are the agent's fds, and the kernel detaches them when the last one closes."""
        return True

    def is_supported(self) -> bool:
        """Whether bpf(2), a cgroup v2 hierarchy, SO_NETNS_COOKIE and the verifier's consent to the real programs
        are all there. Probed once, by loading both programs against a scratch map (nothing is attached)."""
        if self._supported is None:
            try:
                self._probe()
                self._supported = True
            except (OSError, RedirectError) as exc:
                self._reason = str(exc)
                self._supported = False
        return self._supported

    def _probe(self) -> None:
        if self.cgroup is None or not os.path.isdir(self.cgroup):
            raise RedirectError("no cgroup v2 hierarchy is mounted (the ebpf backend attaches to one)")
        try:
            cookie = netns_cookie()
        except OSError:
            raise RedirectError("the kernel has no SO_NETNS_COOKIE (Linux 5.14)") from None
        map_fd = self._create_map(entries=1)
        try:
            for hook in self._load(RedirectSpec(exempt_uid=0, listen_port=1), cookie, map_fd, attach=False):
                hook.close()
        finally:
            os.close(map_fd)

    def unsupported_reason(self) -> str:
        """What is missing, after is_supported() said no."""
        return self._reason

    @staticmethod
    def _create_map(entries: int = MAP_ENTRIES) -> int:
        try:
            return bpfsys.create_map(bpfsys.BPF_MAP_TYPE_LRU_HASH, 8, RECORD.size, entries, MAP_NAME)
        except OSError as exc:
            raise RedirectError(f"{exc} (needs CAP_BPF, or CAP_SYS_ADMIN before Linux 5.8)") from None

    def _load(self, spec: RedirectSpec, cookie: int, map_fd: int, attach: bool = True) -> list[_Hook]:
        """Load (and link) both programs; on any failure close what this call made and raise RedirectError."""
        hooks: list[_Hook] = []
        try:
            cgroup_fd = os.open(self.cgroup or "", os.O_RDONLY | os.O_DIRECTORY) if attach else -1
        except OSError as exc:
            raise RedirectError(f"ebpf backend: cannot open cgroup {self.cgroup}: {exc.strerror}") from None
        try:
            for family, prog_name in PROG_NAMES.items():
                code = build_program(family, spec, cookie).assemble({MAP_NAME: map_fd})
                prog_fd, verifier = bpfsys.load_program(
                    bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, ATTACH[family], code, prog_name
                )
                hook = _Hook(family, prog_fd, -1, bpfsys.prog_id(prog_fd), 0, verifier)
                hooks.append(hook)
                if attach:
                    hook.link_fd = bpfsys.link_create(prog_fd, cgroup_fd, ATTACH[family])
                    hook.link_id = bpfsys.link_info(hook.link_fd)[0]
        except OSError as exc:
            for hook in hooks:
                hook.close()
            hint = " (needs CAP_BPF and CAP_NET_ADMIN)" if exc.errno == 1 else ""
            raise RedirectError(f"ebpf backend: {exc}{hint}") from None
        finally:
            if cgroup_fd >= 0:
                os.close(cgroup_fd)
        return hooks

    def apply(self, spec: RedirectSpec, owned: bool = False) -> None:
        """Attach programs for ``spec``, then detach any earlier ones (both run meanwhile, which is harmless: the
        second sees an address already rewritten)."""
        if not owned:
            raise RedirectError("ebpf backend: persistent programs (fail_mode closed, `rules apply`) need pinning "
                                "under bpffs, which is not implemented yet")  # fmt: skip
        if self._map_fd is None:
            self._map_fd = self._create_map()
        try:
            cookie = netns_cookie()
        except OSError as exc:
            raise RedirectError(f"ebpf backend: SO_NETNS_COOKIE: {exc.strerror or exc}") from None
        new = self._load(spec, cookie, self._map_fd)
        old, self._hooks, self._spec = self._hooks, new, spec
        for hook in old:
            hook.close()
        log.info("ebpf connect hooks attached to %s: %s", self.cgroup,
                 ", ".join(f"{h.family} prog {h.prog_id} link {h.link_id}" for h in new))  # fmt: skip

    def remove(self) -> bool:
        """Detach and unload our programs (the map stays, for connections already accepted)."""
        hooks, self._hooks, self._spec = self._hooks, [], None
        for hook in hooks:
            hook.close()
        return bool(hooks)

    def check(self, spec: Optional[RedirectSpec] = None) -> CheckResult:
        """Read our links back: attached, to the cgroup we were given, for ``spec``."""
        if not self._hooks:
            return CheckResult(self.name, State.ABSENT, (f"no connect hooks of this agent on {self.cgroup}",),
                               owned=True)  # fmt: skip
        want = os.stat(self.cgroup or "").st_ino  # a cgroup v2 directory's inode number is its cgroup id
        details: list[str] = []
        views: list[RuleView] = []
        attached = 0
        for hook in self._hooks:
            link_id, prog, cgroup_id, _ = bpfsys.link_info(hook.link_fd)
            views.append(RuleView(hook.family, f"{PROG_NAMES[hook.family]} prog {prog} link {link_id} on "
                                  f"{self.cgroup} (cgroup {cgroup_id})"))  # fmt: skip
            if cgroup_id == 0:
                details.append(f"{hook.family} link {link_id} was detached")
            elif cgroup_id != want:
                details.append(f"{hook.family} link {link_id} is on cgroup {cgroup_id}, not {self.cgroup}")
            else:
                attached += 1
        if spec is not None and spec != self._spec:
            details.append("the hooks were built for another spec")
        state = State.ABSENT if attached == 0 else State.PARTIAL if details else State.PRESENT
        return CheckResult(self.name, state, tuple(details), tuple(views), owned=True)

    def record(self, cookie: int) -> Optional[ConnectRecord]:
        """What the connect hook recorded for the socket with ``cookie`` (see ``peer_cookie``), or None."""
        if self._map_fd is None:
            return None
        raw = bpfsys.lookup(self._map_fd, struct.pack("=Q", cookie), RECORD.size)
        return ConnectRecord.decode(raw) if raw is not None else None

    def close(self) -> None:
        """Detach everything and drop the map."""
        self.remove()
        if self._map_fd is not None:
            os.close(self._map_fd)
            self._map_fd = None
