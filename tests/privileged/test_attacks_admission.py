"""Admission must be fair: one uid that took every connection slot (idle keep-alive or slowly sent requests)
used to turn the allowed callers away with 503."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox

from .attack_bed import policy_sandbox

pytestmark = pytest.mark.privileged
APP, OTHER = 1000, 1001
POLICY = f"rules:\n  - name: curl-for-app\n    exe: /usr/bin/curl\n    uid: {APP}\n    sensitive: [credentials]\n"
# Opens as many connections as it can, each with a request head that never ends, and holds them.
HOG = """
import select, socket, sys, time
conns = []
for _ in range(int(sys.argv[1])):
    s = socket.create_connection(("169.254.169.254", 80), timeout=5)
    s.sendall(b"GET /latest/meta-data/instance-id HTTP/1.1\\r\\nHost: x\\r\\n")
    conns.append(s)
print("sent", flush=True)
# Every connection is answered in the end: 503 (refused at once; a reset or an empty read if the agent had to
# close it before its client read) or 408 when the request head never completes (it was admitted and held).
status = {}
end = time.monotonic() + 12
while time.monotonic() < end and len(status) < len(conns):
    for s in select.select([c for c in conns if c not in status], [], [], 0.2)[0]:
        try:
            status[s] = s.recv(64)[9:12] or b"eof"
        except OSError:
            status[s] = b"reset"
held = [s for s in conns if status.get(s) == b"408"]
answered = [s for s in conns if status.get(s) in (b"503", b"reset", b"eof")]
print(len(held), len(answered), flush=True)
"""


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with policy_sandbox(POLICY) as sandbox:
        yield sandbox


def curl(sbx: Sandbox, uid: int, path: str = "/latest/meta-data/iam/security-credentials/") -> str:
    argv = ["/usr/bin/curl", "-s", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}",
            "http://169.254.169.254" + path]  # fmt: skip
    return sbx.run(argv, uid=uid).stdout


def test_one_user_holding_every_slot_starves_nobody_else(sbx: Sandbox) -> None:
    agent = AgentProcess(sbx, mode="enforce").start()
    try:
        hog = sbx.spawn(["/usr/bin/python3", "-c", HOG, "600"], uid=OTHER, stdout=subprocess.PIPE)
        assert hog.stdout is not None
        assert hog.stdout.readline().strip() == "sent"
        time.sleep(0.5)  # the agent is answering the refusals; the admitted heads are held for 5 s
        answers = [curl(sbx, APP) for _ in range(10)]
        answers += [curl(sbx, 0, "/latest/meta-data/instance-id") for _ in range(5)]
        held, refused = (int(x) for x in hog.stdout.readline().split())  # once every connection was answered
    finally:
        agent.stop()
    print(f"the other uid held {held} connections and was refused {refused}; the allowed callers got {answers}")
    assert held + refused == 600 and held == 64, (held, refused)  # listen.max_connections_per_uid
    assert answers == ["200"] * 15
    assert agent.log().count("refused") < 20  # one summary line per interval, not one per refusal
