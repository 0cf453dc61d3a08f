"""The server's ``identify`` hook: an accepted connection becomes a typed Client, looked up once per connection.

The original destination comes from conntrack (what the client dialled before the redirect), then the identity
lookup finds the process behind the peer socket. A lookup that fails for any reason gives an unidentified Caller
with that reason; it never raises into the server.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Protocol

from ..identity.caller import Caller
from ..identity.resolver import Identifier
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
        # What admission learnt at accept (the original destination, the socket's owner), handed to the
        # identification of the same connection so that neither is asked of the kernel twice.
        self._seen: dict[tuple[Address, Address], tuple[Optional[Address], Optional[SocketOwner]]] = {}

    def __call__(self, conn: Connection) -> Client:
        seen = self._seen.pop((conn.peer, conn.local), None)
        if self.attest is not None:
            return self._attested(conn, self.attest, seen[1] if seen is not None else None)
        dst, owner = seen if seen is not None else (self._dst(conn), None)
        started = time.monotonic()
        try:
            caller = self.identifier.identify(conn.peer, conn.local, dst, owner)
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

    def peer_uid(self, conn: Connection) -> Optional[int]:
        """The uid of the peer's socket (one sock_diag query, for admission at accept); None if not found."""
        dst = self._dst(conn)
        try:
            owner = self.identifier.lookup.owner(conn.peer, dst or conn.local)
        except OSError:
            return None
        if len(self._seen) >= SEEN_MAX:
            self._seen.clear()  # entries of connections refused at admission, never identified
        self._seen[(conn.peer, conn.local)] = (dst, owner)
        return owner.uid if owner is not None else None

    def close(self) -> None:
        """Release the identity lookup's netlink socket."""
        self.identifier.close()
