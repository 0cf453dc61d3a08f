"""Who gets one of the listener's connection slots: a cap for all, a cap per uid, a reserve for the callers that
matter, and idle keep-alive connections closed first when slots run short.

One local user holding every slot with idle or keep-alive connections used to turn the allowed callers away
with 503 (34 of 38 probes). Now a uid may hold at most ``per_uid`` connections; the last ``reserved`` slots of
``total`` are only for root and the uids the policy names (amazon-ssm-agent's, say), so another user can never
starve them; and when a connection would be refused, an idle keep-alive connection (of the same uid when the
uid is at its cap, else of the uid holding most) is closed to make room instead. A connection in the middle of
sending its request is not idle: slow senders are bounded by the per-uid cap and the request timeout.
"""

from __future__ import annotations

import select
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..identity.caller import share_owner as owner

Uid = Optional[int]  # None: the peer's uid could not be found (all such connections count as one user)


@dataclass(eq=False)
class Slot:
    """One admitted connection's place."""

    uid: Uid
    sock: socket.socket
    favoured: bool = False  # root or a uid the policy names: only their own kind may close their idle connections
    idle: bool = False
    released: bool = False
    since: float = field(default=0.0)


class Admission:
    """Thread-safe slot accounting for one listener."""

    def __init__(
        self,
        total: int,
        per_uid: int,
        reserved: int,
        privileged: Callable[[], frozenset[int]] = frozenset,
        clock: Callable[[], float] = lambda: 0.0,
    ):
        self.total = total
        self.per_uid = per_uid
        self.reserved = min(reserved, total)
        self.privileged = privileged
        self.clock = clock
        self._lock = threading.Lock()
        self._slots: set[Slot] = set()
        self._by_uid: Counter[Uid] = Counter()
        self.evictions = 0

    def admit(self, uid: Uid, sock: socket.socket) -> tuple[Optional[Slot], str]:
        """A slot for a new connection of ``uid``, or None and why not. May close an idle connection for it."""
        with self._lock:
            if self._by_uid[uid] >= self.per_uid and not self._evict(lambda s: s.uid == uid, lambda s: True):
                who = owner(uid) if uid is not None else "unidentified peers"
                return None, f"{who} already holds {self.per_uid} connections (listen.max_connections_per_uid)"
            favoured = uid == 0 or (uid is not None and uid in self.privileged())
            limit = self.total if favoured else self.total - self.reserved
            evictable = (lambda s: True) if favoured else (lambda s: not s.favoured)
            if len(self._slots) >= limit and not self._evict(self._from_the_busiest(), evictable, fallback=True):
                if limit < self.total:
                    return None, "too many connections (the rest are reserved for root and the uids the policy names)"
                return None, "too many connections"
            slot = Slot(uid, sock, favoured, since=self.clock())
            self._slots.add(slot)
            self._by_uid[uid] += 1
            return slot, ""

    def idle(self, slot: Slot, idle: bool) -> None:
        """Mark a connection as waiting for its next request (evictable) or as serving one (not evictable)."""
        with self._lock:
            slot.idle = idle
            if idle:
                slot.since = self.clock()

    def close_idle(self) -> int:
        """Shut down every idle connection (the agent is stopping); how many."""
        with self._lock:
            idle = [s for s in self._slots if s.idle]
        for slot in idle:
            try:
                slot.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(idle)

    def release(self, slot: Slot) -> None:
        """Give a slot back (the connection ended); a second release of the same slot does nothing."""
        with self._lock:
            self._release(slot)

    def count(self, uid: Uid = None) -> int:
        """Connections held in all (or by ``uid``)."""
        with self._lock:
            return len(self._slots) if uid is None else self._by_uid[uid]

    def _release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self._slots.discard(slot)
        self._by_uid[slot.uid] -= 1
        if self._by_uid[slot.uid] <= 0:
            del self._by_uid[slot.uid]

    def _from_the_busiest(self) -> Callable[[Slot], bool]:
        busiest = max(self._by_uid, key=lambda u: self._by_uid[u], default=None)
        return lambda s: s.uid == busiest

    def _evict(self, prefer: Callable[[Slot], bool], allowed: Callable[[Slot], bool], fallback: bool = False) -> bool:
        """Close the longest-idle connection that ``prefer`` picks (else, with ``fallback``, any idle one) among
        those ``allowed`` (an ordinary uid never closes root's or a named uid's); its slot is free at once, its
        worker notices the close. A connection whose next request has already arrived is not idle. Whether one
        was closed."""
        idle = [s for s in self._slots if s.idle and allowed(s) and not _has_data(s.sock)]
        chosen = [s for s in idle if prefer(s)] or (idle if fallback else [])
        if not chosen:
            return False
        victim = min(chosen, key=lambda s: s.since)
        try:
            victim.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._release(victim)
        self.evictions += 1
        return True


def _has_data(sock: socket.socket) -> bool:
    """Whether something has arrived on an idle connection that its worker has not read yet (a request, or the
    client's close). A zero-timeout select: a peek would wait out the socket's own timeout."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError, TypeError):
        return False
