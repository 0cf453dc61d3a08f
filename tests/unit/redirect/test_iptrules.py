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
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rules_match_golden_file(case: str) -> None:
    got = json.dumps(iptrules.build_rules(CASES[case]), indent=1, sort_keys=True) + "\n"
    path = GOLDEN / f"{case}.json"
    if os.environ.get("IMDS_UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text(), f"{path} differs; IMDS_UPDATE_GOLDEN=1 rewrites it after review"


def test_render_is_iptables_save_syntax() -> None:
    rules = iptrules.build_rules(RedirectSpec(exempt_uid=990, listen_port=8775))
    assert iptrules.render(rules["ipv6"]["rules"][0]) == (
        "-A IMDS_AGENT -d fd00:ec2::254/128 -p tcp -m tcp --dport 80 -m owner ! --uid-owner 990 "
        "-m comment --comment imds_agent -j DNAT --to-destination [::1]:8775"
    )


def test_significant_ignores_counters() -> None:
    rule = iptrules.build_rules(RedirectSpec(exempt_uid=990, listen_port=8775))["ipv4"]["rules"][0]
    seen = dict(rule, packets=7, bytes=420, target="DNAT")
    assert iptrules.significant(seen) == iptrules.significant(rule)
