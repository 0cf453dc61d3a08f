"""The nftables rule set as data, against golden files; comparison and rendering helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from imds_agent.redirect import nftrules
from imds_agent.redirect.base import RedirectSpec

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "nft_v4v6_owned": (RedirectSpec(exempt_uid=990, listen_port=8775), True),
    "nft_v4_persistent": (RedirectSpec(exempt_uid=0, listen_port=9000, with_ipv6=False), False),
    "nft_containers": (
        RedirectSpec(exempt_uid=990, listen_port=968, container_ifaces=("docker*", "cni0"), container_port=969),
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ruleset_matches_golden_file(case: str) -> None:
    spec, owned = CASES[case]
    got = json.dumps(nftrules.build_ruleset(spec, owned), indent=1, sort_keys=True) + "\n"
    path = GOLDEN / f"{case}.json"
    if os.environ.get("IMDS_UPDATE_GOLDEN"):
        path.write_text(got)
    assert got == path.read_text(), f"{path} differs; IMDS_UPDATE_GOLDEN=1 rewrites it after review"


def test_transaction_shape_is_idempotent_by_construction() -> None:
    ops = nftrules.build_ruleset(RedirectSpec(exempt_uid=990, listen_port=8775), owned=True)
    assert [(o["op"], o["object"]) for o in ops[:3]] == [("add", "table"), ("delete", "table"), ("add", "table")]
    assert ops[2]["flags"] == ["owner"] and ops[0]["flags"] == []


def test_render_reads_like_nft() -> None:
    exprs = nftrules.rule_exprs("ipv6", "fd00:ec2::254", 80, 990, "::1", 8775)
    assert nftrules.render(exprs) == (
        "meta l4proto tcp ip6 daddr fd00:ec2::254 tcp dport 80 meta skuid != 990 counter dnat ip6 to [::1]:8775"
    )
    assert nftrules.rule_family(exprs) == "ipv6"


def test_significant_ignores_what_the_kernel_adds() -> None:
    exprs = nftrules.rule_exprs("ipv4", "169.254.169.254", 80, 990, "127.0.0.1", 8775)
    kernel = [[n, dict(a, **({"reg_addr_max": 1, "flags": "x"} if n == "nat" else {}))] for n, a in exprs]
    assert nftrules.significant(kernel) == nftrules.significant(exprs)
    other = nftrules.rule_exprs("ipv4", "169.254.169.254", 80, 991, "127.0.0.1", 8775)
    assert nftrules.significant(other) != nftrules.significant(exprs)


def test_the_guard_rejects_what_the_redirect_missed_after_every_nat_chain() -> None:
    spec = RedirectSpec(exempt_uid=990, listen_port=8775)
    ops = nftrules.build_ruleset(spec, owned=True)
    chains = [(o["name"], o["type"], o["hook"], o["priority"]) for o in ops if o["object"] == "chain"]
    assert chains == [("output", "nat", "output", -150), ("guard", "filter", "output", 0)]
    guard = [o for o in ops if o["object"] == "rule" and o["chain"] == "guard"]
    assert [(o["family"], o["comment"]) for o in guard] == [("ipv4", "imds_agent"), ("ipv6", "imds_agent")]
    assert [nftrules.render(o["expr"]) for o in guard] == [
        "meta l4proto tcp ip daddr 169.254.169.254 tcp dport 80 meta skuid != 990 counter reject with tcp reset",
        "meta l4proto tcp ip6 daddr fd00:ec2::254 tcp dport 80 meta skuid != 990 counter reject with tcp reset",
    ]
    # The guard selects exactly what the redirect selects; only the verdict differs.
    redirect = nftrules.expected_rules(spec)
    for family, exprs in nftrules.expected_guard(spec).items():
        assert exprs[:-1] == redirect[family][:-3] and exprs[-1] == ["reject", {"type": "tcp_rst"}]
    v4_only = nftrules.expected_chains(RedirectSpec(exempt_uid=990, listen_port=8775, with_ipv6=False))
    assert {chain: sorted(rules) for chain, rules in v4_only.items()} == {"output": ["ipv4"], "guard": ["ipv4"]}


def test_container_redirect_reads_like_nft() -> None:
    exprs = nftrules.container_exprs("ipv4", "169.254.169.254", 80, "docker*", 969)
    assert nftrules.render(exprs) == (
        'iifname "docker*" meta l4proto tcp ip daddr 169.254.169.254 tcp dport 80 counter redirect to :969'
    )
    assert nftrules.rule_key(exprs) == "ipv4 iifname docker*"
    exact = nftrules.container_exprs("ipv6", "fd00:ec2::254", 80, "cni0", 969)
    assert nftrules.rule_key(exact) == "ipv6 iifname cni0"
    assert 'iifname "cni0"' in nftrules.render(exact)


def test_an_exact_interface_name_is_not_a_prefix() -> None:
    # "docker0" must not also match "docker01": the name is compared with its terminating NUL.
    assert nftrules.ifname_bytes("docker0") == b"docker0\0"
    assert nftrules.ifname_bytes("docker*") == b"docker"


def test_container_chains_come_only_with_container_interfaces() -> None:
    plain = nftrules.expected_chains(RedirectSpec(exempt_uid=990, listen_port=968))
    assert set(plain) == {nftrules.CHAIN, nftrules.GUARD_CHAIN}
    spec = RedirectSpec(exempt_uid=990, listen_port=968, container_ifaces=("docker*",), container_port=969)
    chains = nftrules.expected_chains(spec)
    assert set(chains[nftrules.PREROUTING_CHAIN]) == {"ipv4 iifname docker*", "ipv6 iifname docker*"}
    # Container connections are redirected whatever their uid: the uid inside a container means nothing here.
    assert all("skuid" not in nftrules.render(e) for e in chains[nftrules.PREROUTING_CHAIN].values())
    assert all(e[-1][0] == "reject" for e in chains[nftrules.FORWARD_GUARD_CHAIN].values())


def test_the_listener_guard_resets_what_no_redirect_translated() -> None:
    exprs = nftrules.listener_guard_exprs("ipv4", 969)
    assert nftrules.render(exprs) == "meta l4proto tcp tcp dport 969 ct status ! dnat counter reject with tcp reset"
    assert nftrules.rule_key(exprs) == "ipv4"
