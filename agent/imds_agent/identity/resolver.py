"""Who is on the other end of an accepted connection: socket lookup, then pid, then the process's description.

Every step can fail for legitimate reasons (the client already closed, the process exited, its /proc entry is
unreadable); each failure gives an ``unknown`` Caller with the reason, never a guess. The result is taken once
per TCP connection and reused for its keep-alive requests.

Each identification has a time budget (``budget`` seconds, well under the SDKs' 1 s timeout): past it the caller
is unidentified with that reason, so a user who makes lookups slow (connect+close floods, processes holding
100k descriptors) costs its own connections their identity and nobody else's time. What identification costs is
counted per uid, budget overruns included.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .caller import Caller
from .procs import OverBudget, ProcessIndex, current_comm, holds_socket
from .sockets import SocketLookup, SocketOwner

log = logging.getLogger(__name__)


OVER_BUDGET = "identification exceeded its budget"
DEFAULT_BUDGET = 0.25
MAX_UIDS = 4096  # cost accounts kept; past it the cheapest is forgotten


@dataclass
class UidCost:
    """What identifying one uid's connections has cost since the agent started."""

    lookups: int = 0
    seconds: float = 0.0
    over_budget: int = 0


class Identifier:
    """Resolves connections to Callers; thread-safe, shared by all connection threads."""

    def __init__(
        self,
        lookup: Optional[SocketLookup] = None,
        index: Optional[ProcessIndex] = None,
        budget: float = DEFAULT_BUDGET,
    ):
        self.lookup = lookup or SocketLookup()
        self.index = index or ProcessIndex()
        self.budget = budget
        self.last_cost = 0.0
        self._costs: dict[Optional[int], UidCost] = {}
        self._lock = threading.Lock()

    def identify(
        self,
        peer: tuple[str, int],
        local: tuple[str, int],
        original_dst: Optional[tuple[str, int]],
        owner: Optional[SocketOwner] = None,
    ) -> Caller:
        """The Caller whose socket is ``peer`` connected to ``original_dst`` (after DNAT) or ``local`` (direct);
        ``owner`` is the socket's sock_diag answer when the caller already has it (admission asked at accept)."""
        return self._timed(lambda deadline: self._identify(peer, original_dst or local, deadline, owner))

    def identify_attested(
        self, peer: tuple[str, int], local: tuple[str, int], tgid: int, comm: str, owner: Optional[SocketOwner] = None
    ) -> Caller:
        """The Caller the kernel attested at connect time (the ebpf backend's record): process ``tgid``, which
        was running ``comm``. No /proc search: the record names the process. It must still hold the socket and
        still run what it ran when it connected; otherwise it is unidentified with the reason, never a guess."""
        return self._timed(lambda deadline: self._attested(peer, local, tgid, comm, deadline, owner))

    def _timed(self, find: Callable[[float], Caller]) -> Caller:
        """Run one identification under the budget, and account for what it cost its uid."""
        started = time.monotonic()
        caller: Optional[Caller] = None
        try:
            caller = find(started + self.budget)
            return caller
        finally:
            self.last_cost = cost = time.monotonic() - started
            self._account(caller, cost)

    def _attested(
        self,
        peer: tuple[str, int],
        local: tuple[str, int],
        tgid: int,
        comm: str,
        deadline: float,
        owner: Optional[SocketOwner],
    ) -> Caller:
        try:
            owner = owner or self.lookup.owner(peer, local)
        except OSError as exc:
            return Caller.unknown(f"socket lookup failed: {exc.strerror or exc}")
        if owner is None or owner.inode == 0:
            return Caller.unknown("the client closed its socket before it could be identified")
        try:
            if not holds_socket(tgid, f"socket:[{owner.inode}]", self.index.proc, deadline):
                return Caller.unknown(f"the process that connected (pid {tgid}) no longer holds the socket",
                                      uid=owner.uid)  # fmt: skip
            now = current_comm(tgid, self.index.proc)
            if now != comm:
                return Caller.unknown(f"the process that connected (pid {tgid}, {comm!r}) has exec'd since",
                                      uid=owner.uid)  # fmt: skip
            return self._described(tgid, owner, deadline)
        except OverBudget:
            return self._over_budget(owner.uid)

    def costs(self) -> dict[Optional[int], UidCost]:
        """A snapshot of the cost accounts by uid (None: the socket's uid was not found)."""
        with self._lock:
            return {uid: dataclasses.replace(c) for uid, c in self._costs.items()}

    def _account(self, caller: Optional[Caller], cost: float) -> None:
        uid = caller.uid if caller is not None else None
        over = caller is not None and caller.reason.startswith(OVER_BUDGET)
        with self._lock:
            account = self._costs.get(uid)
            if account is None:
                if len(self._costs) >= MAX_UIDS:
                    del self._costs[min(self._costs, key=lambda k: self._costs[k].seconds)]
                account = self._costs[uid] = UidCost()
            account.lookups += 1
            account.seconds += cost
            account.over_budget += over

    def _over_budget(self, uid: Optional[int]) -> Caller:
        return Caller.unknown(f"{OVER_BUDGET} of {self.budget * 1000:.0f} ms", uid=uid)

    def _identify(
        self, peer: tuple[str, int], dialled: tuple[str, int], deadline: float, owner: Optional[SocketOwner]
    ) -> Caller:
        try:
            owner = owner or self.lookup.owner(peer, dialled)
        except OSError as exc:
            log.warning("socket lookup failed: %s", exc)
            return Caller.unknown(f"socket lookup failed: {exc.strerror or exc}")
        if owner is None:
            return Caller.unknown("the client's socket was not found (not local, or already closed)")
        if owner.inode == 0:
            # Closed by its process already (an orphan, or in TIME_WAIT): no process holds it, and searching
            # /proc for inode 0 would walk every descriptor on the host. A connect+close flood lands here.
            return Caller.unknown("the client closed its socket before it could be identified", uid=owner.uid)
        try:
            pid = self.index.find_pid(owner.inode, owner.uid, deadline)
            if pid is None:
                return Caller.unknown(f"no readable process holds socket {owner.inode}", uid=owner.uid)
            return self._described(pid, owner, deadline)
        except OverBudget:
            return self._over_budget(owner.uid)

    def _described(self, pid: int, owner: SocketOwner, deadline: float) -> Caller:
        """The Caller for ``pid``, with the other holders of the socket for a non-root owner. Root's sockets are
        not checked: root can read anything the agent could withhold."""
        caller = self.index.describe(pid)
        if caller.known and owner.uid:
            return self._with_sharers(caller, owner.inode, owner.uid, deadline)
        return caller

    def _with_sharers(self, caller: Caller, inode: int, uid: int, deadline: float) -> Caller:
        """``caller`` with the other processes of its uid that hold the same socket while running something else:
        one of them may write the request and read the answer while another lends its identity."""
        if caller.pid is None:
            return caller
        sharers = []
        for other_pid in self.index.holders(caller.pid, inode, uid, deadline):
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
