"""The nftables rule set as plain data: built from a RedirectSpec, compared, and rendered for operators.

Pure functions only, tested against golden files; nftables.py turns this data into one netlink batch. A rule is a
list of expressions in the kernel's own vocabulary (meta, cmp, payload, counter, immediate, nat, reject) with byte
values in hex, so that what we send and what the kernel reports back compare directly.

The table holds two chains on the output hook:

- ``output`` (nat, priority -150): the redirect, DNAT to the listener for every uid but the agent's.
- ``guard`` (filter, priority 0): NAT rules are consulted only for a connection's first packet, so a connection
  conntrack does not see as new is never redirected: one opened while the agent was down (fail_mode open removes
  the rules) and used after it is back, or one whose SYN matches an entry of the agent's own (a squatted source
  port). The filter hook runs after nat output, so a redirected packet already carries the listener's address and
  does not match here; any packet still addressed to the metadata service from another uid went round the
  redirect, and is rejected with a TCP reset. Reset, not drop: a client holding such a connection fails at once
  and its retry opens a new connection, which the redirect catches.

With container interfaces in the spec, two more chains catch connections from containers with network namespaces
of their own, where they enter the host (they never pass the output hook):

- ``prerouting`` (nat, priority -150, before Docker's and kube-proxy's DNAT at -100): ``iifname "docker*" ip daddr
  169.254.169.254 tcp dport 80 redirect to :<container port>``, to the agent's container listener on the address
  of the interface the connection came in on.
- ``forward_guard`` (filter, priority 0): a packet from those interfaces still addressed to the metadata service
  is one the redirect did not translate (a connection older than the rules): reset, as the output guard does.
- ``input_guard`` (filter, input hook): the container listener listens on every address, so a connection to its
  port that no redirect translated (``ct status ! dnat``: someone dialling port 969 itself, from this host or
  from another) is reset before it reaches the agent.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Optional

from .base import OWNER_NAME, RedirectSpec

TABLE = OWNER_NAME
CHAIN = "output"
PRIORITY = -150  # before Docker's and iptables-nft's nat output chains (priority -100)
GUARD_CHAIN = "guard"
GUARD_PRIORITY = 0  # NF_IP_PRI_FILTER: after every nat output chain, so only unredirected packets match
PREROUTING_CHAIN = "prerouting"
FORWARD_GUARD_CHAIN = "forward_guard"
INPUT_GUARD_CHAIN = "input_guard"
#: Our chains by name: (type, hook, priority). The order is the order they are created in.
CHAINS = {
    CHAIN: ("nat", "output", PRIORITY),
    GUARD_CHAIN: ("filter", "output", GUARD_PRIORITY),
    PREROUTING_CHAIN: ("nat", "prerouting", PRIORITY),
    FORWARD_GUARD_CHAIN: ("filter", "forward", GUARD_PRIORITY),
    INPUT_GUARD_CHAIN: ("filter", "input", GUARD_PRIORITY),
}
CT_KEYS = {"status": 2}
IPS_DST_NAT = 0x20  # conntrack status bit: the destination was translated (DNAT, REDIRECT)
IFNAMSIZ = 16
NFPROTO = {"ipv4": 2, "ipv6": 10}
META_KEYS = {"iifname": 6, "skuid": 10, "nfproto": 15, "l4proto": 16}
PAYLOAD_BASE = {"network": 1, "transport": 2}
CMP_OPS = {"eq": 0, "neq": 1}
NAT_DNAT = 1
NFT_REJECT_TCP_RST = 1
#: The ``type`` attribute's values per expression, as the kernel numbers them.
TYPES = {"nat": {"dnat": NAT_DNAT}, "reject": {"tcp_rst": NFT_REJECT_TCP_RST}}
# Which attributes of each expression define it (the kernel reports more, e.g. counter values, nat flags).
SIGNIFICANT = {
    "meta": ("key", "dreg"),
    "cmp": ("sreg", "op", "data"),
    "payload": ("dreg", "base", "offset", "len"),
    "counter": (),
    "immediate": ("dreg", "data"),
    "nat": ("type", "family", "reg_addr_min", "reg_proto_min"),
    "reject": ("type",),
    "redir": ("reg_proto_min",),
    "ct": ("key", "dreg"),
    "bitwise": ("sreg", "dreg", "len", "mask", "xor"),
}

Expr = list[Any]  # [name, {attr: value}]


def _cmp(op: str, data: bytes) -> Expr:
    return ["cmp", {"sreg": 1, "op": op, "data": data.hex()}]


def _match(family: str, daddr: str, dport: int, exempt_uid: Optional[int] = None, iface: str = "") -> list[Expr]:
    """``[iifname I] <family> daddr D tcp dport P [meta skuid != U] counter``: what the chains select."""
    addr_offset, addr_len = (16, 4) if family == "ipv4" else (24, 16)
    exprs: list[Expr] = []
    if iface:
        exprs += [["meta", {"key": "iifname", "dreg": 1}], _cmp("eq", ifname_bytes(iface))]
    exprs += [
        ["meta", {"key": "nfproto", "dreg": 1}],
        _cmp("eq", bytes([NFPROTO[family]])),
        ["meta", {"key": "l4proto", "dreg": 1}],
        _cmp("eq", b"\x06"),
        ["payload", {"dreg": 1, "base": "network", "offset": addr_offset, "len": addr_len}],
        _cmp("eq", ipaddress.ip_address(daddr).packed),
        ["payload", {"dreg": 1, "base": "transport", "offset": 2, "len": 2}],
        _cmp("eq", struct.pack(">H", dport)),
    ]
    if exempt_uid is not None:
        exprs += [["meta", {"key": "skuid", "dreg": 1}], _cmp("neq", struct.pack("=I", exempt_uid))]  # host order
    return exprs + [["counter", {}]]


def ifname_bytes(pattern: str) -> bytes:
    """An interface name as nft compares it: a prefix for ``name*`` (the bytes before the star), the name with
    its terminating NUL otherwise, so that ``docker0`` does not also match ``docker01``."""
    if pattern.endswith("*"):
        return pattern[:-1].encode()
    return pattern.encode() + b"\0"


def rule_exprs(family: str, daddr: str, dport: int, exempt_uid: int, to_addr: str, to_port: int) -> list[Expr]:
    """``<family> daddr D tcp dport P meta skuid != U counter dnat <family> to A:Q`` as expressions."""
    return _match(family, daddr, dport, exempt_uid) + [
        ["immediate", {"dreg": 1, "data": ipaddress.ip_address(to_addr).packed.hex()}],
        ["immediate", {"dreg": 2, "data": struct.pack(">H", to_port).hex()}],
        ["nat", {"type": "dnat", "family": family, "reg_addr_min": 1, "reg_proto_min": 2}],
    ]


def guard_exprs(family: str, daddr: str, dport: int, exempt_uid: int) -> list[Expr]:
    """``<family> daddr D tcp dport P meta skuid != U counter reject with tcp reset`` as expressions."""
    return _match(family, daddr, dport, exempt_uid) + [["reject", {"type": "tcp_rst"}]]


def expected_guard(spec: RedirectSpec) -> dict[str, list[Expr]]:
    """The guard chain's rule expressions per family that ``spec`` asks for."""
    rules = {"ipv4": guard_exprs("ipv4", spec.ipv4, spec.port, spec.exempt_uid)}
    if spec.with_ipv6:
        rules["ipv6"] = guard_exprs("ipv6", spec.ipv6, spec.port, spec.exempt_uid)
    return rules


def expected_rules(spec: RedirectSpec) -> dict[str, list[Expr]]:
    """The redirect (nat chain) rule expressions per family that ``spec`` asks for."""
    rules = {"ipv4": rule_exprs("ipv4", spec.ipv4, spec.port, spec.exempt_uid, spec.to_ipv4, spec.listen_port)}
    if spec.with_ipv6:
        rules["ipv6"] = rule_exprs("ipv6", spec.ipv6, spec.port, spec.exempt_uid, spec.to_ipv6, spec.listen_port)
    return rules


def container_exprs(family: str, daddr: str, dport: int, iface: str, to_port: int) -> list[Expr]:
    """``iifname I <family> daddr D tcp dport P counter redirect to :Q`` as expressions."""
    return _match(family, daddr, dport, iface=iface) + [
        ["immediate", {"dreg": 1, "data": struct.pack(">H", to_port).hex()}],
        ["redir", {"reg_proto_min": 1}],
    ]


def listener_guard_exprs(family: str, port: int) -> list[Expr]:
    """``<family> tcp dport Q ct status ! dnat counter reject with tcp reset``: the container listener's port
    dialled directly, not reached through a redirect."""
    zero = b"\0\0\0\0"
    return [
        ["meta", {"key": "nfproto", "dreg": 1}],
        _cmp("eq", bytes([NFPROTO[family]])),
        ["meta", {"key": "l4proto", "dreg": 1}],
        _cmp("eq", b"\x06"),
        ["payload", {"dreg": 1, "base": "transport", "offset": 2, "len": 2}],
        _cmp("eq", struct.pack(">H", port)),
        ["ct", {"key": "status", "dreg": 1}],
        ["bitwise", {"sreg": 1, "dreg": 1, "len": 4, "mask": struct.pack("=I", IPS_DST_NAT).hex(), "xor": zero.hex()}],
        _cmp("eq", zero),
        ["counter", {}],
        ["reject", {"type": "tcp_rst"}],
    ]


def _families(spec: RedirectSpec) -> list[tuple[str, str]]:
    return [("ipv4", spec.ipv4)] + ([("ipv6", spec.ipv6)] if spec.with_ipv6 else [])


def expected_container_chains(spec: RedirectSpec) -> dict[str, dict[str, list[Expr]]]:
    """The prerouting redirect and the forward guard, keyed by rule key (family and interface); none without
    container interfaces."""
    if not spec.container_ifaces:
        return {}
    redirect: dict[str, list[Expr]] = {}
    guard: dict[str, list[Expr]] = {}
    for family, daddr in _families(spec):
        for iface in spec.container_ifaces:
            key = f"{family} iifname {iface}"
            redirect[key] = container_exprs(family, daddr, spec.port, iface, spec.container_port)
            guard[key] = _match(family, daddr, spec.port, iface=iface) + [["reject", {"type": "tcp_rst"}]]
    listener = {family: listener_guard_exprs(family, spec.container_port) for family, _ in _families(spec)}
    return {PREROUTING_CHAIN: redirect, FORWARD_GUARD_CHAIN: guard, INPUT_GUARD_CHAIN: listener}


def expected_chains(spec: RedirectSpec) -> dict[str, dict[str, list[Expr]]]:
    """Per chain, the rule expressions per rule key (the family; with the interface for container chains)."""
    return {CHAIN: expected_rules(spec), GUARD_CHAIN: expected_guard(spec), **expected_container_chains(spec)}


def build_ruleset(spec: RedirectSpec, owned: bool) -> list[dict[str, Any]]:
    """The whole transaction as data: make sure the table exists, delete it, create it afresh with its chains
    (the redirect, then the guard) and their rules. In one batch this is atomic and idempotent (nothing of an older
    version survives, nothing doubles), and the guard never exists without the redirect or the other way round."""
    ops: list[dict[str, Any]] = [
        {"op": "add", "object": "table", "name": TABLE, "flags": []},
        {"op": "delete", "object": "table", "name": TABLE},
        {"op": "add", "object": "table", "name": TABLE, "flags": ["owner"] if owned else []},
    ]
    for chain, rules in expected_chains(spec).items():
        kind, hook, priority = CHAINS[chain]
        ops.append(
            {"op": "add", "object": "chain", "table": TABLE, "name": chain, "type": kind, "hook": hook,
             "priority": priority, "policy": "accept"}
        )  # fmt: skip
        for key, exprs in rules.items():
            ops.append(
                {"op": "add", "object": "rule", "table": TABLE, "chain": chain, "family": key.split()[0],
                 "comment": OWNER_NAME, "expr": exprs}
            )  # fmt: skip
    return ops


def significant(exprs: list[Expr]) -> list[Expr]:
    """Expressions reduced to the attributes that define them, for comparison."""
    return [[name, {k: attrs.get(k) for k in SIGNIFICANT.get(name, tuple(attrs))}] for name, attrs in exprs]


def rule_family(exprs: list[Expr]) -> Optional[str]:
    """The family a rule is for, from its nfproto match."""
    for i, (name, attrs) in enumerate(exprs[:-1]):
        if name == "meta" and attrs.get("key") == "nfproto":
            nxt = exprs[i + 1]
            if nxt[0] == "cmp":
                value = bytes.fromhex(nxt[1].get("data", ""))
                return {2: "ipv4", 10: "ipv6"}.get(value[0] if value else -1)
    return None


def rule_key(exprs: list[Expr]) -> str:
    """How a rule is told from its chain's others: its family, and its input interface where it matches one."""
    key = rule_family(exprs) or "?"
    for i, (name, attrs) in enumerate(exprs[:-1]):
        if name == "meta" and attrs.get("key") == "iifname" and exprs[i + 1][0] == "cmp":
            key += f" iifname {_ifname(bytes.fromhex(exprs[i + 1][1].get('data', '')))}"
    return key


def _ifname(value: bytes) -> str:
    """The pattern ``ifname_bytes`` made ``value`` from."""
    if value.endswith(b"\0"):
        return value.rstrip(b"\0").decode(errors="replace")
    return value.decode(errors="replace") + "*"


def render(exprs: list[Expr]) -> str:
    """A rule in nft's own words, as far as our expressions go (for `rules show` and repair messages)."""
    words: list[str] = []
    loaded: Optional[tuple[str, Any]] = None
    regs: dict[int, bytes] = {}
    for name, attrs in exprs:
        if name in ("meta", "payload", "ct"):
            loaded = (name, attrs)
        elif name == "bitwise" and loaded is not None:
            loaded = (loaded[0], dict(loaded[1], mask=attrs.get("mask")))
        elif name == "cmp" and loaded is not None:
            value = bytes.fromhex(attrs.get("data", ""))
            op = "!= " if attrs.get("op") == "neq" else ""
            words.append(_describe_match(loaded, value, op))
        elif name == "counter":
            words.append("counter")
        elif name == "immediate":
            regs[int(attrs.get("dreg", 0))] = bytes.fromhex(attrs.get("data", ""))
        elif name == "nat":
            addr = regs.get(int(attrs.get("reg_addr_min") or 0), b"")
            port = regs.get(int(attrs.get("reg_proto_min") or 0), b"")
            host = str(ipaddress.ip_address(addr)) if len(addr) in (4, 16) else "?"
            target = f"[{host}]" if len(addr) == 16 else host
            family = "ip" if attrs.get("family") == "ipv4" else "ip6"
            words.append(f"{attrs.get('type')} {family} to {target}:{struct.unpack('>H', port)[0] if port else '?'}")
        elif name == "redir":
            port = regs.get(int(attrs.get("reg_proto_min") or 0), b"")
            words.append(f"redirect to :{struct.unpack('>H', port)[0] if len(port) == 2 else '?'}")
        elif name == "reject":
            words.append("reject with tcp reset" if attrs.get("type") == "tcp_rst" else f"reject {attrs.get('type')}")
        else:
            words.append(name)
    return " ".join(w for w in words if w)


def _describe_match(loaded: tuple[str, Any], value: bytes, op: str) -> str:
    kind, attrs = loaded
    if kind == "ct":
        mask = bytes.fromhex(attrs.get("mask") or "")
        if attrs.get("key") == "status" and mask == struct.pack("=I", IPS_DST_NAT):
            return "ct status dnat" if op or any(value) else "ct status ! dnat"
        return f"ct {attrs.get('key')} {op}{value.hex()}"
    if kind == "meta":
        key = attrs.get("key")
        if key == "nfproto":
            return ""  # implied by the address match, as nft prints it
        if key == "l4proto":
            proto = "tcp" if value == b"\x06" else value.hex()
            return f"meta l4proto {op}{proto}"
        if key == "iifname":
            return f'iifname {op}"{_ifname(value)}"'
        if key == "skuid" and len(value) == 4:
            return f"meta skuid {op}{struct.unpack('=I', value)[0]}"
        return f"meta {key} {op}{value.hex()}"
    if attrs.get("base") == "network" and len(value) in (4, 16):
        return f"{'ip' if len(value) == 4 else 'ip6'} daddr {op}{ipaddress.ip_address(value)}"
    if attrs.get("base") == "transport" and attrs.get("offset") == 2 and len(value) == 2:
        return f"tcp dport {op}{struct.unpack('>H', value)[0]}"
    return f"payload {op}{value.hex()}"
