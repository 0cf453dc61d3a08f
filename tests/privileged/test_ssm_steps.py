"""The SSM documents' shell steps, run for real as root in a clean Debian 12 root against the built package: the
Run Command documents in a chroot, and Ensure, Inventory and the Distributor scripts in a root booted with systemd
(they start, reload and watch the unit)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from imds_agent.sandbox.netns import Sandbox, wait_for

from .nspawn import Container, booted
from .packages import REPO, build, overlay_root, run, ssm_script, systemd_root

pytestmark = pytest.mark.privileged


def step(root: Path, name: str, **params: str) -> tuple[int, str, str]:
    (root / "tmp" / f"{name}.sh").write_text(ssm_script(name, **params))
    proc = run(["chroot", str(root), "/bin/sh", f"/tmp/{name}.sh"], check=False, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_install_report_setmode_uninstall(tmp_path: Path, netns_name: str) -> None:
    deb = build("deb", str(tmp_path))
    with overlay_root() as root:
        shutil.copy(deb, root / "tmp" / "pkg.deb")
        code, out, err = step(root, "Install", PackageSource="file:///tmp/pkg.deb")
        assert code == 0, err
        assert "imds-agent 0.1.0" in out and "agent.yaml: OK" in out and "audit mode" in out

        now = time.time()
        entries = [
            {"exe": "/usr/bin/curl", "uid": 1000, "user": "app", "path_class": "credentials", "imds": "v1",
             "decision": "would-deny", "count": 3, "first_seen": now - 60, "last_seen": now - 30},
            {"exe": "/usr/bin/amazon-ssm-agent", "uid": 0, "user": "root", "path_class": "credentials", "imds": "v2",
             "decision": "allow", "count": 9, "first_seen": now - 60, "last_seen": now - 10},
        ]  # fmt: skip
        (root / "var/lib/imds-agent/inventory.json").write_text(json.dumps({"version": 1, "entries": entries}))
        code, out, _ = step(root, "Report")
        rows = json.loads(out)
        assert code == 0 and {r["exe"] for r in rows} == {"/usr/bin/curl", "/usr/bin/amazon-ssm-agent"}

        code, _, err = step(root, "SetMode", Mode="enforce")
        assert code == 1 and "/usr/bin/curl (uid 1000): 3 would-deny" in err
        assert "mode: audit" in (root / "etc/imds-agent/agent.yaml").read_text()
        code, out, err = step(root, "SetMode", Mode="enforce", Hours="0")
        assert code == 1  # 0 h means all history: still refused
        code, out, err = step(root, "SetMode", Mode="enforce", Force="true")
        assert code == 0 and "mode enforce" in out, err
        assert "mode: enforce" in (root / "etc/imds-agent/agent.yaml").read_text()
        code, out, _ = step(root, "SetMode", Mode="audit")
        assert code == 0 and "mode: audit" in (root / "etc/imds-agent/agent.yaml").read_text()

        run(["chroot", str(root), "imds-agent", "rules", "apply", "--backend", "nftables"])
        code, out, err = step(root, "Uninstall", Purge="true")
        assert code == 0 and "imds-agent removed" in out, err
        assert "imds_agent" not in run(["nft", "list", "ruleset"]).stdout
        assert not (root / "etc/imds-agent").exists() and not (root / "usr/bin/imds-agent").exists()


UNIT = "imds-agent.service"
INSTANCE = "i-0123456789abcdef0"


def distributor_zip(package: str, out: Path) -> Path:
    """The Distributor zip `make distributor` would make of ``package``, unpacked into ``out`` as the SSM Agent
    does (the modes kept)."""
    spec = importlib.util.spec_from_file_location("distributor_build", REPO / "packaging/distributor/build.py")
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    archive = out.with_suffix(".zip")
    builder.write_zip(str(archive), package)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            zf.extract(info, out)
            os.chmod(out / info.filename, info.external_attr >> 16 & 0o777)
    return out


def status_text(ct: Container) -> str:
    return ct.show(UNIT, "StatusText")["StatusText"]


def test_ensure_inventory_and_distributor_under_systemd(tmp_path: Path) -> None:
    """State Manager's Ensure repairs each drift and says so; Inventory writes the custom inventory files; the
    Distributor zip's scripts install, update in place and uninstall."""
    deb = build("deb", str(tmp_path), "0.1.0")
    upgrade = build("deb", str(tmp_path / "next"), "0.1.1")
    with Sandbox() as sbx, overlay_root(systemd_root(), chroot_mounts=False) as root:
        shutil.copy(deb, root / "root" / "pkg.deb")  # the container mounts its own /tmp
        distributor_zip(deb, root / "root" / "dist-0.1.0")
        distributor_zip(upgrade, root / "root" / "dist-0.1.1")
        with booted(root, sbx.host_ns, tmp_path / "boot.log") as ct:

            def step(name: str, **params: str) -> tuple[int, str, str]:
                (root / "root" / f"{name}.sh").write_text(ssm_script(name, **params))
                proc = ct.run("/bin/sh", f"/root/{name}.sh", check=False, timeout=300)
                return proc.returncode, proc.stdout, proc.stderr

            def ensure(mode: str) -> str:
                code, out, err = step("Ensure", Mode=mode, PackageSource="file:///root/pkg.deb")
                assert code == 0, (out, err)
                return out

            # Missing: installed (the package starts it in audit), then set to the intended mode.
            out = ensure("enforce")
            assert "drift: imds-agent was not installed" in out and "drift: mode was audit" in out
            assert "corrected 2 drift(s): imds-agent 0.1.0 in enforce mode" in out, out
            assert wait_for(lambda: status_text(ct).startswith("enforce mode"), 10), status_text(ct)
            assert ensure("enforce").strip().endswith("no drift: imds-agent 0.1.0 in enforce mode")

            # Drifted by hand: the mode in agent.yaml, then the service stopped and disabled.
            ct.run("imds-agent", "set-mode", "audit")
            out = ensure("enforce")
            assert "drift: mode was audit in agent.yaml: setting enforce" in out and "corrected 1 drift(s)" in out
            # The file right but the running agent never told (edited without a reload): reloaded.
            ct.run("imds-agent", "set-mode", "audit")
            assert wait_for(lambda: status_text(ct).startswith("audit mode"), 10), status_text(ct)
            config = root / "etc/imds-agent/agent.yaml"
            config.write_text(config.read_text().replace("mode: audit", "mode: enforce"))
            assert "drift: the running agent was in audit mode: reloading it" in ensure("enforce")
            assert wait_for(lambda: status_text(ct).startswith("enforce mode"), 10), status_text(ct)
            ct.run("systemctl", "disable", "--now", UNIT)
            out = ensure("enforce")
            assert "drift: imds-agent.service was not enabled" in out and "was not running: starting it" in out
            assert ct.run("systemctl", "is-active", UNIT).stdout.strip() == "active"

            # Inventory: nothing to do without an SSM Agent inventory folder; the files once there is one.
            code, out, err = step("Inventory")
            assert code == 0 and "nothing written" in out, (out, err)
            (root / "var/lib/amazon/ssm" / INSTANCE / "inventory").mkdir(parents=True)
            ct.run("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-s", "--max-time", "5",
                   "http://169.254.169.254/latest/meta-data/iam/security-credentials/", check=False)  # fmt: skip
            inventory = root / "var/lib/imds-agent/inventory.json"
            assert wait_for(lambda: inventory.exists() and "/usr/bin/curl" in inventory.read_text(), 15)
            code, out, err = step("Inventory")
            assert code == 0 and "wrote Custom:ImdsAgentCallers" in out, (out, err)
            custom = root / "var/lib/amazon/ssm" / INSTANCE / "inventory/custom"
            callers = json.loads((custom / "ImdsAgentCallers.json").read_text())
            status = json.loads((custom / "ImdsAgentStatus.json").read_text())["Content"][0]
            assert {"Exe": "/usr/bin/curl", "Decision": "deny"}.items() <= callers["Content"][0].items()
            assert status["Mode"] == "enforce" and status["Version"] == "0.1.0" and len(status["PolicyHash"]) == 64

            # Distributor: uninstall, install, in-place update (the agent restarted on the new version, the
            # edited agent.yaml kept), uninstall.
            out = ct.run("/root/dist-0.1.0/uninstall.sh").stdout
            assert "imds-agent removed" in out and not (root / "usr/bin/imds-agent").exists()
            out = ct.run("/root/dist-0.1.0/install.sh").stdout
            assert "imds-agent 0.1.0" in out and out.strip().endswith("active")
            assert "mode: enforce" in (root / "etc/imds-agent/agent.yaml").read_text()  # kept by remove
            pid = ct.show(UNIT, "MainPID")["MainPID"]
            out = ct.run("/root/dist-0.1.1/update.sh").stdout
            assert "imds-agent 0.1.1" in out and out.strip().endswith("active")
            assert ct.show(UNIT, "MainPID")["MainPID"] not in ("0", pid)
            assert "mode: enforce" in (root / "etc/imds-agent/agent.yaml").read_text()
            assert "imds-agent removed" in ct.run("/root/dist-0.1.1/uninstall.sh").stdout
            assert "imds_agent" not in sbx.run(["nft", "list", "ruleset"], check=True).stdout
