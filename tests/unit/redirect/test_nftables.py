"""The nftables backend without a kernel: netlink encoding, the expression round trip, the batch it sends, and the
differences it reports between our table and a spec. No netlink socket is opened: a fake stands in for it."""

from __future__ import annotations

import errno
import struct
from typing import Any, Optional

import pytest
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
    nft_chain_msg,
    nft_rule_msg,
    nft_table_msg,
)

from imds_agent.errors import RedirectError
from imds_agent.redirect import nftrules
from imds_agent.redirect.base import RedirectSpec, State
from imds_agent.redirect.nftables import (
    NFT_TABLE_F_OWNER,
    NftablesBackend,
    _expr_from_netlink,
    _expr_to_netlink,
)

SPEC = RedirectSpec(exempt_uid=990, listen_port=8775)
NFTABLES = 10  # NFNL_SUBSYS_NFTABLES
REQUEST, ACK, CREATE_APPEND = 0x1, 0x4, 0x400 | 0x800


def decoded(cls: Any, data: bytes) -> Any:
    msg = cls(data)
    msg.decode()
    return msg


def rule_message(exprs: list[Any], backend: Optional[NftablesBackend] = None, chain: str = nftrules.CHAIN) -> Any:
    """A rule as the kernel would report it: encoded by the backend, decoded by pyroute2."""
    expressions = [_expr_to_netlink(name, attrs) for name, attrs in exprs]
    attrs = [
        ("NFTA_RULE_TABLE", nftrules.TABLE),
        ("NFTA_RULE_CHAIN", chain),
        ("NFTA_RULE_EXPRESSIONS", expressions),
    ]
    return decoded(nft_rule_msg, (backend or NftablesBackend())._encode(nft_rule_msg, NFT_MSG_NEWRULE, attrs, 0))


def chain_message(
    kind: str = "nat", priority: int = nftrules.PRIORITY, name: str = nftrules.CHAIN, hooknum: int = 3
) -> Any:
    hook = {"attrs": [("NFTA_HOOK_HOOKNUM", hooknum), ("NFTA_HOOK_PRIORITY", priority)]}
    attrs = [
        ("NFTA_CHAIN_TABLE", nftrules.TABLE),
        ("NFTA_CHAIN_NAME", name),
        ("NFTA_CHAIN_HOOK", hook),
        ("NFTA_CHAIN_TYPE", kind),
    ]
    return decoded(nft_chain_msg, NftablesBackend()._encode(nft_chain_msg, NFT_MSG_NEWCHAIN, attrs, 0))


def guard_message(kind: str = "filter", priority: int = nftrules.GUARD_PRIORITY) -> Any:
    return chain_message(kind, priority, nftrules.GUARD_CHAIN)


def our_chains() -> list[Any]:
    """Both chains of our table, as build_ruleset creates them."""
    return [chain_message(), guard_message()]


def all_rule_messages(spec: RedirectSpec) -> list[Any]:
    """Every rule of a table built from ``spec``, as the kernel reports them."""
    return [
        rule_message(exprs, chain=chain)
        for chain, rules in nftrules.expected_chains(spec).items()
        for exprs in rules.values()
    ]


def table_message(flags: int) -> Any:
    attrs = [("NFTA_TABLE_NAME", nftrules.TABLE), ("NFTA_TABLE_FLAGS", flags)]
    return decoded(nft_table_msg, NftablesBackend()._encode(nft_table_msg, NFT_MSG_NEWTABLE, attrs, 0))


# --- encoding -----------------------------------------------------------------------------------------------------


def test_encode_sets_subsystem_type_flags_family_and_a_fresh_sequence_number() -> None:
    backend = NftablesBackend()
    first = backend._encode(nft_table_msg, NFT_MSG_NEWTABLE, [("NFTA_TABLE_NAME", "imds_agent")], ACK)
    second = backend._encode(nft_table_msg, NFT_MSG_DELTABLE, [("NFTA_TABLE_NAME", "imds_agent")], ACK)
    length, msg_type, flags, seq, _ = struct.unpack_from("=IHHII", first)
    assert (length, msg_type, flags, seq) == (len(first), NFTABLES << 8 | NFT_MSG_NEWTABLE, REQUEST | ACK, 1)
    assert struct.unpack_from("=IHHII", second)[1:4] == (NFTABLES << 8 | NFT_MSG_DELTABLE, REQUEST | ACK, 2)
    msg = decoded(nft_table_msg, first)
    assert (msg["nfgen_family"], msg.get_attr("NFTA_TABLE_NAME")) == (1, "imds_agent")  # NFPROTO_INET


def test_batch_marker_is_a_bare_nfgenmsg_addressed_to_nftables() -> None:
    backend = NftablesBackend()
    backend._seq = 6
    # length 20, type BATCH_BEGIN, flags REQUEST, seq 7, pid 0; family AF_UNSPEC, version 0, res_id (big endian)
    assert backend._batch_marker(0x10) == struct.pack("=IHHII", 20, 0x10, REQUEST, 7, 0) + b"\0\0\x00\x0a"
    assert struct.unpack_from("=IHHII", backend._batch_marker(0x11))[1:4] == (0x11, REQUEST, 8)


@pytest.mark.parametrize("chain", [nftrules.CHAIN, nftrules.GUARD_CHAIN])
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_expressions_survive_the_netlink_round_trip(family: str, chain: str) -> None:
    exprs = nftrules.expected_chains(SPEC)[chain][family]
    back = [_expr_from_netlink(e) for e in rule_message(exprs, chain=chain).get_attr("NFTA_RULE_EXPRESSIONS")]
    assert [expr for expr, _ in back] == exprs
    assert [counters for _, counters in back if counters is not None] == [(0, 0)]


def test_reject_is_sent_as_a_tcp_reset_and_read_back_as_one() -> None:
    (_, reject) = nftrules.guard_exprs("ipv4", "169.254.169.254", 80, 990)[-1]
    data = _expr_to_netlink("reject", reject)["attrs"][1][1]["attrs"]
    assert data == [("NFTA_REJECT_TYPE", 1)]  # NFT_REJECT_TCP_RST, not NFT_NAT_DNAT's 1 by accident
    (expr,) = rule_message([["reject", reject]]).get_attr("NFTA_RULE_EXPRESSIONS")
    assert _expr_from_netlink(expr) == (["reject", {"type": "tcp_rst"}], None)
    icmp = {"attrs": [("NFTA_EXPR_NAME", "reject"), ("NFTA_EXPR_DATA", {"attrs": [("NFTA_REJECT_TYPE", 0)]})]}
    attrs = [("NFTA_RULE_TABLE", nftrules.TABLE), ("NFTA_RULE_EXPRESSIONS", [icmp])]
    msg = decoded(nft_rule_msg, NftablesBackend()._encode(nft_rule_msg, NFT_MSG_NEWRULE, attrs, 0))
    (expr,) = msg.get_attr("NFTA_RULE_EXPRESSIONS")
    got = _expr_from_netlink(expr)[0]
    assert got == ["reject", {"type": "icmp_unreach"}]  # another reject is read as what it is, and differs
    assert nftrules.significant([got]) != nftrules.significant([["reject", reject]])


def test_counter_values_come_back_as_packets_then_bytes() -> None:
    values = {"attrs": [("NFTA_COUNTER_BYTES", 4200), ("NFTA_COUNTER_PACKETS", 70)]}
    counter = {"attrs": [("NFTA_EXPR_NAME", "counter"), ("NFTA_EXPR_DATA", values)]}
    attrs = [("NFTA_RULE_TABLE", nftrules.TABLE), ("NFTA_RULE_EXPRESSIONS", [counter])]
    msg = decoded(nft_rule_msg, NftablesBackend()._encode(nft_rule_msg, NFT_MSG_NEWRULE, attrs, 0))
    (expr,) = msg.get_attr("NFTA_RULE_EXPRESSIONS")
    assert _expr_from_netlink(expr) == (["counter", {}], (70, 4200))


def test_kernel_enum_names_map_back_to_the_rule_vocabulary() -> None:
    exprs = nftrules.rule_exprs("ipv6", "fd00:ec2::254", 80, 0, "::1", 9000)
    (_, payload), (_, nat) = exprs[4], exprs[-1]
    data = _expr_to_netlink("payload", payload)["attrs"][1][1]["attrs"]
    assert ("NFTA_PAYLOAD_BASE", 1) in data and ("NFTA_PAYLOAD_OFFSET", 24) in data  # network header, daddr
    data = _expr_to_netlink("nat", nat)["attrs"][1][1]["attrs"]
    assert ("NFTA_NAT_TYPE", 1) in data and ("NFTA_NAT_FAMILY", 10) in data  # NFT_NAT_DNAT, NFPROTO_IPV6


def test_messages_splits_a_buffer_on_aligned_lengths_and_stops_at_a_truncated_header() -> None:
    one = struct.pack("=IHHII", 18, 2, 0, 5, 0) + b"ab"  # 18 bytes, padded to 20 on the wire
    two = struct.pack("=IHHII", 16, 3, 0, 6, 0)
    data = one + b"\0\0" + two + b"\x01\x02"
    assert list(NftablesBackend()._messages(data)) == [(2, 5, one), (3, 6, two)]
    assert list(NftablesBackend()._messages(struct.pack("=IHHII", 4, 2, 0, 1, 0))) == []


# --- the batch ------------------------------------------------------------------------------------------------------


class FakeNetlink:
    """Acknowledges every message of a batch (or refuses one of them with ``refuse=(index, errno)``)."""

    def __init__(self, refuse: Optional[tuple[int, int]] = None):
        self.refuse = refuse
        self.sent: list[tuple[int, int, int, bytes]] = []
        self.answers: list[bytes] = []

    def send(self, data: bytes) -> int:
        offset = 0
        while offset < len(data):
            length, msg_type, flags, seq, _ = struct.unpack_from("=IHHII", data, offset)
            self.sent.append((msg_type, flags, seq, data[offset : offset + length]))
            offset += (length + 3) & ~3
        acks = b""
        for index, (_, _, seq, raw) in enumerate(self.sent[1:-1]):
            code = self.refuse[1] if self.refuse and self.refuse[0] == index else 0
            acks += struct.pack("=IHHII", 36, 2, 0, seq, 0) + struct.pack("=i", -code) + raw[:16]
        self.answers.append(acks)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.answers.pop(0)


def backend_on(sock: FakeNetlink) -> NftablesBackend:
    backend = NftablesBackend()
    backend._sock = sock  # type: ignore[assignment]
    return backend


def test_apply_sends_one_batch_replacing_the_table() -> None:
    sock = FakeNetlink()
    backend_on(sock).apply(SPEC, owned=True)
    kinds = [(msg_type & 0xFF if msg_type >> 8 else msg_type) for msg_type, _, _, _ in sock.sent]
    new_table, del_table, new_chain, new_rule = NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE
    assert kinds == [0x10, new_table, del_table, new_table, new_chain, new_rule, new_rule, new_chain, new_rule,
                     new_rule, 0x11]  # fmt: skip
    assert len({seq for _, _, seq, _ in sock.sent}) == len(sock.sent)
    assert all(flags & ACK for _, flags, _, _ in sock.sent[1:-1])
    first, owned = (decoded(nft_table_msg, sock.sent[i][3]) for i in (1, 3))
    assert first.get_attr("NFTA_TABLE_FLAGS") is None and owned.get_attr("NFTA_TABLE_FLAGS") == NFT_TABLE_F_OWNER
    chains = [decoded(nft_chain_msg, sock.sent[i][3]) for i in (4, 7)]
    assert [
        (c.get_attr("NFTA_CHAIN_NAME"), c.get_attr("NFTA_CHAIN_TYPE"),
         c.get_attr("NFTA_CHAIN_HOOK").get_attr("NFTA_HOOK_PRIORITY"))
        for c in chains
    ] == [("output", "nat", nftrules.PRIORITY), ("guard", "filter", 0)]  # fmt: skip
    for chain, indexes in ((nftrules.CHAIN, (5, 6)), (nftrules.GUARD_CHAIN, (8, 9))):
        rules = [decoded(nft_rule_msg, sock.sent[i][3]) for i in indexes]
        assert {r.get_attr("NFTA_RULE_CHAIN") for r in rules} == {chain}
        got = [[_expr_from_netlink(e)[0] for e in r.get_attr("NFTA_RULE_EXPRESSIONS")] for r in rules]
        assert got == list(nftrules.expected_chains(SPEC)[chain].values())


def test_an_unowned_table_is_created_without_the_owner_flag() -> None:
    sock = FakeNetlink()
    backend_on(sock).apply(SPEC, owned=False)
    assert decoded(nft_table_msg, sock.sent[3][3]).get_attr("NFTA_TABLE_FLAGS") is None


def test_a_refused_operation_is_named_in_the_error() -> None:
    sock = FakeNetlink(refuse=(3, errno.EPERM))  # the chain
    with pytest.raises(
        RedirectError, match=r"refused at add chain output \(nat\): Operation not permitted \(needs CAP_NET_ADMIN"
    ):
        backend_on(sock).apply(SPEC, owned=True)


def test_a_kernel_without_reject_is_named_when_the_guard_is_refused() -> None:
    sock = FakeNetlink(refuse=(7, errno.ENOENT))  # the guard's ipv4 rule
    with pytest.raises(
        RedirectError, match=r"refused at add rule ipv4 in guard \(reject with tcp reset: nft_reject_inet\): No such"
    ):
        backend_on(sock).apply(SPEC, owned=True)


# --- differences ----------------------------------------------------------------------------------------------------


def installed(spec: RedirectSpec) -> list[tuple[str, str, list[Any]]]:
    """What the kernel reports for a table built from ``spec``: (chain, rule key, rule) read back through netlink."""
    out = []
    for chain, rules in nftrules.expected_chains(spec).items():
        for exprs in rules.values():
            msg = rule_message(exprs, chain=chain)
            back = [_expr_from_netlink(e)[0] for e in msg.get_attr("NFTA_RULE_EXPRESSIONS")]
            out.append((msg.get_attr("NFTA_RULE_CHAIN"), nftrules.rule_key(back), back))
    return out


def differences(chains: list[Any], rules: list[tuple[str, str, list[Any]]], spec: RedirectSpec = SPEC) -> list[str]:
    return NftablesBackend._differences(spec, chains, rules)


def test_a_table_built_from_the_spec_has_no_differences() -> None:
    assert differences(our_chains(), installed(SPEC)) == []


def test_attributes_the_kernel_adds_are_not_differences() -> None:
    rules = installed(SPEC)
    for chain, _, exprs in rules:
        if chain == nftrules.CHAIN:
            exprs[-1][1]["flags"] = 2  # NF_NAT_RANGE_MAP_IPS, reported by the kernel
    assert differences(our_chains(), rules) == []


def test_missing_chains_are_reported() -> None:
    other = chain_message(name="input")
    assert differences([other], installed(SPEC)) == [
        "chain output is missing",
        "chain guard is missing",
        "chain input is not wanted",
    ]
    assert differences([chain_message()], installed(SPEC)) == ["chain guard is missing"]


@pytest.mark.parametrize("chain", [chain_message(kind="filter"), chain_message(priority=-100)], ids=["type", "prio"])
def test_a_chain_of_the_wrong_type_or_priority_is_reported(chain: Any) -> None:
    assert differences([chain, guard_message()], installed(SPEC)) == [
        "chain output is not a nat chain on output at priority -150"
    ]


@pytest.mark.parametrize("guard", [guard_message(kind="nat"), guard_message(priority=-200)], ids=["type", "prio"])
def test_a_guard_chain_of_the_wrong_type_or_priority_is_reported(guard: Any) -> None:
    # Before the nat chains, the guard would reject every connection, redirected or not.
    assert differences([chain_message(), guard], installed(SPEC)) == [
        "chain guard is not a filter chain on output at priority 0"
    ]


def test_a_missing_rule_is_reported() -> None:
    no_v6 = [r for r in installed(SPEC) if r[:2] != (nftrules.CHAIN, "ipv6")]
    assert differences(our_chains(), no_v6) == ["ipv6 rule is missing"]


def test_a_missing_guard_rule_is_reported() -> None:
    no_guard_v4 = [r for r in installed(SPEC) if r[:2] != (nftrules.GUARD_CHAIN, "ipv4")]
    assert differences(our_chains(), no_guard_v4) == ["ipv4 guard rule is missing"]
    nat_only = [r for r in installed(SPEC) if r[0] == nftrules.CHAIN]
    assert differences(our_chains(), nat_only) == ["ipv4 guard rule is missing", "ipv6 guard rule is missing"]


def test_a_changed_rule_is_reported_with_both_versions() -> None:
    other = [r for r in installed(RedirectSpec(exempt_uid=0, listen_port=8775)) if r[:2] == (nftrules.CHAIN, "ipv4")]
    rules = [r for r in installed(SPEC) if r[:2] != (nftrules.CHAIN, "ipv4")] + other
    (detail,) = differences(our_chains(), rules)
    assert detail.startswith("ipv4 rule differs: has '")
    assert "meta skuid != 0 " in detail and "wants '" in detail and "meta skuid != 990 " in detail


@pytest.mark.parametrize(
    ("index", "attrs", "seen"),
    [(-1, {"type": "icmp_unreach"}, "reject icmp_unreach"), (-3, {"sreg": 1, "op": "eq"}, "meta skuid 990")],
    ids=["reject", "uid"],
)
def test_a_changed_guard_rule_is_reported_with_both_versions(index: int, attrs: dict[str, Any], seen: str) -> None:
    rules = installed(SPEC)
    ((_, _, exprs),) = [r for r in rules if r[:2] == (nftrules.GUARD_CHAIN, "ipv6")]
    exprs[index][1].update(attrs)
    (detail,) = differences(our_chains(), rules)
    assert detail.startswith("ipv6 guard rule differs: has '") and seen in detail
    assert detail.endswith("wants 'meta l4proto tcp ip6 daddr fd00:ec2::254 tcp dport 80 meta skuid != 990 counter "
                           "reject with tcp reset'")  # fmt: skip


def test_a_doubled_rule_is_reported() -> None:
    rules = installed(SPEC)
    assert differences(our_chains(), rules + rules[:1]) == ["ipv4 rule is installed 2 times"]
    guard = [r for r in rules if r[0] == nftrules.GUARD_CHAIN]
    assert differences(our_chains(), rules + guard[1:]) == ["ipv6 guard rule is installed 2 times"]


def test_a_rule_the_spec_does_not_want_is_reported() -> None:
    v4_spec = RedirectSpec(exempt_uid=990, listen_port=8775, with_ipv6=False)
    assert differences(our_chains(), installed(SPEC), v4_spec) == [
        "unexpected rules for ipv6",
        "unexpected guard rules for ipv6",
    ]


# --- check ----------------------------------------------------------------------------------------------------------


def backend_listing(table: Optional[Any], chains: list[Any], rules: list[Any]) -> NftablesBackend:
    """A backend whose kernel listings return these messages."""
    backend = NftablesBackend()
    listings = {nft_table_msg: [table] if table is not None else [], nft_chain_msg: chains, nft_rule_msg: rules}
    backend._dump = lambda cls, msg_type, attrs: listings[cls]  # type: ignore[method-assign]
    return backend


def test_check_without_our_table_is_absent() -> None:
    result = backend_listing(None, [], []).check(SPEC)
    assert (result.state, result.details) == (State.ABSENT, ("table inet imds_agent is missing",))


def test_check_reads_rules_back_with_their_counters_and_ownership() -> None:
    result = backend_listing(table_message(NFT_TABLE_F_OWNER), our_chains(), all_rule_messages(SPEC)).check(SPEC)
    assert (result.state, result.details, result.owned) == (State.PRESENT, (), True)
    assert [(r.family, r.packets, r.bytes) for r in result.rules] == [("ipv4", 0, 0), ("ipv6", 0, 0)] * 2
    assert result.rules[0].text == (
        "meta l4proto tcp ip daddr 169.254.169.254 tcp dport 80 meta skuid != 990 counter dnat ip to 127.0.0.1:8775"
    )
    assert result.rules[3].text == (
        "meta l4proto tcp ip6 daddr fd00:ec2::254 tcp dport 80 meta skuid != 990 counter reject with tcp reset"
    )


def test_check_of_a_partial_table_is_partial() -> None:
    rules = [rule_message(nftrules.expected_rules(SPEC)["ipv4"])] + all_rule_messages(SPEC)[2:]
    result = backend_listing(table_message(0), our_chains(), rules).check(SPEC)
    assert (result.state, result.details, result.owned) == (State.PARTIAL, ("ipv6 rule is missing",), False)


def test_check_without_the_guard_is_partial() -> None:
    """A table an older agent (or an administrator) left with the redirect alone is repaired, not accepted."""
    rules = all_rule_messages(SPEC)[:2]
    result = backend_listing(table_message(0), [chain_message()], rules).check(SPEC)
    assert (result.state, result.details) == (State.PARTIAL, ("chain guard is missing",))


def test_table_ownership_is_probed_once_and_both_answers_are_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels before 5.12 (Amazon Linux 2, RHEL 8) refuse NFT_TABLE_F_OWNER: fail-open then needs the guardian."""
    sent: list[list[str]] = []

    def accepts(self: NftablesBackend, ops: list[tuple[str, bytes]]) -> None:
        sent.append([what for what, _ in ops])

    def refuses(self: NftablesBackend, ops: list[tuple[str, bytes]]) -> None:
        sent.append([what for what, _ in ops])
        raise RedirectError("nftables transaction refused at owned probe table: Operation not supported")

    monkeypatch.setattr(NftablesBackend, "_transact", accepts)
    modern = NftablesBackend()
    assert modern.can_own() and modern.can_own()
    assert sent == [["owned probe table", "delete probe table"]]  # created and deleted in one batch, asked once
    sent.clear()
    monkeypatch.setattr(NftablesBackend, "_transact", refuses)
    old = NftablesBackend()
    assert not old.can_own() and not old.can_own()
    assert len(sent) == 1


CONTAINERS = RedirectSpec(
    exempt_uid=990, listen_port=968, container_ifaces=("docker*", "br-*", "cni0"), container_port=969
)


def container_chains() -> list[Any]:
    chains = our_chains()
    for name in (nftrules.PREROUTING_CHAIN, nftrules.FORWARD_GUARD_CHAIN, nftrules.INPUT_GUARD_CHAIN):
        kind, hook, priority = nftrules.CHAINS[name]
        chains.append(chain_message(kind, priority, name, hooknum={"prerouting": 0, "input": 1, "forward": 2}[hook]))
    return chains


def test_container_chains_read_back_through_netlink_have_no_differences() -> None:
    assert differences(container_chains(), installed(CONTAINERS), CONTAINERS) == []


def test_a_missing_interface_rule_is_named() -> None:
    rules = [r for r in installed(CONTAINERS) if r[1] != "ipv4 iifname br-*" or r[0] != nftrules.PREROUTING_CHAIN]
    assert differences(container_chains(), rules, CONTAINERS) == ["ipv4 iifname br-* prerouting rule is missing"]


def test_container_chains_on_the_wrong_hook_are_reported() -> None:
    chains = our_chains() + [
        chain_message("nat", nftrules.PRIORITY, nftrules.PREROUTING_CHAIN, hooknum=3),
        chain_message("filter", 0, nftrules.FORWARD_GUARD_CHAIN, hooknum=2),
        chain_message("filter", 0, nftrules.INPUT_GUARD_CHAIN, hooknum=1),
    ]
    assert differences(chains, installed(CONTAINERS), CONTAINERS) == [
        "chain prerouting is not a nat chain on prerouting at priority -150"
    ]


def test_container_chains_left_after_containers_are_switched_off_are_reported() -> None:
    assert differences(container_chains(), installed(SPEC)) == [
        "chain forward_guard is not wanted",
        "chain input_guard is not wanted",
        "chain prerouting is not wanted",
    ]
