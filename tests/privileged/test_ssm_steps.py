"""The SSM documents' shell steps, run for real as root in a clean Debian 12 root against the built package."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from .packages import build, overlay_root, run, ssm_script

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
