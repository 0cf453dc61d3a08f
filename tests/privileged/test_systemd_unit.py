"""The .deb's unit under a real systemd (a booted Debian 12 container in the sandbox's host namespace).

One long scenario, because booting costs seconds: install enables and starts the agent in audit mode; systemd's
view of it (notify, user, capabilities, seccomp); a client as another uid; set-mode and reload; a hung agent is
killed by the watchdog and restarted; SIGKILL is restarted; a broken config stops the restarts; stop and remove
leave no rules.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from imds_agent.sandbox.netns import Sandbox, wait_for

from .capsets import held_caps
from .nspawn import Container, booted
from .packages import build, overlay_root, ssm_script, systemd_root

pytestmark = pytest.mark.privileged
UNIT = "imds-agent.service"
CREDS = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"


def curl_as_nobody(ct: Container, url: str = CREDS) -> str:
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "curl", "-s", "-w", "\n%{http_code}", "--max-time", "5", url]  # fmt: skip
    return ct.run(*argv, check=False).stdout


def container_namespace(ct: Container) -> None:
    """A network namespace standing for a container, made from inside the booted root (so that its processes
    are in the root's pid namespace, where the packaged agent looks), behind a bridge docker0."""
    for argv in (["ip", "link", "add", "docker0", "type", "bridge"], ["ip", "addr", "add", "172.30.0.1/24", "dev",
                 "docker0"], ["ip", "link", "set", "docker0", "up"], ["ip", "netns", "add", "web"],
                 ["ip", "link", "add", "vc-web", "type", "veth", "peer", "name", "eth0", "netns", "web"],
                 ["ip", "link", "set", "vc-web", "master", "docker0", "up"],
                 ["ip", "-n", "web", "addr", "add", "172.30.0.2/24", "dev", "eth0"],
                 ["ip", "-n", "web", "link", "set", "eth0", "up"], ["ip", "-n", "web", "link", "set", "lo", "up"],
                 ["ip", "-n", "web", "route", "add", "default", "via", "172.30.0.1"]):  # fmt: skip
        ct.run(*argv)


def main_status(ct: Container) -> dict[str, str]:
    pid = ct.show(UNIT, "MainPID")["MainPID"]
    assert pid != "0", ct.journal(UNIT)
    text = ct.run("cat", f"/proc/{pid}/status").stdout
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def active(ct: Container) -> bool:
    return ct.run("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active"


def our_rules(sbx: Sandbox) -> bool:
    return "imds_agent" in sbx.run(["nft", "list", "ruleset"], check=True).stdout


def test_the_packaged_unit_under_systemd(tmp_path: Path) -> None:
    deb = build("deb", str(tmp_path), "0.1.0")
    upgrade = build("deb", str(tmp_path), "0.1.1")
    with Sandbox() as sbx, overlay_root(systemd_root(), chroot_mounts=False) as root:
        for package in (deb, upgrade):
            shutil.copy(package, root / "root")  # the container mounts its own /tmp
        with booted(root, sbx.host_ns, tmp_path / "boot.log") as ct:
            # Install: enabled, started in audit mode, ready (Type=notify), rules in, as its own user.
            ct.run("dpkg", "-i", f"/root/{os.path.basename(deb)}")
            assert ct.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
            assert wait_for(lambda: active(ct), 30), ct.journal(UNIT)
            assert our_rules(sbx)
            uid = ct.run("id", "-u", "imds-agent").stdout.strip()
            status = main_status(ct)
            assert status["Uid"].split() == [uid] * 4 and status["NoNewPrivs"] == "1"
            assert status["Seccomp"] == "2"  # the unit's system call filter is in force
            # The unit grants CAP_NET_RAW for iptables hosts; on this nftables host the agent gave it up, which
            # needs capset to pass the unit's filter.
            for key in ("CapEff", "CapPrm", "CapAmb"):
                assert held_caps(status[key]) == {"net_admin", "sys_ptrace", "dac_read_search"}, key

            # A v1 client as another uid gets the credentials; the service saw no tokenless request.
            out = curl_as_nobody(ct)
            assert out.endswith("\n200") and "imds-agent-demo-role" in out, ct.journal(UNIT)
            assert sbx.emulator_control.counters()["tokenless"] == 0
            record = json.loads((root / "var/log/imds-agent/audit.jsonl").read_text().splitlines()[-1])
            assert record["exe"] == "/usr/bin/curl" and record["user"] == "nobody" and record["mode"] == "audit"
            # `systemctl status` tells an operator what the agent has been doing.
            line = "audit mode: 1 requests (1 IMDSv1), 1 would-deny, 0 upstream errors, 0 unidentified"
            assert wait_for(lambda: line in ct.show(UNIT, "StatusText")["StatusText"], 5)

            # A container with a network namespace of its own, under the hardened unit's capabilities and system
            # call filter: intercepted by default, identified in its own namespace.
            container_namespace(ct)
            argv = ["ip", "netns", "exec", "web", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    "curl", "-s", "-w", "\n%{http_code}", "--max-time", "5", CREDS]  # fmt: skip
            out = ct.run(*argv, check=False).stdout
            assert out.endswith("\n200") and "imds-agent-demo-role" in out, ct.journal(UNIT)
            record = json.loads((root / "var/log/imds-agent/audit.jsonl").read_text().splitlines()[-1])
            assert record["exe"] == "/usr/bin/curl" and record["netns"] and record["peer"].startswith("172.30.0.2:")
            line = "audit mode: 2 requests (2 IMDSv1), 2 would-deny, 0 upstream errors, 0 unidentified"
            assert wait_for(lambda: line in ct.show(UNIT, "StatusText")["StatusText"], 5)

            # The SSM custom inventory is refreshed by a root timer the package enables; without the SSM Agent's
            # folder its runs are skipped, with it the files appear (the agent itself cannot write there).
            timer = "imds-agent-inventory.timer"
            assert ct.run("systemctl", "is-enabled", timer).stdout.strip() == "enabled"
            assert ct.run("systemctl", "is-active", timer).stdout.strip() == "active"
            ct.run("systemctl", "start", "imds-agent-inventory.service")
            assert ct.show("imds-agent-inventory.service", "ConditionResult")["ConditionResult"] == "no"
            custom = root / "var/lib/amazon/ssm/i-0123456789abcdef0/inventory/custom"
            custom.parent.mkdir(parents=True)
            assert wait_for(lambda: (root / "var/lib/imds-agent/inventory.json").exists(), 15)  # saved every 10 s
            ct.run("systemctl", "start", "imds-agent-inventory.service")
            assert ct.show("imds-agent-inventory.service", "Result")["Result"] == "success", ct.journal(
                "imds-agent-inventory.service"
            )
            callers = json.loads((custom / "ImdsAgentCallers.json").read_text())
            assert callers["TypeName"] == "Custom:ImdsAgentCallers"
            assert any(e["Exe"] == "/usr/bin/curl" for e in callers["Content"]), callers

            # set-mode edits agent.yaml and reloads through systemd (ExecReload): curl is now denied credentials.
            pid = ct.show(UNIT, "MainPID")["MainPID"]
            assert "reloaded imds-agent.service" in ct.run("imds-agent", "set-mode", "enforce").stdout
            assert wait_for(lambda: curl_as_nobody(ct).endswith("\n403"), 10), ct.journal(UNIT)
            assert ct.show(UNIT, "MainPID")["MainPID"] == pid  # reloaded, not restarted

            # A hung agent (SIGSTOP) stops pinging the watchdog: systemd kills and restarts it.
            dropin = root / "etc/systemd/system/imds-agent.service.d"
            dropin.mkdir(parents=True)
            (dropin / "watchdog.conf").write_text("[Service]\nWatchdogSec=3\n")
            ct.run("systemctl", "daemon-reload")
            ct.run("systemctl", "restart", UNIT)
            assert active(ct) and ct.show(UNIT, "NRestarts")["NRestarts"] == "0"
            pid = ct.show(UNIT, "MainPID")["MainPID"]
            ct.run("kill", "-STOP", pid)
            assert wait_for(lambda: ct.show(UNIT, "NRestarts")["NRestarts"] == "1" and active(ct), 20)
            assert "Watchdog timeout" in ct.journal(UNIT) or "watchdog" in ct.journal(UNIT).lower()
            assert ct.show(UNIT, "MainPID")["MainPID"] != pid

            # SIGKILL: restarted (Restart=on-failure), rules back, clients served.
            ct.run("systemctl", "kill", "--signal=KILL", UNIT)
            assert wait_for(lambda: ct.show(UNIT, "NRestarts")["NRestarts"] == "2" and active(ct), 20)
            assert our_rules(sbx) and curl_as_nobody(ct).endswith("\n403")

            # A broken config: the agent refuses it with 78 (after ExecStartPre has reported it) and systemd does
            # not loop on it; the rules went with the old agent (fail_mode open), so nothing is redirected.
            config = root / "etc/imds-agent/agent.yaml"
            good = config.read_text()
            config.write_text(good + "listen: {port: eighty}\n")
            assert ct.run("systemctl", "restart", UNIT, check=False).returncode != 0
            assert wait_for(lambda: ct.show(UNIT, "ActiveState")["ActiveState"] == "failed", 10)
            state = ct.show(UNIT, "NRestarts", "ExecMainStatus", "Result")
            assert state == {"Result": "exit-code", "ExecMainStatus": "78", "NRestarts": "0"}, state  # none automatic
            time.sleep(3)  # longer than RestartSec
            assert ct.show(UNIT, "ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": "0"}
            assert "listen.port" in ct.journal(UNIT)
            assert not our_rules(sbx)
            config.write_text(good)
            ct.run("systemctl", "start", UNIT)
            assert active(ct) and our_rules(sbx)

            # Upgrade: the running agent is restarted on the new version, in the mode set above.
            pid = ct.show(UNIT, "MainPID")["MainPID"]
            ct.run("dpkg", "-i", f"/root/{os.path.basename(upgrade)}")
            assert wait_for(lambda: active(ct) and ct.show(UNIT, "MainPID")["MainPID"] not in ("0", pid), 20)
            assert ct.run("imds-agent", "version").stdout.strip() == "imds-agent 0.1.1"
            assert curl_as_nobody(ct).endswith("\n403")  # still enforcing: the edited agent.yaml was kept

            # Stop removes the rules; removing the package leaves nothing running and no rules.
            ct.run("systemctl", "stop", UNIT)
            assert ct.show(UNIT, "Result")["Result"] == "success" and not our_rules(sbx)
            ct.run("systemctl", "start", UNIT)
            ct.run("dpkg", "-r", "imds-agent")
            assert not active(ct) and not our_rules(sbx)


def test_the_rpm_installs_starts_upgrades_and_erases_under_systemd(tmp_path: Path) -> None:
    """The .rpm's scriptlets for real: rpm itself on the same booted Debian root. Debian's python3-psutil and -yaml
    stand in for the RPM distributions' packages, which rpm cannot know about (hence --nodeps)."""
    rpm1 = build("rpm", str(tmp_path), "0.1.0")
    rpm2 = build("rpm", str(tmp_path), "0.1.1")
    with Sandbox() as sbx, overlay_root(systemd_root(), chroot_mounts=False) as root:
        for rpm in (rpm1, rpm2):
            shutil.copy(rpm, root / "root")
        with booted(root, sbx.host_ns, tmp_path / "boot.log") as ct:
            ct.run("rpm", "-i", "--nodeps", f"/root/{os.path.basename(rpm1)}")
            assert ct.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
            assert wait_for(lambda: active(ct), 30), ct.journal(UNIT)
            assert ct.run("imds-agent", "version").stdout.strip() == "imds-agent 0.1.0"
            assert our_rules(sbx) and curl_as_nobody(ct).endswith("\n200")
            assert sbx.emulator_control.counters()["tokenless"] == 0
            assert ct.run("id", "-gn", "imds-agent").stdout.strip() == "imds-agent"

            # Upgrade: restarted on the new version, an edited agent.yaml and the inventory kept.
            config = root / "etc/imds-agent/agent.yaml"
            edited = config.read_text().replace("reconcile_interval: 5", "reconcile_interval: 7")
            assert edited != config.read_text()
            config.write_text(edited)
            pid = ct.show(UNIT, "MainPID")["MainPID"]
            ct.run("rpm", "-U", "--nodeps", f"/root/{os.path.basename(rpm2)}")
            assert ct.run("imds-agent", "version").stdout.strip() == "imds-agent 0.1.1"
            assert wait_for(lambda: active(ct) and ct.show(UNIT, "MainPID")["MainPID"] not in ("0", pid), 20)
            assert config.read_text() == edited and not (root / "etc/imds-agent/agent.yaml.rpmnew").exists()
            assert curl_as_nobody(ct).endswith("\n200")
            assert "/usr/bin/curl" in (root / "var/lib/imds-agent/inventory.json").read_text()

            # Erase: stopped, disabled, no rules, no program files; no byte-code left behind in /usr/share.
            ct.run("rpm", "-e", "imds-agent")
            assert not active(ct) and not our_rules(sbx)
            for path in ("usr/bin/imds-agent", "usr/share/imds-agent", "usr/lib/systemd/system/imds-agent.service"):
                assert not (root / path).exists(), path


def test_the_ssm_documents_under_systemd(tmp_path: Path) -> None:
    """Install, Report, SetMode and Uninstall as SSM Run Command would run them on a booted instance."""
    deb = build("deb", str(tmp_path))
    with Sandbox() as sbx, overlay_root(systemd_root(), chroot_mounts=False) as root:
        shutil.copy(deb, root / "root" / "pkg.deb")

        with booted(root, sbx.host_ns, tmp_path / "boot.log") as ct:

            def step(name: str, **params: str) -> tuple[int, str, str]:
                (root / "root" / f"{name}.sh").write_text(ssm_script(name, **params))
                proc = ct.run("/bin/sh", f"/root/{name}.sh", check=False, timeout=300)
                return proc.returncode, proc.stdout, proc.stderr

            code, out, err = step("Install", PackageSource="file:///root/pkg.deb")
            assert code == 0 and "\nactive\n" in out and "mode: audit" in out, (out, err)

            # curl is not granted the credentials: audit lets it through and records a would-deny, which the
            # agent persists within its save interval (10 s).
            assert curl_as_nobody(ct).endswith("\n200")
            inventory = root / "var/lib/imds-agent/inventory.json"
            assert wait_for(lambda: inventory.exists() and "would-deny" in inventory.read_text(), 15)
            code, out, _ = step("Report", Hours="1")
            rows = {r["exe"]: r for r in json.loads(out)}
            assert code == 0 and rows["/usr/bin/curl"]["would_deny"] >= 1

            code, _, err = step("SetMode", Mode="enforce")
            assert code == 1 and "/usr/bin/curl (uid 65534)" in err
            assert curl_as_nobody(ct).endswith("\n200")  # still auditing
            code, out, err = step("SetMode", Mode="enforce", Force="true")
            assert code == 0 and "reloaded imds-agent.service" in out, err
            assert wait_for(lambda: curl_as_nobody(ct).endswith("\n403"), 10)

            code, out, err = step("Uninstall", Purge="true")
            assert code == 0 and "imds-agent removed" in out, err
            assert not active(ct) and not our_rules(sbx)
            assert curl_as_nobody(ct).endswith("\n401")  # straight to the service, which requires tokens
            for path in ("etc/imds-agent", "var/lib/imds-agent", "usr/bin/imds-agent"):
                assert not (root / path).exists(), path
