"""The server's ``identify`` hook: an accepted connection becomes a typed Client, looked up once per connection.

The original destination comes from conntrack (what the client dialled before the redirect), then the identity
lookup finds the process behind the peer socket. A lookup that fails for any reason gives an unidentified Caller
with that reason; it never raises into the server.

A connection on the container listener came from a container's own network namespace: its socket is looked for
there (identity/netns.py), and a connection that dialled anything but the metadata service, or whose socket no
local namespace holds, is refused outright: the listener is reachable from the containers' segment, and it must
never serve anyone but the local containers the redirect sent.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from ..identity.caller import Caller, address_share
from ..identity.containers import ContainerDirectory, uid_inside
from ..identity.netns import Ambiguous, NetnsSocket, NetnsSockets
from ..identity.procs import OverBudget
from ..identity.resolver import OVER_BUDGET, Identifier
from ..identity.sockets import SocketOwner
from .origdst import original_dst
from .server import Connection
from .types import Address, Client

log = logging.getLogger(__name__)
SEEN_MAX = 4096


class Attested(Protocol):
    """A connect-time record of the process that connected (redirect/ebpf.py's ConnectRecord)."""

    tgid: int
    comm: str
    original_dst: tuple[str, int]


Attest = Callable[[int], Optional[Attested]]  # socket cookie -> the record made at connect, if any
Seen = tuple[Optional[Address], Optional[SocketOwner]]  # admission's original destination and socket owner


@dataclass
class ContainerSide:
    """The container listener: its port, what a redirected container connection dialled, where to look."""

    port: int
    dialled: frozenset[Address]
    sockets: NetnsSockets = dataclasses.field(default_factory=NetnsSockets)


class ConnectionIdentifier:
    """Callable hook: ``Connection -> Client``; thread-safe, shared by every worker."""

    def __init__(
        self,
        identifier: Identifier,
        dst: Callable[[Connection], Optional[Address]] = lambda conn: original_dst(conn.sock),
        clock: Callable[[], float] = time.time,
        attest: Optional[Attest] = None,
    ):
        self.identifier = identifier
        self._dst = dst
        self._clock = clock
        self.attest = attest
        self.containers: Optional[ContainerSide] = None
        # Describes the container a caller runs in from its runtime's state (None: callers carry no workload).
        self.directory: Optional[ContainerDirectory] = None
        # What admission learnt at accept (the original destination, the socket's owner), handed to the
        # identification of the same connection so that neither is asked of the kernel twice.
        self._seen: dict[tuple[Address, Address], Seen] = {}

    def __call__(self, conn: Connection) -> Client:
        seen = self._seen.pop((conn.peer, conn.local), None)
        side = self.containers
        if side is not None and conn.local[1] == side.port:
            return self._from_container(conn, side)
        if self.attest is not None:
            return self._attested(conn, self.attest, seen[1] if seen is not None else None)
        dst, owner = seen if seen is not None else (self._dst(conn), None)
        started = time.monotonic()
        try:
            caller = self.identifier.identify(conn.peer, conn.local, dst, owner)
            if caller.container is not None:  # a container sharing the host's network (ECS agent, DaemonSets)
                caller = self.workload(caller)
        except Exception as exc:
            # A bug or an unexpected /proc state must not make a caller anyone in particular.
            log.exception("identifying the client of a connection failed")
            caller = Caller.unknown(f"identification failed: {type(exc).__name__}")
        return Client(conn.peer, conn.local, dst, caller, self._clock(), time.monotonic() - started)

    def _attested(self, conn: Connection, attest: Attest, owner: Optional[SocketOwner]) -> Client:
        """With a backend that attests callers at connect time (ebpf): the record, found by the peer socket's
        cookie, names the process. The sock_diag answer admission got at accept serves for both."""
        started = time.monotonic()
        dst: Optional[Address] = None
        try:
            owner = owner or self.identifier.lookup.owner(conn.peer, conn.local)
            record = attest(owner.cookie) if owner is not None else None
            if owner is None or owner.inode == 0:
                caller = Caller.unknown("the client closed its socket before it could be identified")
            elif record is None:
                caller = Caller.unknown("no connect record for this socket (connected before the hooks, or evicted)")
            else:
                dst = record.original_dst
                caller = self.identifier.identify_attested(conn.peer, conn.local, record.tgid, record.comm, owner)
        except Exception as exc:
            log.exception("identifying the client of a connection failed")
            caller, dst = Caller.unknown(f"identification failed: {type(exc).__name__}"), None
        return Client(conn.peer, conn.local, dst, caller, self._clock(), time.monotonic() - started)

    def _from_container(self, conn: Connection, side: ContainerSide) -> Client:
        """A connection on the container listener: found in the container's namespace, or refused."""
        started = time.monotonic()
        dst = self._dst(conn)
        refused = ""
        if dst not in side.dialled:
            refused = f"not a redirected container connection (it dialled {_show(dst)}): not served"
            caller = Caller.unknown(refused)
        else:
            found, why = self._locate(conn, side, dst)
            if found is not None:
                caller = self._container_caller(conn, side, dst, found)
            elif why is not None:
                caller = why
            else:
                refused = "no local container holds this connection's socket (another host?): not served"
                caller = Caller.unknown(refused)
        return Client(conn.peer, conn.local, dst, caller, self._clock(), time.monotonic() - started, refused)

    def _locate(
        self, conn: Connection, side: ContainerSide, dst: Address
    ) -> tuple[Optional[NetnsSocket], Optional[Caller]]:
        """The container namespace's socket, or the unidentified Caller saying why it could not be told."""
        try:
            return side.sockets.find(conn.peer, dst, time.monotonic() + self.identifier.budget), None
        except Ambiguous as exc:
            return None, Caller.unknown(str(exc))
        except OverBudget:
            return None, Caller.unknown(f"{OVER_BUDGET} of {self.identifier.budget * 1000:.0f} ms")
        except OSError as exc:
            return None, Caller.unknown(f"container socket lookup failed: {exc.strerror or exc}")

    def _container_caller(self, conn: Connection, side: ContainerSide, dst: Address, found: NetnsSocket) -> Caller:
        """The process behind the socket found in a container's namespace; every answer, unidentified ones too,
        carries that namespace (its records and its share of the per-user limits are the container's)."""
        if found.inode == 0:
            why = "the client's connection ended before it could be identified (closed, or no longer established)"
            return dataclasses.replace(Caller.unknown(why, uid=found.uid), netns=found.netns)
        try:
            caller = self.identifier.identify(conn.peer, conn.local, dst, SocketOwner(found.uid, found.inode))
            if caller.known and caller.pid is not None and side.sockets.netns_of_pid(caller.pid) != found.netns:
                # The holder is not in the namespace the socket was found in: it moved, or the pid was reused.
                caller = Caller.unknown("the socket's holder left the container's network namespace", uid=found.uid)
            elif caller.known:
                caller = self.workload(caller, found.netns)
        except Exception as exc:
            log.exception("identifying the client of a container connection failed")
            caller = Caller.unknown(f"identification failed: {type(exc).__name__}", uid=found.uid)
        return dataclasses.replace(caller, netns=found.netns)

    def workload(self, caller: Caller, netns: int = 0) -> Caller:
        """``caller`` with the container it runs in, as the runtime's state describes it, and its uid inside;
        unchanged when there is no directory, no container the runtimes' layouts name, or /proc cannot be read."""
        if self.directory is None or not caller.known or caller.pid is None:
            return caller
        proc = self.identifier.index.proc
        try:
            with open(f"{proc}/{caller.pid}/cgroup", encoding="utf-8", errors="replace") as fh:
                cgroup = fh.read(65536)
            with open(f"{proc}/{caller.pid}/uid_map", encoding="ascii", errors="replace") as fh:
                uid_map = fh.read(4096)
        except OSError:
            return caller
        info = self.directory.describe(caller.container, cgroup)
        if info is None:
            # procs.py's id came from a path no runtime made (a user can name a cgroup of its own delegated tree
            # after any container): the record must not claim that container.
            return dataclasses.replace(caller, container=None)
        inside = uid_inside(uid_map, caller.uid) if caller.uid is not None else None
        info = dataclasses.replace(info, netns=netns)
        return dataclasses.replace(caller, workload=info, container=info.id, uid_inside=inside)

    def peer_uid(self, conn: Connection) -> Optional[int]:
        """Whose share of the connection slots the peer takes (for admission at accept): the uid of its socket
        (one sock_diag query), or, on the container listener, its source address. Searching the containers'
        namespaces can take milliseconds a namespace, so it happens in the worker, never on the accept thread,
        where one container could hold every other client up. None if not found."""
        key = (conn.peer, conn.local)
        self._seen.pop(key, None)  # an entry left by an earlier connection on this tuple is never reused
        dst = self._dst(conn)
        side = self.containers
        if side is not None and conn.local[1] == side.port:
            return address_share(conn.peer[0])
        try:
            owner = self.identifier.lookup.owner(conn.peer, dst or conn.local)
        except OSError:
            return None
        if len(self._seen) >= SEEN_MAX:
            self._seen.clear()  # entries of connections refused at admission, never identified
        self._seen[key] = (dst, owner)
        return owner.uid if owner is not None else None

    def close(self) -> None:
        """Release the identity lookup's netlink socket."""
        self.identifier.close()


def _show(addr: Optional[Address]) -> str:
    if addr is None:
        return "the listener itself"
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
