"""The nftables backend in a fresh namespace: real connections, real rules, owner semantics, coexistence."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from imds_agent.redirect.base import RedirectSpec, State
from imds_agent.redirect.nftables import NftablesBackend

from .redirect_checks import PATH_ENV, listeners, run

pytestmark = pytest.mark.privileged
NOBODY = 65534
AGENT_UID = 64001


def ruleset() -> str:
    return run(["nft", "list", "ruleset"])


def test_clients_reach_the_agent_and_the_agent_uid_goes_direct(netns_name: str) -> None:
    with listeners() as ls:
        backend = NftablesBackend()
        try:
            backend.apply(RedirectSpec(exempt_uid=AGENT_UID, listen_port=ls.port), owned=True)
            assert ls.connect_as(NOBODY, "169.254.169.254") == ("agent", ("169.254.169.254", 80))
            assert ls.connect_as(NOBODY, "fd00:ec2::254") == ("agent", ("fd00:ec2::254", 80))
            assert ls.connect_as(AGENT_UID, "169.254.169.254")[0] == "real"
            assert ls.connect_as(AGENT_UID, "fd00:ec2::254")[0] == "real"
            result = backend.check(RedirectSpec(exempt_uid=AGENT_UID, listen_port=ls.port))
            assert result.state is State.PRESENT and result.owned is True
            counts = {(r.family, r.text.endswith("reject with tcp reset")): r.packets for r in result.rules}
            assert counts == {("ipv4", False): 1, ("ipv6", False): 1, ("ipv4", True): 0, ("ipv6", True): 0}
            assert "chain guard" in ruleset() and "reject with tcp reset" in ruleset()
        finally:
            backend.close()
        assert "imds_agent" not in ruleset()  # an owned table goes with its socket


def test_ipv6_can_be_left_alone(netns_name: str) -> None:
    with listeners() as ls:
        backend = NftablesBackend()
        try:
            backend.apply(RedirectSpec(exempt_uid=AGENT_UID, listen_port=ls.port, with_ipv6=False))
            assert ls.connect_as(NOBODY, "169.254.169.254")[0] == "agent"
            assert ls.connect_as(NOBODY, "fd00:ec2::254")[0] == "real"
            assert "ip6 daddr" not in ruleset()
        finally:
            backend.remove()
            backend.close()


def test_apply_is_idempotent_and_repairs_an_admin_flush(netns_name: str) -> None:
    spec = RedirectSpec(exempt_uid=AGENT_UID, listen_port=8775)
    backend = NftablesBackend()
    try:
        backend.apply(spec)
        first = ruleset()
        backend.apply(spec)
        assert ruleset() == first and first.count("dnat ip to") == 1
        run(["nft", "flush", "table", "inet", "imds_agent"])
        result = backend.check(spec)
        assert result.state is State.PARTIAL and any("missing" in d for d in result.details)
        backend.apply(spec)
        assert backend.check(spec).state is State.PRESENT and ruleset() == first
        changed = RedirectSpec(exempt_uid=AGENT_UID + 1, listen_port=8775)
        assert backend.check(changed).state is State.PARTIAL
    finally:
        backend.remove()
        backend.close()


def test_remove_leaves_no_trace_and_never_touches_other_tables(netns_name: str) -> None:
    # Docker-style nat rules, and iptables-nft's tables, exist before us.
    run(["nft", "add", "table", "ip", "nat"])
    run(["nft", "add", "chain", "ip", "nat", "OUTPUT", "{ type nat hook output priority -100; }"])
    run(["nft", "add", "chain", "ip", "nat", "DOCKER"])
    run(["nft", "add", "rule", "ip", "nat", "OUTPUT", "ip", "daddr", "!=", "127.0.0.0/8", "jump", "DOCKER"])
    run(["nft", "add", "rule", "ip", "nat", "DOCKER", "tcp", "dport", "8080", "dnat", "to", "172.17.0.2:80"])
    before = ruleset()
    with listeners() as ls:
        backend = NftablesBackend()
        try:
            backend.apply(RedirectSpec(exempt_uid=AGENT_UID, listen_port=ls.port))
            assert ls.connect_as(NOBODY, "169.254.169.254")[0] == "agent"  # ours runs first (-150)
            assert before.strip() in ruleset()
            assert backend.remove() is True
            assert backend.remove() is False
        finally:
            backend.close()
    assert ruleset() == before


def _apply_in_child(owned: bool) -> subprocess.Popen[str]:
    code = (
        "import sys, time\n"
        "from imds_agent.redirect.nftables import NftablesBackend\n"
        "from imds_agent.redirect.base import RedirectSpec\n"
        "b = NftablesBackend()\n"
        f"b.apply(RedirectSpec(exempt_uid={AGENT_UID}, listen_port=8775), owned={owned})\n"
        "print('applied', flush=True)\n"
        "time.sleep(60)\n"
    )
    env = dict(PATH_ENV, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "applied"
    return proc


@pytest.mark.parametrize(("owned", "survives"), [(True, False), (False, True)])
def test_sigkill_honours_fail_mode(netns_name: str, owned: bool, survives: bool) -> None:
    proc = _apply_in_child(owned)
    assert "imds_agent" in ruleset()
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    time.sleep(0.1)
    assert ("imds_agent" in ruleset()) is survives
    if survives:
        assert NftablesBackend().remove()


def test_an_owned_table_cannot_be_changed_by_anyone_else(netns_name: str) -> None:
    proc = _apply_in_child(True)
    try:
        other = NftablesBackend()
        with pytest.raises(Exception, match="owned by another running agent|Operation not permitted"):
            other.remove()
        assert other.check(RedirectSpec(exempt_uid=AGENT_UID, listen_port=8775)).state is State.PRESENT
        other.close()
    finally:
        proc.kill()
        proc.wait(5)
