"""Spellings of the credentials path that an unprivileged uid tries on the running agent, in enforce mode under
the default allow-nonsensitive, with a rule granting credentials to one uid only.

Each must be answered by the agent itself with a 400 "refused path", and none may reach the metadata
service: a spelling the agent cannot read with certainty is refused, never forwarded as "non-sensitive". A
non-UTF-8 escape gets an answer too (not a dropped connection), and the agent keeps serving afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox

from .attack_bed import policy_sandbox

pytestmark = pytest.mark.privileged
APP, OTHER = 1000, 1001
ROLE = "imds-agent-demo-role"
CREDS = "/latest/meta-data/iam/security-credentials/"
POLICY = f"rules:\n  - name: curl-for-app\n    exe: /usr/bin/curl\n    uid: {APP}\n    sensitive: [credentials]\n"
# Sends one request line exactly as given (no client-side normalization) and prints the status line and body.
RAW_CLIENT = """
import socket, sys
s = socket.create_connection(("169.254.169.254", 80), timeout=5)
head = b"GET " + sys.argv[1].encode("latin-1") + b" HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\n"
s.sendall(head + b"Connection: close\\r\\n\\r\\n")
reply = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    reply += chunk
head, _, body = reply.partition(b"\\r\\n\\r\\n")
print(head.split(b"\\r\\n")[0].decode("latin-1"))
print(body.decode("latin-1"))
"""
CURL_SPELLINGS = [
    f"/LATEST/meta-data/iam/security-credentials/{ROLE}",
    f"/Latest/meta-data/iam/security-credentials/{ROLE}",
    f"/latest./meta-data/iam/security-credentials/{ROLE}",
    f"/2021-3-23/meta-data/iam/security-credentials/{ROLE}",
    f"/x/../LATEST/meta-data/iam/security-credentials/{ROLE}",
    f"/latest/meta-data/iam/security-credentials%3F/{ROLE}",
    f"/latest/meta-data/iam/security-credentials%3f/{ROLE}",
    f"/latest/meta-data/iam/security-credentials%23/{ROLE}",
    f"/latest/meta-data/iam%2Fsecurity-credentials/{ROLE}",
    f"/latest/meta-data/IAM/security-credentials/{ROLE}",
    f"/latest/meta-data/iam/Security-Credentials/{ROLE}",
    f"/latest/meta-data/iam/security-credentials/{ROLE}%ff",
    f"/latest/meta-data/iam/security-credentials/{ROLE}%c0%af",
    f"/latest/latest/meta-data/iam/security-credentials/{ROLE}",
]
RAW_SPELLINGS = [
    "/latest/meta-data/instance-id#/../../iam/security-credentials/",
    f"/latest/meta-data/iam/security-credentials%3F/{ROLE}",
    f"/latest/meta-data/iam/security-credentials/{ROLE}%ff",
    f"http://169.254.169.254/LATEST/meta-data/iam/security-credentials/{ROLE}",
    f"http://169.254.169.254/latest/meta-data/iam/security-credentials%3F/{ROLE}",
]


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with policy_sandbox(POLICY, {"raw_client.py": RAW_CLIENT}) as sandbox:
        yield sandbox


def curl(sbx: Sandbox, uid: int, path: str) -> tuple[str, str]:
    argv = ["/usr/bin/curl", "-s", "-g", "--path-as-is", "--max-time", "5", "-w", "\n%{http_code}",
            "http://169.254.169.254" + path]  # fmt: skip
    body, _, code = sbx.run(argv, uid=uid).stdout.rpartition("\n")
    return code, body


def raw(sbx: Sandbox, uid: int, target: str) -> tuple[str, str]:
    out = sbx.run(["/usr/bin/python3", os.path.join(sbx.workdir, "raw_client.py"), target], uid=uid).stdout
    status, _, body = out.partition("\n")
    return status.split(" ")[1] if status.count(" ") >= 1 else "000", body


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_other_uids_get_no_credentials_through_any_spelling(sbx: Sandbox, mode: str) -> None:
    """In audit mode too: what the agent cannot classify it never forwards (audit used to forward it raw)."""
    agent = AgentProcess(sbx, mode=mode).start()
    try:
        # The rule works, and the plain spelling is denied to the other uid (forwarded as would-deny in audit).
        assert curl(sbx, APP, CREDS) == ("200", ROLE)
        assert curl(sbx, OTHER, CREDS)[0] == ("403" if mode == "enforce" else "200")
        sbx.emulator_control.reset()
        answers = [(p, *curl(sbx, OTHER, p)) for p in CURL_SPELLINGS]
        answers += [(t, *raw(sbx, OTHER, t)) for t in RAW_SPELLINGS]
        counters = sbx.emulator_control.counters()
        print(*(f"{code} {p} {body[:150]!r}" for p, code, body in answers), sep="\n")
        unrefused = [(p, code) for p, code, body in answers if not (code.startswith("4") and "refused path" in body)]
        assert not unrefused, f"{len(unrefused)} of {len(answers)} not refused by the agent: {unrefused}"
        served = [p for p, _, body in answers if "AccessKeyId" in body or body.strip() == ROLE]
        assert not served, f"credentials served for: {served}"
        assert counters["requests"] == 0, f"forwarded to the metadata service: {counters['by_path']}"
        # Still serving, to both uids.
        assert curl(sbx, OTHER, "/latest/meta-data/instance-id")[0] == "200"
        assert curl(sbx, APP, CREDS + ROLE)[0] == "200"
    finally:
        agent.stop()
    assert "Traceback" not in agent.log(), agent.log()[-3000:]
