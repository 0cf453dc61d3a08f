"""The iptables rule set as data, against golden files, and its iptables-save rendering."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imds_agent.redirect import iptrules
from imds_agent.redirect.base import RedirectSpec

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "ipt_v4v6": RedirectSpec(exempt_uid=990, listen_port=8775),
    "ipt_v4": RedirectSpec(exempt_uid=0, listen_port=9000, with_ipv6=False),
    "ipt_containers": RedirectSpec(
        exempt_uid=990, listen_port=968, container_ifaces=("docker*", "cni0"), container_port=969
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rules_match_golden_file(case: str) -> None:
    got = json.dumps(iptrules.build_rules(CASES[case]), indent=1, sort_keys=True) + "\n"
    path = GOLDEN / f"{case}.json"
    if os.environ.get("IMDS_UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text(), f"{path} differs; IMDS_UPDATE_GOLDEN=1 rewrites it after review"


def test_render_is_iptables_save_syntax() -> None:
    nat, guard = iptrules.build_rules(RedirectSpec(exempt_uid=990, listen_port=8775))["ipv6"]["tables"]
    assert iptrules.render(nat["rules"][0]) == (
        "-A IMDS_AGENT -d fd00:ec2::254/128 -p tcp -m tcp --dport 80 -m owner ! --uid-owner 990 "
        "-m comment --comment imds_agent -j DNAT --to-destination [::1]:8775"
    )
    assert iptrules.render(guard["rules"][0]) == (
        "-A IMDS_AGENT -d fd00:ec2::254/128 -p tcp -m tcp --dport 80 -m owner --socket-exists ! --uid-owner 990 "
        "-m comment --comment imds_agent -j REJECT --reject-with tcp-reset"
    )


def test_the_guard_sits_in_filter_after_the_redirect_in_nat_for_each_family() -> None:
    for spec in CASES.values():
        for data in iptrules.build_rules(spec).values():
            nat, guard = data["tables"]
            assert (nat["table"], guard["table"]) == ("nat", "filter") == iptrules.TABLES
            assert nat["chain"] == guard["chain"] == "IMDS_AGENT" and guard["jump"] == nat["jump"]
            # The guard selects what the redirect selects (from a socket); only the verdict differs.
            (redirect,), (reset,) = nat["rules"], guard["rules"]
            same = ("dst", "protocol", "dport", "uid_owner", "comment")
            assert {k: reset[k] for k in same} == {k: redirect[k] for k in same}
            assert (reset["target"], reset["reject_with"], reset["socket_exists"]) == ("REJECT", "tcp-reset", True)


def test_significant_ignores_counters() -> None:
    rule = iptrules.build_rules(RedirectSpec(exempt_uid=990, listen_port=8775))["ipv4"]["tables"][0]["rules"][0]
    seen = dict(rule, packets=7, bytes=420, target="DNAT")
    assert iptrules.significant(seen) == iptrules.significant(rule)
    assert iptrules.significant(dict(rule, target="REJECT", reject_with="tcp-reset")) != iptrules.significant(rule)


def test_container_rules_read_like_iptables_save() -> None:
    redirect = iptrules.container_rule("169.254.169.254", 32, 80, "docker*", 969)
    assert iptrules.render(redirect, "IMDS_AGENT_IN") == (
        "-A IMDS_AGENT_IN -i docker+ -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -m comment --comment imds_agent "
        "-j REDIRECT --to-ports 969"
    )
    guard = iptrules.container_guard_rule("fd00:ec2::254", 128, 80, "cni0")
    assert iptrules.render(guard, "IMDS_AGENT_FWD").endswith("-j REJECT --reject-with tcp-reset")
    assert "-i cni0 " in iptrules.render(guard, "IMDS_AGENT_FWD")


def test_container_chains_come_only_with_container_interfaces() -> None:
    assert "containers" not in iptrules.build_rules(RedirectSpec(exempt_uid=990, listen_port=968))["ipv4"]
    spec = RedirectSpec(exempt_uid=990, listen_port=968, container_ifaces=("docker*",), container_port=969)
    parts = iptrules.build_rules(spec)["ipv4"]["containers"]
    assert [(p["table"], p["chain"], p["jump"]["from"]) for p in parts] == [
        ("nat", "IMDS_AGENT_IN", "PREROUTING"),
        ("filter", "IMDS_AGENT_FWD", "FORWARD"),
        ("filter", "IMDS_AGENT_LSN", "INPUT"),
    ]
    # Container connections are redirected whatever their uid: a uid inside a container means nothing here.
    assert all("uid_owner" not in r for p in parts for r in p["rules"])
    # The container listener's port, dialled directly rather than through the redirect, is reset.
    assert iptrules.render(parts[2]["rules"][0], "IMDS_AGENT_LSN") == (
        "-A IMDS_AGENT_LSN -d 0.0.0.0/0 -p tcp -m tcp --dport 969 -m conntrack ! --ctstate DNAT "
        "-m comment --comment imds_agent -j REJECT --reject-with tcp-reset"
    )
