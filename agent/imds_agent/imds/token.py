"""The agent's one IMDSv2 session token: cached, refreshed ahead of expiry, fetched by one thread at a time.

Single flight both ways: while a token is still valid but inside the refresh margin, exactly one thread
refreshes it and every other thread keeps using the valid one; when there is no valid token, one thread fetches
and the rest wait for that same fetch and share its result, success or failure, so a burst of requests at
expiry costs the metadata service one PUT. The token value is never logged.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..errors import TokenError, UpstreamError
from .protocol import TOKEN_PATH, TTL_HEADER
from .upstream import Upstream

log = logging.getLogger(__name__)

# After a failed background refresh (the old token still valid), wait this long before trying again so that a
# struggling metadata service is not asked on every request.
REFRESH_BACKOFF = 5.0


@dataclass(frozen=True)
class FetchedToken:
    """A token as the metadata service issued it; its repr leaves the value out, so no log line can carry it."""

    value: str = field(repr=False)
    ttl: int


@dataclass(frozen=True)
class _Cached:
    value: str = field(repr=False)
    refresh_at: float
    expires_at: float


class _Flight:
    """One fetch in progress that other threads can wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Optional[str] = None
        self.error: Optional[UpstreamError] = None


def fetch_from(upstream: Upstream) -> Callable[[int], FetchedToken]:
    """A fetch function that asks ``upstream`` for a token with the given TTL."""

    def fetch(ttl: int) -> FetchedToken:
        resp = upstream.request("PUT", TOKEN_PATH, [(TTL_HEADER, str(ttl))])
        if resp.status != 200:
            raise TokenError(f"token request to {upstream.netloc} answered {resp.status} {resp.reason}".rstrip())
        value = resp.body.decode("ascii", "replace").strip()
        if not value:
            raise TokenError(f"token request to {upstream.netloc} returned an empty token")
        granted = ttl
        for name, header in resp.headers:
            if name.lower() == TTL_HEADER.lower():
                try:
                    granted = min(ttl, int(header))
                except ValueError:
                    pass
        return FetchedToken(value=value, ttl=granted)

    return fetch


class TokenCache:
    """Hands out a valid IMDSv2 token, fetching or refreshing it as needed."""

    def __init__(
        self,
        fetch: Callable[[int], FetchedToken],
        ttl: int,
        refresh_margin: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._fetch = fetch
        self._ttl = ttl
        self._margin = refresh_margin
        self._clock = clock
        self._lock = threading.Lock()
        self._token: Optional[_Cached] = None
        self._flight: Optional[_Flight] = None
        self._retry_after = 0.0
        self.fetches = 0  # how many token PUTs were sent; read by metrics and tests

    def expires_at(self) -> Optional[float]:
        """Wall-clock time the cached token expires, or None without one (for status and metrics)."""
        with self._lock:
            cached = self._token
        if cached is None:
            return None
        return time.time() + (cached.expires_at - self._clock())

    def get(self, wait: float = 30.0) -> str:
        """Return a valid token; raise TokenError (or UpstreamError) when none can be had."""
        with self._lock:
            now = self._clock()
            cached = self._token
            if cached is not None and now < cached.expires_at:
                if now < cached.refresh_at or self._flight is not None or now < self._retry_after:
                    return cached.value
                flight = self._flight = _Flight()
                mine = True
            elif self._flight is None:
                flight = self._flight = _Flight()
                mine = True
            else:
                flight = self._flight
                mine = False
        if not mine:
            if not flight.done.wait(wait):
                raise TokenError("timed out waiting for the token request in progress", 504)
            if flight.error is not None:
                raise flight.error
            assert flight.value is not None
            return flight.value
        return self._run(flight, cached)

    def _run(self, flight: _Flight, previous: Optional[_Cached]) -> str:
        started = self._clock()
        try:
            self.fetches += 1
            fetched = self._fetch(self._ttl)
        except UpstreamError as exc:
            error = exc if isinstance(exc, TokenError) else TokenError(f"cannot get a token: {exc}", exc.status)
            with self._lock:
                self._flight = None
                self._retry_after = self._clock() + REFRESH_BACKOFF
                still_valid = previous is not None and self._clock() < previous.expires_at
            flight.error = error
            flight.done.set()
            if still_valid and previous is not None:
                log.warning("token refresh failed, using the current token until it expires: %s", error)
                return previous.value
            log.error("token fetch failed and no valid session remains: %s", error)
            raise error from None
        # Count the lifetime from before the request was sent, so the cache never outlives the real token.
        margin = min(self._margin, max(fetched.ttl - 1, 0))
        cached = _Cached(fetched.value, started + fetched.ttl - margin, started + fetched.ttl)
        with self._lock:
            self._token = cached
            self._flight = None
            self._retry_after = 0.0
        flight.value = cached.value
        flight.done.set()
        log.info("token fetched, ttl %ss", fetched.ttl)
        return cached.value

    def invalidate(self, value: str) -> None:
        """Forget ``value`` if it is still the cached token (the metadata service rejected it).

        Comparing the value means a burst of 401s for one stale token causes one refresh, not one per request.
        """
        with self._lock:
            if self._token is not None and self._token.value == value:
                log.info("upstream answered 401 to the agent's session token; token cache cleared")
                self._token = None
                self._retry_after = 0.0
