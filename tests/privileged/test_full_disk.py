"""The audit log on a full filesystem, for real: a 64 KiB tmpfs under the agent's audit directory, 1000 requests.

Nothing is lost silently: every line left in the file is whole JSON, every request is either a line or counted in
the summary the agent writes once there is room again, and the running totals say how many were dropped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox, wait_for

pytestmark = pytest.mark.privileged
LOOP = """
import http.client, sys
c = http.client.HTTPConnection("169.254.169.254", 80, timeout=5)
for _ in range(int(sys.argv[1])):
    c.request("GET", "/latest/meta-data/instance-id"); r = c.getresponse(); r.read()
    assert r.status == 200, r.status
"""


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        audit = Path(sandbox.workdir) / "audit"
        audit.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0777", "tmpfs", str(audit)], check=True)
        try:
            yield sandbox
        finally:
            subprocess.run(["umount", "-l", str(audit)], check=False)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def test_a_full_disk_loses_no_record_silently_and_leaves_no_partial_line(sbx: Sandbox) -> None:
    agent = AgentProcess(sbx, mode="audit", audit=", rate_per_uid: 0, max_bytes: 10485760").start()
    log = Path(sbx.workdir) / "audit" / "audit.jsonl"
    try:
        sbx.run([sys.executable, "-c", LOOP, "1000"], uid=65534, check=True, timeout=120)
        assert wait_for(lambda: "cannot write the audit log" in agent.log(), 5), agent.log()[-2000:]
        before = lines(log)
        records = [json.loads(line) for line in before]  # a partial line would not parse
        assert 50 < len(records) < 1000 and all(r["path"] == "/latest/meta-data/instance-id" for r in records)
        assert os.statvfs(log.parent).f_bavail == 0 or log.stat().st_size > 60000
        # Room again: the operator removes the full file. The next record after the retry pause (1 s) brings the
        # summary first.
        log.unlink()
        time.sleep(1.2)
        sbx.run([sys.executable, "-c", LOOP, "10"], uid=65534, check=True, timeout=60)
        assert wait_for(lambda: len(lines(log)) >= 11, 5), agent.log()[-2000:]
        after = [json.loads(line) for line in lines(log)]
        summary = after[0]
        assert "records dropped between" in summary["summary"] and "space left" in summary["cause"].lower()
        assert len(records) + summary["dropped"] == 1000, (len(records), summary["dropped"])
        assert [r.get("path") for r in after[1:11]] == ["/latest/meta-data/instance-id"] * 10
        assert agent.log().count("cannot write the audit log") == 1  # said once, not once per record
        assert "the audit log" in agent.log() and "is written again" in agent.log()
    finally:
        agent.stop()
