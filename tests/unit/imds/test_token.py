from __future__ import annotations

import threading
import time

import pytest

from imds_agent.errors import TokenError, UpstreamError
from imds_agent.imds.token import FetchedToken, TokenCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Fetcher:
    """Issues tok-1, tok-2, ...; can be told to fail or to block until released."""

    def __init__(self, ttl: int | None = None) -> None:
        self.calls = 0
        self.fail: UpstreamError | None = None
        self.gate: threading.Event | None = None
        self.ttl = ttl
        self.lock = threading.Lock()

    def __call__(self, ttl: int) -> FetchedToken:
        with self.lock:
            self.calls += 1
            n = self.calls
        if self.gate is not None:
            assert self.gate.wait(5)
        if self.fail is not None:
            raise self.fail
        return FetchedToken(f"tok-{n}", self.ttl or ttl)


def test_fetches_once_and_caches() -> None:
    fetch, clock = Fetcher(), Clock()
    cache = TokenCache(fetch, ttl=600, refresh_margin=60, clock=clock)
    assert cache.get() == "tok-1"
    clock.now += 500
    assert cache.get() == "tok-1"
    assert fetch.calls == 1


def test_refreshes_inside_margin_and_expires() -> None:
    fetch, clock = Fetcher(), Clock()
    cache = TokenCache(fetch, ttl=600, refresh_margin=60, clock=clock)
    cache.get()
    clock.now += 541  # inside the margin
    assert cache.get() == "tok-2"
    clock.now += 1000  # far past expiry
    assert cache.get() == "tok-3"


def test_server_granted_ttl_is_honoured() -> None:
    fetch, clock = Fetcher(ttl=100), Clock()
    cache = TokenCache(fetch, ttl=600, refresh_margin=10, clock=clock)
    cache.get()
    clock.now += 95
    assert cache.get() == "tok-2"


def test_concurrent_expiry_causes_exactly_one_fetch() -> None:
    fetch = Fetcher()
    cache = TokenCache(fetch, ttl=600, refresh_margin=60)
    fetch.gate = threading.Event()
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get())) for _ in range(50)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    fetch.gate.set()
    for t in threads:
        t.join(5)
    assert fetch.calls == 1
    assert results == ["tok-1"] * 50


def test_refresh_in_margin_others_keep_valid_token() -> None:
    fetch, clock = Fetcher(), Clock()
    cache = TokenCache(fetch, ttl=600, refresh_margin=60, clock=clock)
    cache.get()
    clock.now += 550
    fetch.gate = threading.Event()
    refresher = threading.Thread(target=cache.get)
    refresher.start()
    time.sleep(0.05)
    # While one thread refreshes, everyone else gets the still-valid token at once.
    assert [cache.get() for _ in range(20)] == ["tok-1"] * 20
    fetch.gate.set()
    refresher.join(5)
    assert cache.get() == "tok-2"
    assert fetch.calls == 2


def test_failed_fetch_is_shared_by_waiters() -> None:
    fetch = Fetcher()
    fetch.fail = UpstreamError("metadata service unreachable: Connection refused", 502)
    fetch.gate = threading.Event()
    cache = TokenCache(fetch, ttl=600, refresh_margin=60)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            cache.get()
        except UpstreamError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    fetch.gate.set()
    for t in threads:
        t.join(5)
    assert fetch.calls == 1
    assert len(errors) == 10
    assert all(isinstance(e, TokenError) and "Connection refused" in str(e) and e.status == 502 for e in errors)


def test_failed_refresh_keeps_valid_token_and_backs_off() -> None:
    fetch, clock = Fetcher(), Clock()
    cache = TokenCache(fetch, ttl=600, refresh_margin=60, clock=clock)
    cache.get()
    clock.now += 550
    fetch.fail = UpstreamError("down", 502)
    assert cache.get() == "tok-1"
    assert cache.get() == "tok-1"
    assert fetch.calls == 2  # the second call was inside the back-off
    clock.now += 51  # past expiry: no valid token left, the error surfaces
    with pytest.raises(TokenError):
        cache.get()


def test_invalidate_only_drops_the_named_token() -> None:
    fetch = Fetcher()
    cache = TokenCache(fetch, ttl=600, refresh_margin=60)
    assert cache.get() == "tok-1"
    cache.invalidate("tok-1")
    assert cache.get() == "tok-2"
    cache.invalidate("tok-1")  # a late 401 for the old token must not throw away the new one
    assert cache.get() == "tok-2"
    assert fetch.calls == 2


def test_token_reprs_leave_the_value_out() -> None:
    fetched = FetchedToken("AQAEA-secret-value", 60)
    assert "AQAEA-secret-value" not in repr(fetched) and "60" in repr(fetched)
