"""The iptables backend (legacy xtables) in a fresh namespace: real connections, repair, removal, the guardian."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from imds_agent.redirect.base import RedirectSpec, State
from imds_agent.redirect.iptables import IptablesBackend, legacy_rules_in_use

from .redirect_checks import PATH_ENV, listeners, run

pytestmark = pytest.mark.privileged
NOBODY = 65534
AGENT_UID = 64001


def dump() -> str:
    """Both families' legacy nat tables without comments and counters, then every rule in any table, sorted.

    (Probing loads empty built-in tables such as raw or security; they hold nothing, so only rules are compared
    outside nat.)
    """
    nat = run(["iptables-legacy-save", "-t", "nat"]) + run(["ip6tables-legacy-save", "-t", "nat"])
    everything = run(["iptables-legacy-save"]) + run(["ip6tables-legacy-save"])
    lines = [re.sub(r" \[\d+:\d+\]$", "", line) for line in nat.splitlines() if not line.startswith("#") and line]
    rules = sorted(line for line in everything.splitlines() if line.startswith("-A"))
    return "\n".join(lines + ["== all rules =="] + rules)


def test_clients_reach_the_agent_and_the_agent_uid_goes_direct(netns_name: str) -> None:
    backend = IptablesBackend()
    assert backend.is_supported(), backend.unsupported_reason()
    with listeners() as ls:
        spec = RedirectSpec(exempt_uid=AGENT_UID, listen_port=ls.port)
        backend.apply(spec)
        try:
            assert ls.connect_as(NOBODY, "169.254.169.254") == ("agent", ("169.254.169.254", 80))
            assert ls.connect_as(NOBODY, "fd00:ec2::254") == ("agent", ("fd00:ec2::254", 80))
            assert ls.connect_as(AGENT_UID, "169.254.169.254")[0] == "real"
            assert ls.connect_as(AGENT_UID, "fd00:ec2::254")[0] == "real"
            result = backend.check(spec)
            assert result.state is State.PRESENT, result.details
            counts = {(r.family, r.text.split(" ")[1]): r.packets for r in result.rules}
            assert counts == {("ipv4", "nat"): 1, ("ipv6", "nat"): 1, ("ipv4", "filter"): 0, ("ipv6", "filter"): 0}
        finally:
            backend.remove()


def test_idempotent_apply_repair_and_clean_removal_next_to_docker_rules(netns_name: str) -> None:
    # Docker's usual legacy nat rules exist first.
    run(["iptables-legacy", "-t", "nat", "-N", "DOCKER"])
    run(["iptables-legacy", "-t", "nat", "-A", "OUTPUT", "!", "-d", "127.0.0.0/8", "-m", "addrtype",
         "--dst-type", "LOCAL", "-j", "DOCKER"])  # fmt: skip
    run(["iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "-j", "MASQUERADE"])
    assert legacy_rules_in_use()
    before = dump()
    backend = IptablesBackend()
    spec = RedirectSpec(exempt_uid=AGENT_UID, listen_port=8775)
    backend.apply(spec)
    first = dump()
    backend.apply(spec)
    nat = first.split("== all rules ==")[0]
    assert dump() == first and nat.count("-j IMDS_AGENT") == 2  # one jump per family
    assert nat.index("-j IMDS_AGENT") < nat.index("-j DOCKER")  # ours comes first in OUTPUT
    run(["iptables-legacy", "-t", "nat", "-F", "IMDS_AGENT"])
    result = backend.check(spec)
    assert result.state is State.PARTIAL and any("ipv4 rules differ" in d for d in result.details)
    run(["ip6tables-legacy", "-t", "nat", "-D", "OUTPUT", "-m", "comment", "--comment", "imds_agent", "-j",
         "IMDS_AGENT"])  # fmt: skip
    assert any("ipv6 jump from OUTPUT is missing" in d for d in backend.check(spec).details)
    backend.apply(spec)
    assert backend.check(spec).state is State.PRESENT and dump() == first
    run(["ip6tables-legacy", "-F", "IMDS_AGENT"])  # the guard's rules, in the filter table
    assert "ipv6 filter rules differ: has 0" in "; ".join(backend.check(spec).details)
    run(["iptables-legacy", "-D", "OUTPUT", "-m", "comment", "--comment", "imds_agent", "-j", "IMDS_AGENT"])
    assert "ipv4 filter jump from OUTPUT is missing" in backend.check(spec).details
    backend.apply(spec)
    assert backend.check(spec).state is State.PRESENT and dump() == first
    assert first.count("-j REJECT --reject-with tcp-reset") == 2
    assert backend.remove() is True
    assert backend.remove() is False
    assert dump() == before
    assert backend.check(spec).state is State.ABSENT


def test_ipv6_off_leaves_ip6tables_alone(netns_name: str) -> None:
    backend = IptablesBackend()
    backend.apply(RedirectSpec(exempt_uid=AGENT_UID, listen_port=8775))
    backend.apply(RedirectSpec(exempt_uid=AGENT_UID, listen_port=8775, with_ipv6=False))
    assert "IMDS_AGENT" not in run(["ip6tables-legacy-save"])
    assert "IMDS_AGENT" in run(["iptables-legacy-save"])
    backend.remove()


def _agent_with_guardian() -> subprocess.Popen[str]:
    code = (
        "import time\n"
        "from imds_agent.redirect.guardian import start_guardian\n"
        "from imds_agent.redirect.iptables import IptablesBackend\n"
        "from imds_agent.redirect.base import RedirectSpec\n"
        "g = start_guardian('iptables')\n"
        f"IptablesBackend().apply(RedirectSpec(exempt_uid={AGENT_UID}, listen_port=8775))\n"
        "print('applied', flush=True)\n"
        "import sys\n"
        "if sys.stdin.readline().strip() == 'clean':\n"
        "    g.stop()\n"
        "    print('stopped', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = dict(PATH_ENV, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "applied"
    return proc


def test_guardian_removes_the_rules_when_the_agent_is_killed(netns_name: str) -> None:
    proc = _agent_with_guardian()
    assert "IMDS_AGENT" in run(["iptables-legacy-save"])
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    deadline = time.monotonic() + 10
    while "IMDS_AGENT" in run(["iptables-legacy-save"]) + run(["ip6tables-legacy-save"]):
        assert time.monotonic() < deadline, "the guardian did not remove the rules within 10 s"
        time.sleep(0.1)
    assert "IMDS_AGENT" not in run(["iptables-legacy-save"]) + run(["ip6tables-legacy-save"])


def test_guardian_leaves_the_rules_after_a_clean_goodbye(netns_name: str) -> None:
    proc = _agent_with_guardian()
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("clean\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "stopped"
    proc.kill()
    proc.wait(5)
    time.sleep(0.5)
    assert "IMDS_AGENT" in run(["iptables-legacy-save"])
    IptablesBackend().remove()
