"""A small cache of metadata answers for tokenless (IMDSv1) requests the agent forwards with its own token.

Why: every IMDSv1 caller costs an upstream round trip, and the link-local service throttles at 1024 packets a
second per interface, where throttling shows as timeouts. Concurrent identical requests are coalesced into one
upstream request (single flight per path); answers of paths that do not change while the instance runs are kept
for ``static_ttl``; role credentials for ``credentials_ttl`` at most and never past their Expiration minus the
SDKs' refresh window. Anything else (spot and scheduled events, tags, network interfaces, lifecycle states) is
never cached. Only 200 answers are kept.

The policy is applied before the cache is asked, exactly as before a forward (the cache sits behind the gate),
and requests carrying the client's own token never use it: their token is the upstream's to judge.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from typing import Callable

from ..policy.paths import MetadataPath
from .upstream import UpstreamResponse

# Paths whose answers are fixed for the instance's life (or until a stop/start, after which the agent restarts).
STATIC_PREFIXES = (
    "meta-data/ami-id", "meta-data/ami-launch-index", "meta-data/ami-manifest-path", "meta-data/hostname",
    "meta-data/instance-id", "meta-data/instance-type", "meta-data/kernel-id", "meta-data/local-hostname",
    "meta-data/local-ipv4", "meta-data/mac", "meta-data/placement", "meta-data/product-codes",
    "meta-data/ramdisk-id", "meta-data/reservation-id", "meta-data/services", "dynamic/instance-identity",
)  # fmt: skip
CREDENTIALS_PREFIX = "meta-data/iam/security-credentials/"
SDK_REFRESH_WINDOW = 300.0  # the SDKs refresh credentials this long before they expire: never serve them later
MAX_ENTRIES = 1024


class ResponseCache:
    """Thread-safe; keyed by the exact target forwarded (the normalized path, no query)."""

    def __init__(
        self,
        static_ttl: float = 300.0,
        credentials_ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.static_ttl = static_ttl
        self.credentials_ttl = credentials_ttl
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, UpstreamResponse]] = {}
        self._flights: dict[str, threading.Event] = {}
        self.hits = self.misses = 0

    def cacheable(self, path: MetadataPath) -> bool:
        """Whether answers for ``path`` may be kept at all."""
        if path.query is not None or path.sensitive not in (None, "credentials"):
            return False
        if path.sensitive == "credentials":
            return (path.path + "/").startswith(CREDENTIALS_PREFIX) and path.path != CREDENTIALS_PREFIX[:-1]
        return any(path.path == p or path.path.startswith(p + "/") for p in STATIC_PREFIXES)

    def fetch(self, target: str, path: MetadataPath, forward: Callable[[], UpstreamResponse]) -> tuple[
            UpstreamResponse, bool]:  # fmt: skip
        """The answer for ``target`` from the cache, or from ``forward`` (one caller at a time per target, the
        others wait for it and share its answer when it can be kept). Returns (answer, whether it was a hit)."""
        while True:
            with self._lock:
                entry = self._entries.get(target)
                if entry is not None and self.clock() < entry[0]:
                    self.hits += 1
                    return entry[1], True
                flight = self._flights.get(target)
                if flight is None:
                    flight = self._flights[target] = threading.Event()
                    leader = True
                else:
                    leader = False
            if not leader:
                flight.wait(5.0)
                with self._lock:
                    entry = self._entries.get(target)
                    if entry is not None and self.clock() < entry[0]:
                        self.hits += 1
                        return entry[1], True
                # The leader's answer could not be kept (an error, a non-200): ask on our own.
                with self._lock:
                    self.misses += 1
                return forward(), False
            try:
                resp = forward()
                ttl = self._ttl(path, resp)
                with self._lock:
                    self.misses += 1
                    if ttl > 0:
                        if len(self._entries) >= MAX_ENTRIES:
                            self._entries.clear()
                        self._entries[target] = (self.clock() + ttl, resp)
                return resp, False
            finally:
                with self._lock:
                    self._flights.pop(target, None)
                flight.set()

    def _ttl(self, path: MetadataPath, resp: UpstreamResponse) -> float:
        if resp.status != 200:
            return 0.0
        if path.sensitive != "credentials":
            return self.static_ttl
        try:
            expiration = json.loads(resp.body)["Expiration"]
            expires = datetime.fromisoformat(str(expiration).replace("Z", "+00:00")).timestamp()
        except (ValueError, KeyError, TypeError):
            return 0.0  # not a credentials document (a role listing, an error): not kept
        return max(0.0, min(self.credentials_ttl, expires - SDK_REFRESH_WINDOW - self.wall()))
