"""python-iptables work for one address family, in a process of its own.

libxtables registers an extension only for the address family that is current when its shared object is first
loaded, and python-iptables cannot register it again for the other family (DNAT for IPv6 after IPv4 is then "not
found", and a second registration makes libxtables exit). One short-lived process per family and operation avoids
that state entirely, and gives every edit a freshly read table, which is what libiptc's caching needs anyway.

    python -m imds_agent.redirect.iptworker FAMILY probe|state|usage|remove
    python -m imds_agent.redirect.iptworker FAMILY apply < family-rules.json

A family's rules are our IMDS_AGENT chain in each of iptrules.TABLES (the redirect in nat, the guard in filter),
each with one jump from that table's OUTPUT, and, when the data names containers, the container chains
(iptrules.CONTAINER_CHAINS) with their jumps from PREROUTING and FORWARD; without them, those chains are removed.
libiptc commits one table at a time, so apply builds every rule and
loads every table before it commits the first: a missing extension or table changes nothing.

Prints one JSON object: {"ok": true, ...} or {"ok": false, "error": "..."}; exit code 0 either way unless the
worker itself crashed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .base import IPTABLES_CHAIN
from .iptrules import CONTAINER_CHAINS, TABLES

TOOLS = {"ipv4": "iptables", "ipv6": "ip6tables"}
TABLES_NAMES = {"ipv4": "/proc/net/ip_tables_names", "ipv6": "/proc/net/ip6_tables_names"}
KERNEL_OPTIONS = {
    ("ipv4", "nat"): "CONFIG_IP_NF_NAT",
    ("ipv4", "filter"): "CONFIG_IP_NF_FILTER",
    ("ipv6", "nat"): "CONFIG_IP6_NF_NAT",
    ("ipv6", "filter"): "CONFIG_IP6_NF_FILTER",
    ("ipv4", "REJECT"): "CONFIG_IP_NF_TARGET_REJECT",
    ("ipv6", "REJECT"): "CONFIG_IP6_NF_TARGET_REJECT",
}


class Unavailable(Exception):
    """A table or extension this host lacks, named with what provides it."""


def _tables(family: str) -> tuple[Any, Any, Any]:
    import iptc

    if family == "ipv6":
        return iptc, iptc.Table6, iptc.Rule6
    return iptc, iptc.Table, iptc.Rule


def _table(family: str, name: str) -> Any:
    """A freshly read table (nat or filter), or Unavailable naming the table and the kernel option."""
    iptc, table_cls, _ = _tables(family)
    try:
        table = table_cls(name)
        table.autocommit = False
        table.refresh()
    except iptc.IPTCError as exc:
        kernel = KERNEL_OPTIONS.get((family, name), "")
        raise Unavailable(f"{TOOLS[family]} {name} table is unavailable (kernel needs {kernel}): {exc}") from None
    return table


def _registered(family: str, name: str) -> bool:
    """Whether the kernel has this legacy table in this namespace; without the list, assume it may."""
    try:
        with open(TABLES_NAMES[family], encoding="ascii") as fh:
            return name in fh.read().split()
    except OSError:
        return True


def _chain(table: Any, name: str) -> Any:
    for chain in table.chains:
        if chain.name == name:
            return chain
    return None


def _describe(rule: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"dst": _prefix(rule.dst), "protocol": rule.protocol}
    if rule.in_interface:
        out["in_interface"] = rule.in_interface
    for match in rule.matches:
        params = match.get_all_parameters()
        if match.name == "tcp" and "dport" in params:
            out["dport"] = params["dport"][0]
        elif match.name == "owner" and "uid-owner" in params:
            out["uid_owner"] = "".join(params["uid-owner"])
            if "socket-exists" in params:
                out["socket_exists"] = True
        elif match.name == "conntrack" and "ctstate" in params:
            out["ctstate"] = "".join(params["ctstate"])
        elif match.name == "comment":
            out["comment"] = params.get("comment", [""])[0]
    out["target"] = rule.target.name
    target = rule.target.get_all_parameters()
    if rule.target.name == "DNAT":
        out["to"] = target.get("to-destination", [""])[0]
    elif rule.target.name == "REDIRECT":
        out["to_ports"] = target.get("to-ports", [""])[0]
    elif rule.target.name == "REJECT":
        out["reject_with"] = target.get("reject-with", [""])[0]
    packets, nbytes = rule.get_counters()
    out["packets"], out["bytes"] = int(packets), int(nbytes)
    return out


def _prefix(dst: str) -> str:
    """iptc gives '169.254.169.254/255.255.255.255'; make it '169.254.169.254/32' (IPv6 comes as a prefix)."""
    import ipaddress

    addr, _, mask = dst.partition("/")
    if mask and "." in mask:
        return f"{addr}/{ipaddress.IPv4Network(f'0.0.0.0/{mask}').prefixlen}"
    return dst


def _table_state(table: Any, name: str = IPTABLES_CHAIN, hook: str = "OUTPUT") -> dict[str, Any]:
    chain = _chain(table, name)
    output = _chain(table, hook)
    jumps = [r for r in output.rules if r.target.name == name] if output is not None else []
    return {
        "chain": chain is not None,
        "jumps": len(jumps),
        "jump_first": bool(output is not None and output.rules and output.rules[0].target.name == name),
        "rules": [_describe(r) for r in chain.rules] if chain is not None else [],
    }


def state(family: str) -> dict[str, Any]:
    """Per table: our chain's rules with counters, and how many jumps to it OUTPUT has. A table the kernel has not
    registered holds nothing of ours and is not loaded just to look."""
    empty = {"chain": False, "jumps": 0, "jump_first": False, "rules": []}
    return {
        "tables": {
            name: _table_state(_table(family, name)) if _registered(family, name) else dict(empty) for name in TABLES
        },
        "containers": {  # by chain: two of them are in filter
            chain: _table_state(_table(family, name), chain, hook) if _registered(family, name) else dict(empty)
            for name, chain, hook in CONTAINER_CHAINS
        },
    }


def _make_rule(family: str, spec: dict[str, Any]) -> Any:
    iptc, _, rule_cls = _tables(family)
    rule = rule_cls()
    rule.protocol = spec["protocol"]
    rule.dst = spec["dst"]
    if spec.get("in_interface"):
        rule.in_interface = spec["in_interface"]
    rule.create_match("tcp").dport = spec["dport"]
    if "ctstate" in spec:
        rule.create_match("conntrack").ctstate = spec["ctstate"]
    if "uid_owner" in spec:
        owner = rule.create_match("owner")
        if spec.get("socket_exists"):
            owner.socket_exists = ""
        owner.uid_owner = spec["uid_owner"]
    rule.create_match("comment").comment = spec["comment"]
    name = spec.get("target", "DNAT")
    try:
        target = rule.create_target(name)
    except iptc.XTablesError as exc:
        kernel = KERNEL_OPTIONS.get((family, name), "")
        needs = f" (userspace lib*t_{name}.so, kernel {kernel})" if kernel else ""
        raise Unavailable(f"{TOOLS[family]} {name} target is unavailable{needs}: {exc}") from None
    if name == "DNAT":
        target.to_destination = spec["to"]
    elif name == "REDIRECT":
        target.to_ports = spec["to_ports"]
    else:
        target.reject_with = spec["reject_with"]
    return rule


def _fill(family: str, table: Any, chain_name: str, rules: list[Any], comment: str, hook: str = "OUTPUT") -> None:
    """Make our chain hold exactly ``rules`` and ``hook`` hold exactly one jump to it, first (not committed)."""
    _, _, rule_cls = _tables(family)
    chain = _chain(table, chain_name) or table.create_chain(chain_name)
    chain.flush()
    for rule in rules:
        chain.append_rule(rule)
    output = _chain(table, hook)
    for rule in [r for r in output.rules if r.target.name == chain_name]:
        output.delete_rule(rule)
    jump = rule_cls()
    jump.create_match("comment").comment = comment
    jump.create_target(chain_name)
    output.insert_rule(jump)


def _commit(family: str, name: str, table: Any) -> None:
    iptc, _, _ = _tables(family)
    try:
        table.commit()
    except iptc.IPTCError as exc:
        # The kernel checks targets only now: a kernel without REJECT refuses the filter table's commit.
        kernel = KERNEL_OPTIONS.get((family, "REJECT"), "") if name == "filter" else ""
        hint = f" (the guard's REJECT target needs {kernel})" if kernel else ""
        raise Unavailable(f"{TOOLS[family]} {name} table refused our chain{hint}: {exc}") from None


def apply(family: str, data: dict[str, Any]) -> dict[str, Any]:
    """For each part of ``data['tables']`` and ``data['containers']``, make its chain hold exactly its rules and its
    hook hold exactly one jump to it, first; one commit per table (nat, then filter)."""
    parts = data["tables"] + data.get("containers", [])
    rules = [
        [_make_rule(family, r) for r in part["rules"]] for part in parts
    ]  # built first: a bad rule changes nothing
    # Every table loads before the first commit, once: python-iptables hands out one object per table, and a
    # table committed once is stale for a second commit (EAGAIN), so each table's chains go in one commit.
    tables = {part["table"]: None for part in parts}
    loaded = {name: _table(family, name) for name in tables}
    for part, built in zip(parts, rules):
        hook = part["jump"].get("from", "OUTPUT")
        _fill(family, loaded[part["table"]], part["chain"], built, part["jump"]["comment"], hook)
    for name, table in loaded.items():
        _commit(family, name, table)
    if not data.get("containers"):
        _remove_chains(family, [(t, c, h) for t, c, h in reversed(CONTAINER_CHAINS)])
    return {"applied": sum(len(built) for built in rules)}


def remove(family: str) -> dict[str, Any]:
    """Delete every jump to our chain, then the chain, in each table (the guard first); one commit per table.
    A table the kernel has not registered is not loaded: it cannot hold anything of ours."""
    ours = [(t, c, h) for t, c, h in reversed(CONTAINER_CHAINS)] + [
        (t, IPTABLES_CHAIN, "OUTPUT") for t in reversed(TABLES)
    ]
    return {"removed": _remove_chains(family, ours)}


def _remove_chains(family: str, chains: list[tuple[str, str, str]]) -> bool:
    """Delete each (table, chain, hook): the jumps to the chain from its hook, then the chain; one commit per
    table and chain. Returns whether anything was there."""
    removed = False
    for name, chain_name, hook in chains:
        if not _registered(family, name):
            continue
        table = _table(family, name)
        output = _chain(table, hook)
        touched = False
        if output is not None:
            for rule in [r for r in output.rules if r.target.name == chain_name]:
                output.delete_rule(rule)
                touched = True
        chain = _chain(table, chain_name)
        if chain is not None:
            chain.flush()
            chain.delete()
            touched = True
        if touched:
            _commit(family, name, table)
        removed = removed or touched
    return removed


def usage(family: str) -> dict[str, Any]:
    """How many rules the legacy nat and filter tables hold (other than ours)."""
    iptc, table_cls, _ = _tables(family)
    count = 0
    for name in (table_cls.NAT, table_cls.FILTER):
        table = table_cls(name)
        table.refresh()
        for chain in table.chains:
            if chain.name != IPTABLES_CHAIN:
                count += sum(1 for r in chain.rules if r.target.name != IPTABLES_CHAIN)
    return {"rules": count}


def probe(family: str) -> dict[str, Any]:
    """Whether python-iptables loads, the nat and filter tables exist, and the owner and comment matches, DNAT and
    REJECT are usable."""
    for name in TABLES:
        _table(family, name)
    dst = "192.0.2.1/32" if family == "ipv4" else "2001:db8::1/128"
    base = {"protocol": "tcp", "dst": dst, "dport": "80", "uid_owner": "!0", "comment": "probe"}
    _make_rule(family, dict(base, target="DNAT", to="127.0.0.1:1" if family == "ipv4" else "[::1]:1"))
    _make_rule(family, dict(base, target="REJECT", reject_with="tcp-reset", socket_exists=True))
    return {}


def main(argv: list[str]) -> int:
    """Entry point; see the module docstring."""
    if len(argv) != 2 or argv[0] not in ("ipv4", "ipv6"):
        print(json.dumps({"ok": False, "error": "usage: iptworker ipv4|ipv6 probe|state|usage|remove|apply"}))
        return 2
    family, op = argv
    try:
        if op == "apply":
            result = apply(family, json.load(sys.stdin))
        elif op in ("probe", "state", "usage", "remove"):
            result = {"probe": probe, "state": state, "usage": usage, "remove": remove}[op](family)
        else:
            raise ValueError(f"unknown operation {op!r}")
    except Exception as exc:  # report every failure as data: the caller turns it into a RedirectError
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        return 0
    print(json.dumps(dict(result, ok=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
