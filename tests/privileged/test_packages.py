"""The .deb installed into a clean Debian 12 root and exercised; the .rpm inspected."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest

from imds_agent.sandbox.netns import Sandbox

from .packages import build, overlay_root, run

pytestmark = pytest.mark.privileged
NOBODY = 65534


def chroot(root: Path, *argv: str, check: bool = True, timeout: float = 120) -> str:
    return run(["chroot", str(root), *argv], check=check, timeout=timeout).stdout


def start_installed_agent(sbx: Sandbox, root: Path) -> tuple[object, Path]:
    notify_path = root / "run" / "imds-notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    os.chmod(notify_path, 0o666)
    log = root / "tmp" / "agent.log"
    with open(log, "w", encoding="utf-8") as fh:
        proc = sbx.spawn(["chroot", str(root), "/usr/bin/imds-agent", "audit"],
                         env={"NOTIFY_SOCKET": "/run/imds-notify.sock"}, stdout=fh, stderr=fh)  # fmt: skip
    notify.settimeout(15)
    try:
        assert b"READY=1" in notify.recv(4096), log.read_text()
    except socket.timeout:
        raise AssertionError(f"installed agent not ready:\n{log.read_text()}") from None
    finally:
        notify.close()
    return proc, log


def test_deb_install_run_upgrade_remove_purge(tmp_path: Path) -> None:
    deb1 = build("deb", str(tmp_path), "0.1.0")
    deb2 = build("deb", str(tmp_path), "0.1.1")
    with overlay_root() as root:
        for deb in (deb1, deb2):
            shutil.copy(deb, root / "tmp")
        chroot(root, "dpkg", "-i", f"/tmp/{os.path.basename(deb1)}")
        assert chroot(root, "imds-agent", "version").strip() == "imds-agent 0.1.0"
        checked = chroot(root, "imds-agent", "check-config")
        assert "/etc/imds-agent/agent.yaml: OK" in checked and "mode: audit" in checked
        assert "amazon-ssm-agent [/etc/imds-agent/policy.d/10-amazon-ssm-agent.yaml:4]" in checked
        assert "imds-agent:" in (root / "etc" / "passwd").read_text()
        verify = run(["systemd-analyze", "verify", f"--root={root}", "/lib/systemd/system/imds-agent.service"],
                     check=False)  # fmt: skip
        assert verify.returncode == 0, verify.stderr

        with Sandbox() as sbx:
            proc, log = start_installed_agent(sbx, root)
            url = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
            out = sbx.run(["curl", "-s", "-w", "\n%{http_code}", "--max-time", "5", url], uid=NOBODY).stdout
            assert out.endswith("\n200") and "imds-agent-demo-role" in out, log.read_text()
            assert sbx.emulator_control.counters()["tokenless"] == 0
            proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
            assert proc.wait(10) == 0  # type: ignore[attr-defined]
            audit = (root / "var/log/imds-agent/audit.jsonl").read_text().splitlines()
            assert json.loads(audit[-1])["exe"] == "/usr/bin/curl"
            assert (root / "var/lib/imds-agent/inventory.json").exists()
            assert "imds_agent" not in sbx.run(["nft", "list", "ruleset"]).stdout

            # Upgrade: an edited agent.yaml and the recorded inventory are kept.
            config = root / "etc/imds-agent/agent.yaml"
            edited = config.read_text().replace("reconcile_interval: 5", "reconcile_interval: 7")
            config.write_text(edited)
            inventory = (root / "var/lib/imds-agent/inventory.json").read_text()
            chroot(root, "dpkg", "-i", "--force-confold", f"/tmp/{os.path.basename(deb2)}")
            assert chroot(root, "dpkg-query", "-W", "-f", "${Version}", "imds-agent") == "0.1.1"
            assert chroot(root, "imds-agent", "version").strip() == "imds-agent 0.1.1"
            assert config.read_text() == edited
            assert (root / "var/lib/imds-agent/inventory.json").read_text() == inventory

            # Remove: no kernel rules survive the package, even persistent ones.
            sbx.run(["chroot", str(root), "imds-agent", "rules", "apply"], check=True)
            assert "imds_agent" in sbx.run(["nft", "list", "ruleset"]).stdout
            sbx.run(["chroot", str(root), "dpkg", "-r", "imds-agent"], check=True)
            assert "imds_agent" not in sbx.run(["nft", "list", "ruleset"]).stdout
            assert not (root / "usr/bin/imds-agent").exists()
            assert config.exists()  # removed, not purged: configuration stays

        # Purge: nothing of the package is left.
        chroot(root, "dpkg", "-P", "imds-agent")
        for path in ("etc/imds-agent", "var/lib/imds-agent", "var/log/imds-agent", "usr/share/imds-agent"):
            assert not (root / path).exists(), path
        assert "imds-agent:" not in (root / "etc" / "passwd").read_text()
        assert "imds-agent" not in chroot(root, "dpkg", "-l", check=False)


def test_rpm_files_scriptlets_and_dependencies(tmp_path: Path) -> None:
    rpm = build("rpm", str(tmp_path))
    files = run(["rpm", "-qlp", rpm]).stdout.split()
    for expected in ("/usr/bin/imds-agent", "/etc/imds-agent/agent.yaml", "/usr/lib/systemd/system/imds-agent.service",
                     "/usr/lib/sysusers.d/imds-agent.conf", "/usr/share/imds-agent/imds_agent/cli.py",
                     "/usr/share/imds-agent/vendor/pyroute2/__init__.py",
                     "/etc/imds-agent/policy.d/10-amazon-ssm-agent.yaml"):  # fmt: skip
        assert expected in files, expected
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    configs = run(["rpm", "-qcp", rpm]).stdout.split()
    assert "/etc/imds-agent/agent.yaml" in configs and "/etc/imds-agent/policy.d/30-aws-cli.yaml" in configs
    scripts = run(["rpm", "-qp", "--scripts", rpm]).stdout
    assert "useradd -r -g imds-agent" in scripts
    assert "systemctl enable --now imds-agent.service" in scripts
    assert "/usr/bin/imds-agent rules remove" in scripts and "try-restart" in scripts
    requires = run(["rpm", "-qpR", rpm]).stdout
    for dep in ("python3 >= 3.9", "python3-psutil", "python3-pyyaml"):
        assert dep in requires, requires
    assert "urllib3" not in requires  # the agent speaks HTTP to the metadata service itself
    assert "python(abi)" not in requires  # private modules: no interpreter-version lock-in
    info = run(["rpm", "-qpi", rpm]).stdout
    assert "Architecture: noarch" in info
