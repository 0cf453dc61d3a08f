"""Find a client's socket inside another network namespace: the container it connected from.

A container with a network namespace of its own connects to 169.254.169.254:80 from its own address; the host's
prerouting redirect hands the connection to the agent's container listener. sock_diag in the agent's namespace
cannot see the client's end, and the source address alone proves nothing (addresses are reused as containers come
and go, and a container with CAP_NET_ADMIN can take any address it likes). What proves where the connection came
from is the client's socket itself: a namespace that holds a TCP socket from exactly the peer's address and port to
exactly the original destination. The agent reads each namespace's socket table through ``/proc/PID/net/tcp`` of
a process inside it, which needs no capability beyond reading /proc (no setns, no CAP_SYS_ADMIN).

A socket found in more than one namespace is ambiguous and identifies nobody; one found in none is not a local
container's (another host on the bridge's segment, or a client that has closed already), and is not trusted.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any, Optional

from .procs import PROC, check_deadline

TABLE_LIMIT = 8 << 20  # bytes of one namespace's socket table read at most
NS_GET_USERNS = 0xB701  # ioctl on a namespace file: the user namespace that owns it
RTF_LOCAL = 0x80000000  # ipv6_route flag of a local route


@dataclass(frozen=True)
class NetnsSocket:
    """The client's socket as its own namespace shows it."""

    netns: int  # inode of the network namespace
    pid: int  # a process in that namespace (whose /proc/PID/net was read)
    uid: int  # the socket's owner, as the host numbers it
    inode: int  # the socket's inode (0: closed by its process already, or no longer a live connection)


class Ambiguous(Exception):
    """The socket was found in more than one namespace."""


def _hex(address: str) -> str:
    """An address as /proc/net/tcp{,6} prints it: each 32-bit word in host byte order, as 8 hex digits."""
    packed = ipaddress.ip_address(address).packed
    return "".join(f"{w:08X}" for w in struct.unpack(f"={len(packed) // 4}I", packed))


def needle(local: tuple[str, int], remote: tuple[str, int]) -> str:
    """The ' LOCAL REMOTE ' columns of the /proc/net/tcp line for a socket from ``local`` to ``remote``."""
    return f" {_hex(local[0])}:{local[1]:04X} {_hex(remote[0])}:{remote[1]:04X} "


ESTABLISHED = "01"


def mapped(addr: tuple[str, int]) -> tuple[str, int]:
    """An IPv4 endpoint as an AF_INET6 socket holds it: ::ffff:a.b.c.d."""
    return f"::ffff:{addr[0]}", addr[1]


def parse_line(text: str, key: str) -> Optional[tuple[int, int, str]]:
    """(uid, inode, state) from the /proc/net/tcp line of ``text`` holding ``key``; None when there is none. A
    socket in TIME_WAIT (state 06) has no owner any more: inode 0."""
    at = text.find(key)
    if at < 0:
        return None
    end = text.find("\n", at)
    fields = text[at : end if end >= 0 else len(text)].split()
    # local remote st tx:rx tr:when retrnsmt uid timeout inode
    if len(fields) < 9:
        return None
    try:
        return int(fields[6]), int(fields[8]), fields[2]
    except ValueError:
        return None


class NetnsSockets:
    """Thread-safe finder of client sockets across the host's network namespaces; see the module docstring."""

    def __init__(self, proc: str = PROC):
        self.proc = proc
        self._own = self._netns_of("self") or 0
        self._initial_userns = self._userns_of_pid("self")  # the agent runs in the host's user namespace
        self._lock = threading.Lock()
        # Per family (False: IPv4): address -> the host-owned namespaces that had it when last looked at.
        self._index: dict[bool, dict[Any, list[tuple[int, int]]]] = {False: {}, True: {}}

    def _netns_of(self, pid: str) -> Optional[int]:
        try:
            return os.stat(f"{self.proc}/{pid}/ns/net").st_ino
        except OSError:
            return None

    def _userns_of_pid(self, pid: str) -> Optional[int]:
        try:
            return os.stat(f"{self.proc}/{pid}/ns/user").st_ino
        except OSError:
            return None

    def owned_by_host(self, pid: int) -> bool:
        """Whether ``pid``'s network namespace belongs to the host's user namespace. Any user may make a network
        namespace of its own inside a user namespace of its own (``unshare -Urn``), give it any address and hold
        sockets there; no container runtime's bridge leads into such a namespace, and it must never stand for a
        container (or make a container's socket ambiguous)."""
        try:
            fd = os.open(f"{self.proc}/{pid}/ns/net", os.O_RDONLY)
        except OSError:
            return False
        try:
            owner = fcntl.ioctl(fd, NS_GET_USERNS)
        except OSError:
            return False
        finally:
            os.close(fd)
        try:
            return os.fstat(owner).st_ino == self._initial_userns
        finally:
            os.close(owner)

    def namespaces(self, deadline: Optional[float] = None) -> dict[int, int]:
        """Every network namespace but the agent's that a process is in: inode -> the lowest such pid."""
        found: dict[int, int] = {}
        try:
            entries = os.listdir(self.proc)
        except OSError:
            return found
        for n, entry in enumerate(entries):
            if not entry.isdigit():
                continue
            if n % 128 == 127:
                check_deadline(deadline)
            ino = self._netns_of(entry)
            if ino is not None and ino != self._own and (ino not in found or int(entry) < found[ino]):
                found[ino] = int(entry)
        return found

    def _search(self, pid: int, netns: int, key: str, v6: bool) -> Optional[tuple[int, int, str]]:
        """The socket ``key`` names in ``netns``, read through ``pid``; None if absent or ``pid`` has left it."""
        try:
            with open(f"{self.proc}/{pid}/net/{'tcp6' if v6 else 'tcp'}", encoding="ascii", errors="replace") as fh:
                text = fh.read(TABLE_LIMIT)
        except OSError:
            return None
        # The pid may have exited and been reused (or moved) while we read: the table must be the namespace's.
        if self._netns_of(str(pid)) != netns:
            return None
        return parse_line(text, key)

    def local_networks(self, pid: int, v6: bool) -> list[Any]:
        """What ``pid``'s namespace takes as its own: the networks of its local routes (every address it has,
        and any ``ip route add local`` a process with CAP_NET_ADMIN there made), from fib_trie (IPv4) or
        ipv6_route (IPv6). Both are the namespace's own tables, read in tens of microseconds."""
        name = "ipv6_route" if v6 else "fib_trie"
        try:
            with open(f"{self.proc}/{pid}/net/{name}", encoding="ascii", errors="replace") as fh:
                text = fh.read(TABLE_LIMIT)
        except OSError:
            return []
        out: list[Any] = []
        if v6:
            for line in text.splitlines():
                cols = line.split()
                if len(cols) >= 9 and int(cols[8], 16) & RTF_LOCAL:
                    out.append(ipaddress.IPv6Network((bytes.fromhex(cols[0]), int(cols[1], 16)), strict=False))
            return out
        last = ""
        for line in text.splitlines():
            item = line.strip()
            if item.startswith("|--") or item.startswith("+--"):
                last = item[3:].split()[0]
            elif item.startswith("/") and "host LOCAL" in item and last:
                out.append(ipaddress.IPv4Network(f"{last}{item.split()[0]}", strict=False))
        return out

    def is_local(self, pid: int, address: str, v6: bool) -> bool:
        """Whether ``address`` is one ``pid``'s namespace takes as its own."""
        addr = ipaddress.ip_address(address)
        return any(addr in net for net in self.local_networks(pid, v6))

    def find(
        self, peer: tuple[str, int], dialled: tuple[str, int], deadline: Optional[float] = None
    ) -> Optional[NetnsSocket]:
        """The namespace holding a live connection from ``peer`` to ``dialled`` (the original destination), and
        its owner; a socket found there in any other state comes back with inode 0 (closed, or a connection
        that ended: a lingering CLOSE_WAIT socket must not lend its process to a new connection on its tuple).

        Only namespaces that take the peer's address as their own can hold its socket (a reply to any other
        would never reach it), and only those the host's user namespace owns, so only their socket tables are
        read: /proc/PID/net/tcp walks the kernel's whole connection hash, shared by every namespace unless
        net.ipv4.tcp_child_ehash_entries gives each its own, which costs milliseconds on a large host. Which
        namespaces had which address is remembered, and every namespace is looked at again whenever a
        remembered one is gone or none of them holds the socket (pods come and go, addresses move). A table
        read while connections churn can miss an entry (the kernel's seq_file restarts between pages), so a
        candidate is read twice before it counts as not holding it.
        Raises Ambiguous when more than one holds such a socket, OverBudget past ``deadline``.
        """
        v6 = ":" in peer[0]
        # An IPv4 connection made from an AF_INET6 socket (a client that dialled [::ffff:169.254.169.254]) is in
        # the tcp6 table, its addresses spelled IPv4-mapped.
        keys = [(needle(peer, dialled), v6)]
        if not v6:
            keys.append((needle(mapped(peer), mapped(dialled)), True))
        address = str(ipaddress.ip_address(peer[0]))
        with self._lock:
            remembered = self._candidates(self._index[v6], address)
        matches, stale = self._holding(remembered, address, keys, v6, deadline)
        if stale or not any(m.inode for m in matches):
            index = self._build_index(v6, deadline)
            with self._lock:
                self._index[v6] = index
            matches, _ = self._holding(self._candidates(index, address), address, keys, v6, deadline)
        live = [m for m in matches if m.inode]
        if len(live) > 1 or (not live and len(matches) > 1):
            raise Ambiguous(f"a socket from {peer[0]}:{peer[1]} exists in {len(matches)} network namespaces")
        if live:
            return live[0]
        return matches[0] if matches else None

    @staticmethod
    def _candidates(index: dict[Any, list[tuple[int, int]]], address: str) -> list[tuple[int, int]]:
        addr = ipaddress.ip_address(address)
        # fib_trie lists a local address under each table that holds it: one namespace, once.
        return list(dict.fromkeys(c for net, found in index.items() if addr in net for c in found))

    def _holding(
        self,
        candidates: list[tuple[int, int]],
        address: str,
        keys: list[tuple[str, bool]],
        v6: bool,
        deadline: Optional[float],
    ) -> tuple[list[NetnsSocket], bool]:
        """The candidates holding the socket (a dead connection with inode 0), and whether any candidate was
        stale (its pid gone, moved, or the address no longer its namespace's)."""
        out, stale = [], False
        for netns, pid in candidates:
            check_deadline(deadline)
            if self._netns_of(str(pid)) != netns or not self.is_local(pid, address, v6):
                stale = True
                continue
            hit = self._lookup(pid, netns, keys)
            if hit is not None:
                uid, inode, state = hit
                out.append(NetnsSocket(netns, pid, uid, inode if state == ESTABLISHED else 0))
        return out, stale

    def _lookup(self, pid: int, netns: int, keys: list[tuple[str, bool]]) -> Optional[tuple[int, int, str]]:
        """The first of ``keys`` (needle, in tcp6) that ``pid``'s namespace holds; each table is read twice before
        the socket counts as not there (see find)."""
        for _ in range(2):
            for key, six in keys:
                hit = self._search(pid, netns, key, six)
                if hit is not None:
                    return hit
        return None

    def _build_index(self, v6: bool, deadline: Optional[float]) -> dict[Any, list[tuple[int, int]]]:
        """Every host-owned namespace's local networks of one family: network -> [(netns, pid)]."""
        index: dict[Any, list[tuple[int, int]]] = {}
        for netns, pid in self.namespaces(deadline).items():
            check_deadline(deadline)
            if not self.owned_by_host(pid):
                continue
            for net in set(self.local_networks(pid, v6)):
                index.setdefault(net, []).append((netns, pid))
        return index

    def netns_of_pid(self, pid: int) -> Optional[int]:
        """The inode of ``pid``'s network namespace (None when it cannot be read)."""
        return self._netns_of(str(pid))
