"""The sandbox topology: the emulator is reachable on both families, nothing else is, and teardown is complete."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from imds_agent.sandbox.netns import Sandbox, sweep_stale

pytestmark = pytest.mark.privileged
NOBODY = 65534


def curl(sbx: Sandbox, *args: str) -> str:
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", *args]
    return sbx.run(argv, uid=NOBODY).stdout


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_topology_emulator_and_isolation() -> None:
    with Sandbox() as sbx:
        assert curl(sbx, "http://169.254.169.254/latest/meta-data/") == "401"
        assert sbx.emulator_control.counters()["tokenless"] == 1
        token = sbx.run(["curl", "-s", "-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60",
                         "http://169.254.169.254/latest/api/token"], uid=NOBODY).stdout  # fmt: skip
        header = f"X-aws-ec2-metadata-token: {token}"
        assert curl(sbx, "-H", header, "http://[fd00:ec2::254]/latest/meta-data/instance-id") == "200"
        # No default route: anything but the metadata network fails locally and at once.
        proc = sbx.run(["curl", "-s", "--max-time", "5", "http://192.0.2.1/"], uid=NOBODY)
        assert proc.returncode == 7  # couldn't connect (ENETUNREACH), not 28 (timeout)
        with sbx.enter():
            with socket.create_connection(("169.254.169.254", 80), timeout=2) as s:
                assert s.getsockname()[0] == "169.254.0.1"
        assert sbx.emulator is not None
        emulator_pid = sbx.emulator.pid
    assert sbx.host_ns not in namespaces() and sbx.imds_ns not in namespaces()
    assert not os.path.exists(f"/proc/{emulator_pid}")
    assert not os.path.exists(sbx.workdir)


def test_teardown_after_a_failure_inside() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Sandbox() as sbx:
            sleeper = sbx.spawn(["sleep", "60"], uid=NOBODY)
            raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert sbx.host_ns not in namespaces()


def test_sweep_removes_namespaces_left_by_a_dead_run() -> None:
    name = "imds-sbx-999999999-deadbe-host"
    subprocess.run(["ip", "netns", "add", name], check=True)
    assert name in sweep_stale()
    assert name not in namespaces()
