"""The metadata answer cache: what may be kept and for how long, one upstream request for concurrent askers."""

from __future__ import annotations

import json
import threading
import time

from imds_agent.imds.cache import ResponseCache
from imds_agent.imds.upstream import UpstreamResponse
from imds_agent.policy.paths import normalize

OK = UpstreamResponse(200, "OK", [("Content-Length", "6")], b"i-0abc")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_only_answers_that_do_not_change_are_kept() -> None:
    cache = ResponseCache()
    keep = [
        "/latest/meta-data/instance-id",
        "/latest/meta-data/placement/region",
        "/2021-03-23/meta-data/mac",
        "/latest/dynamic/instance-identity/document",
        "/latest/meta-data/iam/security-credentials/role",
    ]
    never = ["/latest/meta-data/spot/instance-action", "/latest/meta-data/events/maintenance/scheduled",
             "/latest/meta-data/tags/instance/Name", "/latest/meta-data/network/interfaces/macs/",
             "/latest/meta-data/autoscaling/target-lifecycle-state", "/latest/user-data",
             "/latest/meta-data/instance-id?x=1",
             "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
             "/latest/meta-data/iam/security-credentials/"]  # fmt: skip
    assert all(cache.cacheable(normalize(p)) for p in keep)
    assert not any(cache.cacheable(normalize(p)) for p in never)


def test_static_answers_expire_after_their_ttl_and_errors_are_never_kept() -> None:
    clock = Clock()
    cache = ResponseCache(static_ttl=60, clock=clock)
    path = normalize("/latest/meta-data/instance-id")
    calls = []

    def forward() -> UpstreamResponse:
        calls.append(1)
        return OK

    assert cache.fetch("/t", path, forward) == (OK, False)
    assert cache.fetch("/t", path, forward) == (OK, True)
    clock.now += 61
    assert cache.fetch("/t", path, forward) == (OK, False) and len(calls) == 2
    not_found = UpstreamResponse(404, "Not Found", [], b"")
    assert cache.fetch("/n", path, lambda: not_found)[1] is False
    assert cache.fetch("/n", path, lambda: not_found)[1] is False  # asked again: a 404 is not kept


def test_credentials_are_kept_briefly_and_never_into_the_sdks_refresh_window() -> None:
    clock, wall = Clock(), Clock()
    wall.now = 1_700_000_000.0
    cache = ResponseCache(credentials_ttl=10, clock=clock, wall=wall)
    path = normalize("/latest/meta-data/iam/security-credentials/role")

    def creds(expires_in: float) -> UpstreamResponse:
        expiration = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall.now + expires_in))
        return UpstreamResponse(200, "OK", [], json.dumps({"Code": "Success", "Expiration": expiration}).encode())

    fresh = creds(3600)
    cache.fetch("/c", path, lambda: fresh)
    clock.now += 9
    assert cache.fetch("/c", path, lambda: fresh)[1] is True
    clock.now += 2  # past credentials_ttl
    assert cache.fetch("/c", path, lambda: fresh)[1] is False
    soon = creds(300 + 4)  # 4 s left before the SDKs' refresh window: kept 4 s at most
    cache.fetch("/s", path, lambda: soon)
    clock.now += 5
    assert cache.fetch("/s", path, lambda: soon)[1] is False
    expiring = creds(120)  # already inside the refresh window: never kept
    cache.fetch("/e", path, lambda: expiring)
    assert cache.fetch("/e", path, lambda: expiring)[1] is False


def test_concurrent_identical_requests_make_one_upstream_request() -> None:
    cache = ResponseCache()
    path = normalize("/latest/meta-data/instance-id")
    calls = []

    def slow() -> UpstreamResponse:
        calls.append(1)
        time.sleep(0.2)
        return OK

    results: list[tuple[UpstreamResponse, bool]] = []
    threads = [threading.Thread(target=lambda: results.append(cache.fetch("/t", path, slow))) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(calls) == 1 and len(results) == 20 and sum(hit for _, hit in results) == 19
