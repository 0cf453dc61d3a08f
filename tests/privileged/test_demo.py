"""`make demo` is what a newcomer runs first: it must keep behaving as it describes."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.privileged


def test_the_demo_runs_and_every_step_behaves_as_described() -> None:
    proc = subprocess.run([sys.executable, "-m", "imds_agent.sandbox.demo"], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "everything behaved as described" in proc.stdout and "UNEXPECTED" not in proc.stdout
    for step in ("Allowed:", "Denied:", "impostor", "IMDSv2 client", "What the metadata service saw", "The report"):
        assert step in proc.stdout, step
    assert 'SecretAccessKey": "<40 chars>"' in proc.stdout  # credentials are shown redacted, never in full
