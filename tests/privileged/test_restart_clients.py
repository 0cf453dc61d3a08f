"""Stopping must not strand clients: on SIGTERM (fail_mode open) the requests in flight used to lose their NAT
translation when the rules went, and 20 of 20 looping clients hung until their own timeouts."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox

pytestmark = pytest.mark.privileged
CLIENTS = 20
# Loops for argv[1] seconds on keep-alive connections (a new one after any failure); prints its tallies.
LOOP = """
import http.client, json, socket, sys, time
end = time.monotonic() + float(sys.argv[1])
ok = failed = hung = 0
conn = None
while time.monotonic() < end:
    try:
        if conn is None:
            conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=2)
        conn.request("GET", "/latest/meta-data/instance-id")
        resp = conn.getresponse()
        resp.read()
        if resp.status == 200:
            ok += 1
        else:
            failed += 1
    except socket.timeout:
        hung += 1
        conn = None
    except (OSError, http.client.HTTPException):
        failed += 1
        conn = None
        time.sleep(0.01)
print(json.dumps({"ok": ok, "failed": failed, "hung": hung}))
"""


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_clients_looping_through_a_restart_never_hang(sbx: Sandbox, backend: str) -> None:
    agent = AgentProcess(sbx, mode="audit", backend=backend, fail_mode="open").start()
    clients = [sbx.spawn(["/usr/bin/python3", "-c", LOOP, "5"], uid=1000 + i, stdout=subprocess.PIPE)
               for i in range(CLIENTS)]  # fmt: skip
    try:
        time.sleep(1.5)
        assert agent.stop() == 0
        agent.start()
        tallies = []
        for proc in clients:
            out, _ = proc.communicate(timeout=20)
            tallies.append(json.loads(out))
    finally:
        agent.stop()
    total = {k: sum(t[k] for t in tallies) for k in ("ok", "failed", "hung")}
    print(f"{backend}: {total} over {CLIENTS} clients")
    assert total["hung"] == 0, total
    # While the agent is down (fail_mode open) tokenless requests reach the service directly and get 401: those
    # fail fast, as they should. Every client was served before and after.
    assert all(t["ok"] > 0 for t in tallies), tallies
