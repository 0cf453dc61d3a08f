"""Who is on the other end of an accepted connection: socket lookup, then pid, then the process's description.

Every step can fail for legitimate reasons (the client already closed, the process exited, its /proc entry is
unreadable); each failure gives an ``unknown`` Caller with the reason, never a guess. The result is taken once
per TCP connection and reused for its keep-alive requests.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional

from .caller import Caller
from .procs import ProcessIndex
from .sockets import SocketLookup

log = logging.getLogger(__name__)


class Identifier:
    """Resolves connections to Callers; thread-safe, shared by all connection threads."""

    def __init__(self, lookup: Optional[SocketLookup] = None, index: Optional[ProcessIndex] = None):
        self.lookup = lookup or SocketLookup()
        self.index = index or ProcessIndex()
        self.last_cost = 0.0

    def identify(
        self, peer: tuple[str, int], local: tuple[str, int], original_dst: Optional[tuple[str, int]]
    ) -> Caller:
        """The Caller whose socket is ``peer`` connected to ``original_dst`` (after DNAT) or ``local`` (direct)."""
        started = time.perf_counter()
        try:
            return self._identify(peer, original_dst or local)
        finally:
            self.last_cost = time.perf_counter() - started

    def _identify(self, peer: tuple[str, int], dialled: tuple[str, int]) -> Caller:
        try:
            owner = self.lookup.owner(peer, dialled)
        except OSError as exc:
            log.warning("socket lookup failed: %s", exc)
            return Caller.unknown(f"socket lookup failed: {exc.strerror or exc}")
        if owner is None:
            return Caller.unknown("the client's socket was not found (not local, or already closed)")
        pid = self.index.find_pid(owner.inode, owner.uid)
        if pid is None:
            return Caller.unknown(f"no readable process holds socket {owner.inode}", uid=owner.uid)
        caller = self.index.describe(pid)
        if caller.known and owner.uid:
            # Root's sockets are not checked: root can read anything the agent could withhold.
            return self._with_sharers(caller, owner.inode, owner.uid)
        return caller

    def _with_sharers(self, caller: Caller, inode: int, uid: int) -> Caller:
        """``caller`` with the related processes that hold the same socket while running something else: one of
        them may write the request and read the answer while another lends its identity."""
        if caller.pid is None:
            return caller
        sharers = []
        for other_pid in self.index.relatives_holding(caller.pid, inode, uid):
            other = self.index.describe(other_pid)
            if not other.known:
                if not os.path.exists(f"{self.index.proc}/{other_pid}"):
                    continue  # it has exited since: it can no longer read the answer
                return Caller.unknown(f"socket shared with an unidentifiable process: {other.reason}", uid=uid)
            if (other.exe, other.uid, other.exe_verified) != (caller.exe, caller.uid, caller.exe_verified):
                sharers.append(other)
        return dataclasses.replace(caller, sharers=tuple(sharers)) if sharers else caller

    def close(self) -> None:
        """Release the netlink socket."""
        self.lookup.close()
