"""The agent as a process in the sandbox, for each backend: interception, repair, fail_mode, the rules commands."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import pytest

from imds_agent.sandbox.agentproc import AGENT_UID, AgentProcess
from imds_agent.sandbox.netns import Sandbox, wait_for

from .capsets import held_caps

pytestmark = pytest.mark.privileged
NOBODY = 65534
V4 = "http://169.254.169.254/latest/meta-data/instance-id"
V6 = "http://[fd00:ec2::254]/latest/meta-data/instance-id"


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


def curl(sbx: Sandbox, url: str, uid: int = NOBODY) -> str:
    return sbx.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", url], uid=uid).stdout


def proc_status(agent: AgentProcess) -> dict[str, str]:
    assert agent.proc is not None
    with open(f"/proc/{agent.proc.pid}/status", encoding="ascii") as fh:
        return dict(line.rstrip("\n").split(":\t", 1) for line in fh)


def rules_state(agent: AgentProcess) -> dict[str, object]:
    doc: dict[str, object] = json.loads(agent.cli("rules", "show", "--json", check=True).stdout)
    return doc


def flush(sbx: Sandbox, backend: str) -> None:
    if backend == "nftables":
        sbx.run(["nft", "flush", "table", "inet", "imds_agent"], check=True)
    else:
        sbx.run(["iptables-legacy", "-t", "nat", "-F", "IMDS_AGENT"], check=True)


@pytest.mark.parametrize(
    ("backend", "fail_mode"), [("nftables", "closed"), ("iptables", "open"), ("iptables", "closed")]
)
def test_interception_and_repair(sbx: Sandbox, backend: str, fail_mode: str) -> None:
    agent = AgentProcess(sbx, backend=backend, fail_mode=fail_mode, reconcile_interval=0.5).start()
    try:
        assert curl(sbx, V4) == "200" and curl(sbx, V6) == "200"
        assert curl(sbx, V4, uid=AGENT_UID) == "401"  # the agent's own uid is not redirected
        assert sbx.emulator_control.counters()["tokenless"] == 1  # that one request, nothing else
        assert rules_state(agent)["state"] == "present"
        flush(sbx, backend)
        assert wait_for(lambda: "re-applying" in agent.log() and rules_state(agent)["state"] == "present", 10)
        assert "repaired (1 repairs so far)" in agent.log()
        assert curl(sbx, V4) == "200"
    finally:
        assert agent.stop() == 0
    assert rules_state(agent)["state"] == ("absent" if fail_mode == "open" else "present")


def test_an_owned_nftables_table_cannot_be_flushed_by_others(sbx: Sandbox) -> None:
    agent = AgentProcess(sbx, backend="nftables", fail_mode="open").start()
    try:
        proc = sbx.run(["nft", "flush", "table", "inet", "imds_agent"])
        assert proc.returncode != 0 and "Operation not permitted" in proc.stderr
        sbx.run(["nft", "flush", "ruleset"], check=True)  # skips tables owned by a running process
        assert rules_state(agent)["state"] == "present" and curl(sbx, V4) == "200"
    finally:
        agent.stop()


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_sigkill_honours_fail_mode(sbx: Sandbox, backend: str, fail_mode: str) -> None:
    agent = AgentProcess(sbx, backend=backend, fail_mode=fail_mode).start()
    assert curl(sbx, V4) == "200"
    agent.stop(signal.SIGKILL)
    if fail_mode == "open":
        # Nothing redirects any more: clients reach the service directly (which refuses IMDSv1).
        assert wait_for(lambda: rules_state(agent)["state"] == "absent", 10)
        assert curl(sbx, V4) == "401"
    else:
        assert rules_state(agent)["state"] == "present"
        assert curl(sbx, V4) == "000"  # connection refused: nobody listens where the rules point
        assert curl(sbx, V4, uid=AGENT_UID) == "401"  # the agent's uid still reaches the service
        assert agent.cli("rules", "remove").returncode == 0
        assert rules_state(agent)["state"] == "absent"


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_rules_commands_are_idempotent(sbx: Sandbox, backend: str) -> None:
    agent = AgentProcess(sbx, backend=backend)
    before = sbx.run(["nft", "list", "ruleset"], check=True).stdout
    for _ in range(2):
        out = agent.cli("rules", "apply")
        assert out.returncode == 0 and "present" in out.stdout, out.stderr
    shown = agent.cli("rules", "show").stdout
    assert f"backend: {backend}" in shown and "state: present" in shown and "persistent" in shown
    assert "skuid != 64001" in shown or "--uid-owner 64001" in shown
    for _ in range(2):
        assert agent.cli("rules", "remove").returncode == 0
    assert rules_state(agent)["state"] == "absent"
    assert sbx.run(["nft", "list", "ruleset"], check=True).stdout == before


def test_unknown_user_and_bad_backend_are_clear_errors(sbx: Sandbox) -> None:
    agent = AgentProcess(sbx)
    with open(agent.config, "a", encoding="utf-8") as fh:
        fh.write("")
    bad_user = AgentProcess(sbx)
    with open(bad_user.config, encoding="utf-8") as fh:
        text = fh.read().replace(f"user: '{AGENT_UID}'", "user: no-such-user-here")
    with open(bad_user.config, "w", encoding="utf-8") as fh:
        fh.write(text)
    proc = bad_user.cli("audit")
    assert proc.returncode == 78 and "user 'no-such-user-here' does not exist" in proc.stderr
    with open(bad_user.config, "w", encoding="utf-8") as fh:
        fh.write(text.replace("user: no-such-user-here", "user: '64001'").replace("backend: auto", "backend: pf"))
    proc = bad_user.cli("check-config")
    assert proc.returncode == 78 and "redirect.backend" in proc.stderr and ":3:" in proc.stderr


def test_runs_directly_as_its_user_with_ambient_capabilities(sbx: Sandbox) -> None:
    """What the systemd unit does: User=imds-agent plus AmbientCapabilities; no root at any point."""
    agent = AgentProcess(sbx, backend="nftables")
    for sub in ("audit", "state"):
        os.makedirs(os.path.join(sbx.workdir, sub))
        os.chown(os.path.join(sbx.workdir, sub), AGENT_UID, AGENT_UID)
    caps = "+net_admin,+net_raw,+sys_ptrace,+dac_read_search,+net_bind_service"
    agent.prefix = ["setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}", "--clear-groups",
                    f"--inh-caps={caps}", f"--ambient-caps={caps}"]  # fmt: skip
    agent.start()
    try:
        assert curl(sbx, V4) == "200" and curl(sbx, V6) == "200"
        assert sbx.emulator_control.counters()["tokenless"] == 0
        assert "running without" not in agent.log()  # it holds every capability it wants
        status = proc_status(agent)
        # Given CAP_NET_RAW and CAP_NET_BIND_SERVICE too, as the unit does: the nftables backend has no use for
        # the first, and the second is given up once the listener is bound.
        for key in ("CapEff", "CapPrm", "CapAmb"):
            assert held_caps(status[key]) == {"net_admin", "sys_ptrace", "dac_read_search"}, key
    finally:
        assert agent.stop() == 0
    with open(os.path.join(sbx.workdir, "audit", "audit.jsonl"), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    assert records and all(r["exe"] == "/usr/bin/curl" and r["uid"] == NOBODY for r in records)
    assert rules_state(agent)["state"] == "absent"


@pytest.mark.parametrize("backend", ["nftables", "iptables"])
def test_started_as_root_it_keeps_only_what_its_backend_needs(sbx: Sandbox, backend: str) -> None:
    agent = AgentProcess(sbx, backend=backend).start()
    try:
        status = proc_status(agent)
        assert status["Uid"].split() == [str(AGENT_UID)] * 4 and status["NoNewPrivs"] == "1"
        wanted = {"net_admin", "sys_ptrace", "dac_read_search"} | ({"net_raw"} if backend == "iptables" else set())
        for key in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
            assert held_caps(status[key]) == wanted, key
        assert curl(sbx, V4) == "200"
    finally:
        assert agent.stop() == 0


def test_ipv6_only_upstream(sbx: Sandbox) -> None:
    """On an IPv6-only instance the agent reaches the service at [fd00:ec2::254]; clients may use either address."""
    agent = AgentProcess(sbx, extra="upstream: {via: ipv6}\n").start()
    try:
        assert curl(sbx, V4) == "200" and curl(sbx, V6) == "200"
        assert sbx.emulator_control.counters()["tokenless"] == 0
    finally:
        agent.stop()


def test_a_host_with_ipv6_switched_off_gets_the_ipv4_redirect_only(sbx: Sandbox) -> None:
    for scope in ("all", "default", "lo"):
        sbx.run(["sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1"], check=True)
    agent = AgentProcess(sbx, backend="nftables").start()  # the default listen addresses include ::1
    try:
        assert curl(sbx, V4) == "200"
        assert "IPv6 is disabled on this host: not listening on [::1]" in agent.log()
        assert "requests to [fd00:ec2::254] are not redirected" in agent.log()
        shown = agent.cli("rules", "show").stdout
        assert "state: present" in shown and "ip daddr 169.254.169.254" in shown and "fd00:ec2::254" not in shown
    finally:
        assert agent.stop() == 0
