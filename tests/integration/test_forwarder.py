"""The agent in-process on loopback against the emulator with IMDSv1 disabled (tokens required).

No kernel rules here: clients talk to the agent's listener directly. What is checked is what the metadata service
saw (the emulator's counters) and what the client got.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import pytest

from imds_agent.config import (
    AuditConfig,
    CacheConfig,
    Config,
    ListenConfig,
    PolicyConfig,
    RedirectConfig,
    TokenConfig,
    UpstreamConfig,
)
from imds_agent.daemon import Agent
from imds_agent.sandbox.emulator import Emulator

CREDS = "/latest/meta-data/iam/security-credentials/"


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator(tokens="required", addresses=[("127.0.0.1", 0)])
    emu.start()
    try:
        yield emu
    finally:
        emu.stop()


def scratch() -> dict[str, Any]:
    """Audit log, inventory and policy in a throwaway directory, never the host's /var."""
    work = tempfile.mkdtemp(prefix="imds-agent-test-")
    return {
        "audit": AuditConfig(log=f"{work}/audit.jsonl", state_dir=f"{work}/state"),
        "policy": PolicyConfig(dir=f"{work}/policy.d"),
        # These tests are about what reaches the metadata service: the cache would answer for it.
        "cache": CacheConfig(enabled=False),
    }


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def make_agent(emu: Emulator, **token: int) -> Agent:
    port = emu.addresses[0][1]
    config = Config(
        user=str(os.getuid()),
        listen=ListenConfig(port=0, addresses=("127.0.0.1", "::1"), idle_timeout=0.5, request_timeout=0.5),
        upstream=UpstreamConfig(ipv4="127.0.0.1", port=port, connect_timeout=0.5, read_timeout=1.0),
        redirect=RedirectConfig(enabled=False),
        **scratch(),
    )
    if token:
        config = replace(config, token=TokenConfig(**token))
    agent = Agent(config)
    agent.start()
    return agent


@pytest.fixture
def agent(emulator: Emulator) -> Iterator[Agent]:
    a = make_agent(emulator)
    try:
        yield a
    finally:
        a.stop()


def get(
    agent: Agent, path: str, headers: Optional[dict[str, str]] = None, method: str = "GET", v6: bool = False
) -> tuple[int, bytes, http.client.HTTPResponse]:
    host, port = agent.server.addresses[1 if v6 else 0][:2]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp
    finally:
        conn.close()


def test_v1_get_gets_credentials_and_upstream_sees_no_tokenless_request(emulator: Emulator, agent: Agent) -> None:
    status, body, _ = get(agent, CREDS)
    assert status == 200
    role = body.decode().strip()
    status, body, _ = get(agent, CREDS + role, v6=True)
    assert status == 200
    creds = json.loads(body)
    assert creds["Code"] == "Success" and creds["AccessKeyId"] and creds["SecretAccessKey"] and creds["Token"]
    counters = emulator.counters()
    assert counters["tokenless"] == 0
    assert counters["token_puts"] == 1  # one token for both requests
    assert counters["with_token"] == 2


def test_v1_head_has_no_body(emulator: Emulator, agent: Agent) -> None:
    status, body, resp = get(agent, "/latest/meta-data/instance-id", method="HEAD")
    assert status == 200 and body == b"" and int(resp.headers["Content-Length"]) > 0
    assert emulator.counters()["tokenless"] == 0


def test_client_token_put_and_get_pass_through_untouched(emulator: Emulator, agent: Agent) -> None:
    status, token, resp = get(agent, "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, "PUT")
    assert status == 200 and resp.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "60"
    status, body, _ = get(agent, "/latest/meta-data/instance-id", {"x-aws-EC2-metadata-token": token.decode()})
    assert status == 200 and body.startswith(b"i-")
    counters = emulator.counters()
    assert counters["token_puts"] == 1  # the client's own; the agent fetched none
    # A client token the service rejects is not replaced by the agent's: the client gets the 401.
    status, _, _ = get(agent, "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": "forged"})
    assert status == 401
    assert emulator.counters()["token_puts"] == 1


def test_token_header_without_space_after_colon_is_recognised(emulator: Emulator, agent: Agent) -> None:
    host, port = agent.server.addresses[0][:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-AWS-EC2-METADATA-TOKEN:bogus\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 401")
    assert emulator.counters()["token_puts"] == 0


def test_token_put_without_ttl_gets_the_services_400(emulator: Emulator, agent: Agent) -> None:
    status, _, _ = get(agent, "/latest/api/token", {}, "PUT")
    assert status == 400


def test_token_put_with_x_forwarded_for_is_refused(emulator: Emulator, agent: Agent) -> None:
    headers = {"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "203.0.113.9"}
    status, body, _ = get(agent, "/latest/api/token", headers, "PUT")
    assert status == 403 and b"X-Forwarded-For" in body
    assert emulator.counters()["token_puts"] == 0


def test_relayed_tokenless_request_gets_no_token(emulator: Emulator, agent: Agent) -> None:
    status, _, _ = get(agent, CREDS, {"Via": "1.1 squid"})
    assert status == 401  # forwarded without a token, so the service refuses it
    assert emulator.counters()["token_puts"] == 0


def test_other_methods_are_405(emulator: Emulator, agent: Agent) -> None:
    for method in ("POST", "DELETE", "PATCH"):
        status, _, _ = get(agent, "/latest/meta-data/", method=method)
        assert status == 405
    assert emulator.counters()["requests"] == 0


def fire(agent: Agent, n: int) -> list[int]:
    barrier = threading.Barrier(n)
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        host, port = agent.server.addresses[0][:2]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.connect()
        barrier.wait()
        conn.request("GET", "/latest/meta-data/instance-id")
        status = conn.getresponse().status
        conn.close()
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return statuses


def test_50_concurrent_requests_at_expiry_cause_one_token_put(emulator: Emulator) -> None:
    agent = make_agent(emulator, ttl=60, refresh_margin=0)
    clock = FakeClock()
    agent.tokens._clock = clock  # the cache's own clock: expiry without waiting for it
    try:
        assert get(agent, "/latest/meta-data/instance-id")[0] == 200
        clock.now += 61  # the cached token has expired
        emulator.reset()
        statuses = fire(agent, 50)
        assert statuses == [200] * 50
        counters = emulator.counters()
        assert counters["token_puts"] == 1 and counters["tokenless"] == 0 and counters["unauthorized"] == 0
    finally:
        agent.stop()


def test_refresh_ahead_of_expiry_is_single_flight_and_nobody_waits_for_it(emulator: Emulator) -> None:
    agent = make_agent(emulator, ttl=30, refresh_margin=29)
    clock = FakeClock()
    agent.tokens._clock = clock
    try:
        assert get(agent, "/latest/meta-data/instance-id")[0] == 200
        clock.now += 1.1  # inside the refresh window, token still valid
        emulator.reset()
        emulator.set_faults(put_delay=0.5)  # a slow refresh must not hold the others up
        started = time.monotonic()
        statuses = fire(agent, 50)
        elapsed = time.monotonic() - started
        assert statuses == [200] * 50
        assert emulator.counters()["token_puts"] == 1
        assert elapsed < 5
    finally:
        agent.stop()


def test_upstream_401_refreshes_once_and_retries_once(emulator: Emulator, agent: Agent) -> None:
    assert get(agent, "/latest/meta-data/instance-id")[0] == 200
    emulator.reset()
    emulator.invalidate_tokens()
    status, body, _ = get(agent, "/latest/meta-data/instance-id")
    assert status == 200 and body.startswith(b"i-")
    counters = emulator.counters()
    assert counters["unauthorized"] == 1 and counters["token_puts"] == 1 and counters["requests"] == 2


def test_token_fetch_failure_is_502_naming_the_cause(emulator: Emulator, agent: Agent) -> None:
    emulator.set_faults(put_status=500)
    status, body, _ = get(agent, "/latest/meta-data/instance-id")
    assert status == 502 and b"token" in body.lower() and b"500" in body
    emulator.reset()
    assert get(agent, "/latest/meta-data/instance-id")[0] == 200


def test_upstream_down_is_502_and_the_agent_recovers(emulator: Emulator) -> None:
    agent = make_agent(emulator)
    try:
        assert get(agent, "/latest/meta-data/instance-id")[0] == 200
        emulator.set_faults(drop=True)
        status, body, _ = get(agent, "/latest/meta-data/instance-id")
        assert status == 502 and b"imds-agent" in body
        emulator.reset()
        assert get(agent, "/latest/meta-data/instance-id")[0] == 200
    finally:
        agent.stop()


def test_upstream_unreachable_is_502_naming_the_address() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Config(
        user=str(os.getuid()),
        listen=ListenConfig(port=0, addresses=("127.0.0.1",)),
        upstream=UpstreamConfig(ipv4="127.0.0.1", port=port, connect_timeout=0.5, read_timeout=0.5),
        redirect=RedirectConfig(enabled=False),
        **scratch(),
    )
    agent = Agent(config)
    agent.start()
    try:
        status, body, _ = get(agent, "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": "t"})
        assert status == 502 and f"127.0.0.1:{port}".encode() in body
    finally:
        agent.stop()


def test_slow_upstream_is_504_and_the_agent_keeps_serving(emulator: Emulator, agent: Agent) -> None:
    assert get(agent, "/latest/meta-data/instance-id")[0] == 200
    emulator.set_faults(get_delay=1.3)
    status, body, _ = get(agent, "/latest/meta-data/instance-id")
    assert status == 504 and b"did not answer within 1.0s" in body
    emulator.set_faults(get_delay=0)
    time.sleep(0.35)  # let the emulator finish the delayed answer nobody waits for
    assert get(agent, "/latest/meta-data/instance-id")[0] == 200


def raw(agent: Agent, data: bytes, pause: float = 0.0, tail: bytes = b"") -> bytes:
    host, port = agent.server.addresses[0][:2]
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(data)
        if pause:
            time.sleep(pause)
            try:
                sock.sendall(tail)
            except OSError:
                pass
        chunks: list[bytes] = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", b"431"),
        (b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"400"),
        (b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
        (b"GET /latest/meta-data/ HTTP/9.9\r\nHost: x\r\n\r\n", b"505"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), b"400"),  # at once, not after the timeout
    ],
    ids=["request-line", "header-size", "header-count", "body", "chunked-body", "version", "tls-hello"],
)
def test_malformed_input_is_refused_and_the_agent_carries_on(
    emulator: Emulator, agent: Agent, data: bytes, status: bytes
) -> None:
    reply = raw(agent, data)
    assert reply.split(b" ", 2)[1] == status, reply[:200]
    assert b"connection: close" in reply.lower()
    assert get(agent, "/latest/meta-data/instance-id")[0] == 200


def test_slow_client_gets_408(emulator: Emulator, agent: Agent) -> None:
    started = time.monotonic()
    reply = raw(agent, b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n", pause=0.8, tail=b"\r\n")
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    assert time.monotonic() - started < 2
    assert get(agent, "/latest/meta-data/instance-id")[0] == 200


def test_keep_alive_serves_several_requests_and_idle_connections_are_closed(emulator: Emulator, agent: Agent) -> None:
    host, port = agent.server.addresses[0][:2]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.connect()
    local = conn.sock.getsockname()
    for _ in range(3):
        conn.request("GET", "/latest/meta-data/instance-id")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        assert conn.sock.getsockname() == local  # same TCP connection
    time.sleep(0.8)  # idle_timeout is 0.5 s in this fixture
    assert conn.sock.recv(1) == b""  # the agent closed it
    conn.close()


def test_no_token_or_credential_reaches_the_logs_or_the_audit_record(
    emulator: Emulator, agent: Agent, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued: list[str] = []
    issue = emulator.issue

    def recording_issue(ttl: int) -> str:
        token = issue(ttl)
        issued.append(token)
        return token

    monkeypatch.setattr(emulator, "issue", recording_issue)
    caplog.set_level("DEBUG")
    role = get(agent, CREDS)[1].decode().strip()
    creds = json.loads(get(agent, CREDS + role)[1])  # injected token
    own = get(agent, "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, "PUT")[1].decode()
    assert get(agent, CREDS + role, {"X-aws-ec2-metadata-token": own})[0] == 200  # the client's token
    emulator.invalidate_tokens()
    assert get(agent, CREDS + role)[0] == 200  # 401, refresh, retry: a second injected token
    assert get(agent, CREDS, {"X-aws-ec2-metadata-token": "forged-" + own})[0] == 401
    # A client that puts a secret in the query string: neither the relayed-request warning nor the record of a
    # refused path may repeat it.
    assert get(agent, CREDS + "?leak=" + own, {"Via": "1.1 proxy"})[0] == 401
    assert get(agent, "/latest/meta-data/%2e%2e/%2e%2e/%2e%2e/x?leak=" + own)[0] in (400, 403, 404)
    agent.stop()  # flushes the audit log and the inventory

    assert len(issued) == 3 and own in issued
    secrets = [*issued, creds["SecretAccessKey"], creds["Token"]]
    records = [
        Path(agent.config.audit.log).read_text(),
        *(p.read_text() for p in Path(agent.config.audit.state_dir).iterdir()),
    ]
    # The emulator's own access log is the metadata service's, not the agent's: leave it out.
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("imds_agent.sandbox"))
    assert any(r.levelname == "DEBUG" for r in caplog.records), "nothing at DEBUG: this check would prove nothing"
    for text in [logged, *records]:
        for secret in secrets:
            assert secret not in text
    assert role in records[0]  # the audit record does name the path that was read
    relayed = [json.loads(line) for line in records[0].splitlines() if '"relayed":true' in line]
    assert len(relayed) == 1 and not relayed[0]["injected"] and relayed[0]["decision"] == "would-deny"
