"""The emulator behaves like the metadata service where clients can tell (tokens, TTLs, tree, methods)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Optional

import pytest

from imds_agent.sandbox.control import EmulatorControl
from imds_agent.sandbox.emulator import Emulator

TTL = "X-aws-ec2-metadata-token-ttl-seconds"


@pytest.fixture
def emu() -> Iterator[Emulator]:
    e = Emulator(tokens="required", addresses=[("127.0.0.1", 0), ("::1", 0)], user_data="#!/bin/sh\necho hi\n")
    e.start()
    try:
        yield e
    finally:
        e.stop()


def req(
    emu: Emulator, method: str, path: str, headers: Optional[dict[str, str]] = None, v6: bool = False
) -> tuple[int, str, http.client.HTTPResponse]:
    host, port = emu.addresses[1 if v6 else 0]
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), resp
    finally:
        conn.close()


def token(emu: Emulator, ttl: str = "60") -> str:
    status, body, resp = req(emu, "PUT", "/latest/api/token", {TTL: ttl})
    assert status == 200 and resp.headers[TTL] == ttl
    return body


def test_tokens_required_refuses_v1_and_serves_v2(emu: Emulator) -> None:
    assert req(emu, "GET", "/latest/meta-data/")[0] == 401
    tok = token(emu)
    status, role, resp = req(
        emu, "GET", "/latest/meta-data/iam/security-credentials/", {"x-AWS-ec2-METADATA-token": tok}
    )
    assert status == 200 and resp.headers["Server"] == "EC2ws" and int(resp.headers[TTL]) <= 60
    status, body, _ = req(
        emu, "GET", f"/latest/meta-data/iam/security-credentials/{role}", {"X-aws-ec2-metadata-token": tok}, v6=True
    )
    creds = json.loads(body)
    assert status == 200 and set(creds) >= {"Code", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"}
    c = emu.counters()
    assert (c["tokenless"], c["with_token"], c["token_puts"], c["unauthorized"]) == (1, 2, 1, 1)


@pytest.mark.parametrize("ttl", ["0", "21601", "abc", None])
def test_bad_ttl_is_400(emu: Emulator, ttl: Optional[str]) -> None:
    headers = {TTL: ttl} if ttl is not None else {}
    assert req(emu, "PUT", "/latest/api/token", headers)[0] == 400


def test_put_with_x_forwarded_for_is_403(emu: Emulator) -> None:
    assert req(emu, "PUT", "/latest/api/token", {TTL: "60", "X-Forwarded-For": "10.0.0.1"})[0] == 403


def test_expired_and_unknown_tokens_are_401(emu: Emulator) -> None:
    tok = token(emu, "1")
    assert req(emu, "GET", "/latest/meta-data/", {"X-aws-ec2-metadata-token": tok})[0] == 200
    time.sleep(1.1)
    assert req(emu, "GET", "/latest/meta-data/", {"X-aws-ec2-metadata-token": tok})[0] == 401
    assert req(emu, "GET", "/latest/meta-data/", {"X-aws-ec2-metadata-token": "nope"})[0] == 401


def test_tree_under_versions_listings_and_404(emu: Emulator) -> None:
    h = {"X-aws-ec2-metadata-token": token(emu)}
    status, versions, _ = req(emu, "GET", "/", h)
    assert status == 200 and "2009-04-04" in versions.split("\n") and "latest" in versions.split("\n")
    latest = req(emu, "GET", "/latest/meta-data/placement/region", h)[1]
    assert req(emu, "GET", "/2021-03-23/meta-data/placement/region", h)[1] == latest == "eu-west-1"
    listing = req(emu, "GET", "/2009-04-04/meta-data", h)[1].split("\n")
    assert "iam/" in listing and "instance-id" in listing
    assert req(emu, "GET", "/latest/meta-data/instance-id/", h)[0] == 404
    assert req(emu, "GET", "/latest/meta-data/nothing-here", h)[0] == 404
    assert req(emu, "GET", "/1999-01-01/meta-data/", h)[0] == 404
    assert req(emu, "GET", "/latest/user-data", h)[1].startswith("#!/bin/sh")
    doc = json.loads(req(emu, "GET", "/latest/dynamic/instance-identity/document", h)[1])
    assert doc["region"] == "eu-west-1" and doc["instanceId"].startswith("i-")


def test_head_and_other_methods(emu: Emulator) -> None:
    h = {"X-aws-ec2-metadata-token": token(emu)}
    status, body, resp = req(emu, "HEAD", "/latest/meta-data/instance-id", h)
    assert status == 200 and body == "" and int(resp.headers["Content-Length"]) > 0
    assert req(emu, "POST", "/latest/meta-data/", h)[0] == 405
    assert req(emu, "PUT", "/latest/meta-data/", {TTL: "60"})[0] == 405


def test_optional_mode_allows_tokenless_but_not_bad_tokens() -> None:
    e = Emulator(tokens="optional")
    e.start()
    try:
        assert req(e, "GET", "/latest/meta-data/instance-id")[0] == 200
        assert req(e, "GET", "/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": "bad"})[0] == 401
    finally:
        e.stop()


def test_faults_and_reset(emu: Emulator) -> None:
    h = {"X-aws-ec2-metadata-token": token(emu)}
    emu.set_faults(put_status=500)
    assert req(emu, "PUT", "/latest/api/token", {TTL: "60"})[0] == 500
    emu.set_faults(get_delay=0.3)
    started = time.monotonic()
    assert req(emu, "GET", "/latest/meta-data/", h)[0] == 200
    assert time.monotonic() - started >= 0.3
    emu.set_faults(drop=True)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        req(emu, "GET", "/latest/meta-data/", h)
    emu.reset()
    assert req(emu, "GET", "/latest/meta-data/", h)[0] == 200
    emu.invalidate_tokens()
    assert req(emu, "GET", "/latest/meta-data/", h)[0] == 401
    assert emu.counters()["requests"] == 2
    with pytest.raises(ValueError):
        emu.set_faults(nonsense=1)


def test_cli_prints_ready_line_and_serves_control_socket(tmp_path) -> None:
    sock = str(tmp_path / "emu.sock")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = [sys.executable, "-m", "imds_agent.sandbox.emulator", "--listen", "127.0.0.1:0", "--control", sock]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["ready"] is True and ready["pid"] == proc.pid and ready["control"] == sock
        host, port = ready["listen"][0]
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/latest/meta-data/")
        assert conn.getresponse().status == 401
        ctl = EmulatorControl(sock)
        assert ctl.counters()["tokenless"] == 1
        ctl.set_faults(put_status=503)
        conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("PUT", "/latest/api/token", headers={TTL: "5"})
        assert conn.getresponse().status == 503
        ctl.reset()
        assert ctl.counters()["token_puts"] == 0
        with pytest.raises(RuntimeError):
            ctl.set_faults(bogus=True)
    finally:
        proc.terminate()
        assert proc.wait(5) == 0
    assert not os.path.exists(sock)
    with pytest.raises(ConnectionError, match="emu.sock"):
        EmulatorControl(sock).counters()
