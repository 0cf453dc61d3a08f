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

import ipaddress
import os
import struct
import threading
from dataclasses import dataclass
from typing import Optional

from .procs import PROC, check_deadline

TABLE_LIMIT = 8 << 20  # bytes of one namespace's socket table read at most


@dataclass(frozen=True)
class NetnsSocket:
    """The client's socket as its own namespace shows it."""

    netns: int  # inode of the network namespace
    pid: int  # a process in that namespace (whose /proc/PID/net was read)
    uid: int  # the socket's owner, as the host numbers it
    inode: int  # the socket's inode (0: closed by its process already)


class Ambiguous(Exception):
    """The socket was found in more than one namespace."""


def _hex(address: str) -> str:
    """An address as /proc/net/tcp{,6} prints it: each 32-bit word in host byte order, as 8 hex digits."""
    packed = ipaddress.ip_address(address).packed
    return "".join(f"{w:08X}" for w in struct.unpack(f"={len(packed) // 4}I", packed))


def needle(local: tuple[str, int], remote: tuple[str, int]) -> str:
    """The ' LOCAL REMOTE ' columns of the /proc/net/tcp line for a socket from ``local`` to ``remote``."""
    return f" {_hex(local[0])}:{local[1]:04X} {_hex(remote[0])}:{remote[1]:04X} "


def parse_line(text: str, key: str) -> Optional[tuple[int, int]]:
    """(uid, inode) from the /proc/net/tcp line of ``text`` holding ``key``; None when there is none. A socket
    in TIME_WAIT (state 06) has no owner any more: inode 0."""
    at = text.find(key)
    if at < 0:
        return None
    end = text.find("\n", at)
    fields = text[at : end if end >= 0 else len(text)].split()
    # local remote st tx:rx tr:when retrnsmt uid timeout inode
    if len(fields) < 9:
        return None
    try:
        return int(fields[6]), int(fields[8])
    except ValueError:
        return None


class NetnsSockets:
    """Thread-safe finder of client sockets across the host's network namespaces; see the module docstring."""

    def __init__(self, proc: str = PROC):
        self.proc = proc
        self._own = self._netns_of("self") or 0
        self._lock = threading.Lock()
        # Per family (False: IPv4): address -> the namespaces it was local to when last looked up.
        self._index: dict[bool, dict[str, list[tuple[int, int]]]] = {False: {}, True: {}}

    def _netns_of(self, pid: str) -> Optional[int]:
        try:
            return os.stat(f"{self.proc}/{pid}/ns/net").st_ino
        except OSError:
            return None

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

    def _search(self, pid: int, netns: int, key: str, v6: bool) -> Optional[tuple[int, int]]:
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

    def local_addresses(self, pid: int, v6: bool) -> set[str]:
        """The addresses local to ``pid``'s namespace: fib_trie's host routes (IPv4) or if_inet6 (IPv6). Both are
        the namespace's own tables, read in tens of microseconds, unlike the socket tables (see find)."""
        name = "if_inet6" if v6 else "fib_trie"
        try:
            with open(f"{self.proc}/{pid}/net/{name}", encoding="ascii", errors="replace") as fh:
                text = fh.read(TABLE_LIMIT)
        except OSError:
            return set()
        if v6:
            out = set()
            for line in text.splitlines():
                word = line.split(maxsplit=1)[0] if line.strip() else ""
                if len(word) == 32:
                    out.add(str(ipaddress.IPv6Address(bytes.fromhex(word))))
            return out
        found, last = set(), ""
        for line in text.splitlines():
            item = line.strip()
            if item.startswith("|--") or item.startswith("+--"):
                last = item[3:].split()[0]
            elif item.startswith("/32 host LOCAL"):
                found.add(last)
        return found

    def find(
        self, peer: tuple[str, int], dialled: tuple[str, int], deadline: Optional[float] = None
    ) -> Optional[NetnsSocket]:
        """The namespace holding a socket from ``peer`` to ``dialled`` (the original destination), and its owner.

        Only namespaces where the peer's address is local can hold its socket (a reply to any other would never
        reach it), so only their socket tables are read: /proc/PID/net/tcp walks the kernel's whole connection
        hash, shared by every namespace unless net.ipv4.tcp_child_ehash_entries gives each its own, which costs
        milliseconds on a large host. Which namespaces have which address is remembered and looked up again,
        every namespace, whenever the remembered ones do not hold the socket (pods come and go, addresses move).
        A table read while connections churn can miss an entry (the kernel's seq_file restarts between pages), so
        a candidate is read twice before it counts as not holding it.
        Raises Ambiguous when more than one holds such a socket, OverBudget past ``deadline``.
        """
        v6 = ":" in peer[0]
        key = needle(peer, dialled)
        address = str(ipaddress.ip_address(peer[0]))
        with self._lock:
            remembered = list(self._index[v6].get(address, ()))
        # The remembered namespaces, checked again: still this pid's, still this address.
        matches = self._holding(remembered, address, key, v6, deadline)
        if not matches:
            index = self._build_index(v6, deadline)
            with self._lock:
                self._index[v6] = index
            matches = self._holding(index.get(address, []), address, key, v6, deadline)
        if len(matches) > 1:
            raise Ambiguous(f"a socket from {peer[0]}:{peer[1]} exists in {len(matches)} network namespaces")
        return matches[0] if matches else None

    def _holding(
        self, candidates: list[tuple[int, int]], address: str, key: str, v6: bool, deadline: Optional[float]
    ) -> list[NetnsSocket]:
        out = []
        for netns, pid in candidates:
            check_deadline(deadline)
            if address not in self.local_addresses(pid, v6):
                continue
            hit = self._search(pid, netns, key, v6) or self._search(pid, netns, key, v6)
            if hit is not None:
                out.append(NetnsSocket(netns, pid, hit[0], hit[1]))
        return out

    def _build_index(self, v6: bool, deadline: Optional[float]) -> dict[str, list[tuple[int, int]]]:
        """Every namespace's local addresses of one family: address -> [(netns, pid)]."""
        index: dict[str, list[tuple[int, int]]] = {}
        for netns, pid in self.namespaces(deadline).items():
            check_deadline(deadline)
            for addr in self.local_addresses(pid, v6):
                index.setdefault(addr, []).append((netns, pid))
        return index

    def netns_of_pid(self, pid: int) -> Optional[int]:
        """The inode of ``pid``'s network namespace (None when it cannot be read)."""
        return self._netns_of(str(pid))
