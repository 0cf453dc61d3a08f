"""What an ordinary local user does to the records, on the running agent: floods of large requests that used to
rotate every earlier record out of the audit files, distinct paths that used to evict every would-deny from the
inventory (after which `report --json`, which ImdsAgent-SetMode trusts, showed none), and escapes that used to
write forged lines into the agent's log. Each record an operator relies on must still be there afterwards."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox

pytestmark = pytest.mark.privileged
APP, OTHER = 1000, 1001
CREDS = "/latest/meta-data/iam/security-credentials/"
# One keep-alive connection, many requests: argv[1] is how many, argv[2] the User-Agent size, argv[3] a path
# template with {n}.
FLOOD = """
import socket, sys
count, ua, template = int(sys.argv[1]), "A" * int(sys.argv[2]), sys.argv[3]
s = f = None
for n in range(count):
    if s is None:
        s = socket.create_connection(("169.254.169.254", 80), timeout=10)
        f = s.makefile("rb")
    s.sendall(f"GET {template.format(n=n)} HTTP/1.1\\r\\nHost: x\\r\\nUser-Agent: {ua}\\r\\n\\r\\n".encode())
    length, closing = 0, False
    while True:
        line = f.readline()
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
        closing = closing or line.lower().startswith(b"connection: close")
        if line in (b"\\r\\n", b""):
            break
    f.read(length)
    if closing:
        s.close()
        s = None
print("sent", count)
"""


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        os.makedirs(os.path.join(sandbox.workdir, "policy.d"))
        with open(os.path.join(sandbox.workdir, "flood.py"), "w", encoding="utf-8") as fh:
            fh.write(FLOOD)
        yield sandbox


def flood(sbx: Sandbox, uid: int, count: int, ua: int, template: str) -> None:
    out = sbx.run(["/usr/bin/python3", os.path.join(sbx.workdir, "flood.py"), str(count), str(ua), template], uid=uid)
    assert f"sent {count}" in out.stdout, out.stderr


def audit_lines(sbx: Sandbox) -> list[dict[str, object]]:
    folder = Path(sbx.workdir, "audit")
    lines = []
    for path in sorted(folder.glob("audit.jsonl*"), reverse=True):
        lines += [json.loads(x) for x in path.read_text().splitlines()]
    return lines


def test_one_users_floods_wash_out_no_other_record(sbx: Sandbox) -> None:
    agent = AgentProcess(sbx, mode="audit", audit=", max_bytes: 262144, backups: 1, rate_per_uid: 5, burst_per_uid: 50")
    agent.start()
    try:
        assert sbx.run(["/usr/bin/curl", "-s", "-o", "/dev/null", "http://169.254.169.254" + CREDS], uid=APP)
        flood(sbx, OTHER, 1500, 16384, "/latest/meta-data/instance-id")  # ~25 MB of User-Agent
        flood(sbx, OTHER, 1500, 10, "/latest/meta-data/m{n}/x")  # as many distinct paths
        flood(sbx, OTHER, 3, 10, "/latest/meta-data/%0AWARNING%20imds_agent:%20forged{n}")
    finally:
        agent.stop()
    report = json.loads(agent.cli("report", "--json", check=True).stdout)  # the inventory is saved at stop
    lines = audit_lines(sbx)
    victim = [x for x in lines if x.get("uid") == APP and x.get("decision") == "would-deny"]
    assert len(victim) == 1 and victim[0]["exe"] == "/usr/bin/curl"
    summaries = [x for x in lines if "summary" in x]
    assert summaries and sum(int(str(s["suppressed"])) for s in summaries) >= 2900
    flooded = [x for x in lines if x.get("uid") == OTHER and "summary" not in x]
    assert all(len(str(x.get("user_agent") or "")) < 300 for x in flooded)
    curl = [r for r in report if r["exe"] == "/usr/bin/curl" and r["uid"] == APP]
    assert curl and curl[0]["would_deny"] == 1  # what SetMode trusts is still there
    state = json.loads(Path(sbx.workdir, "state", "inventory.json").read_text())
    classes = {e["path_class"] for e in state["entries"] if e["uid"] == OTHER}
    assert classes <= {"meta-data/instance-id", "(other)", "(refused)"}, classes
    assert not any(line.startswith("WARNING imds_agent: forged") for line in agent.log().splitlines())
