"""python-iptables work for one address family, in a process of its own.

libxtables registers an extension only for the address family that is current when its shared object is first
loaded, and python-iptables cannot register it again for the other family (DNAT for IPv6 after IPv4 is then "not
found", and a second registration makes libxtables exit). One short-lived process per family and operation avoids
that state entirely, and gives every edit a freshly read table, which is what libiptc's caching needs anyway.

    python -m imds_agent.redirect.iptworker FAMILY probe|state|usage|remove
    python -m imds_agent.redirect.iptworker FAMILY apply < family-rules.json

Prints one JSON object: {"ok": true, ...} or {"ok": false, "error": "..."}; exit code 0 either way unless the
worker itself crashed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .base import IPTABLES_CHAIN


def _tables(family: str) -> tuple[Any, Any, Any]:
    import iptc

    if family == "ipv6":
        return iptc, iptc.Table6, iptc.Rule6
    return iptc, iptc.Table, iptc.Rule


def _nat(family: str) -> Any:
    iptc, table_cls, _ = _tables(family)
    table = table_cls(table_cls.NAT)
    table.autocommit = False
    table.refresh()
    return table


def _chain(table: Any, name: str) -> Any:
    for chain in table.chains:
        if chain.name == name:
            return chain
    return None


def _describe(rule: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"dst": _prefix(rule.dst), "protocol": rule.protocol}
    for match in rule.matches:
        params = match.get_all_parameters()
        if match.name == "tcp" and "dport" in params:
            out["dport"] = params["dport"][0]
        elif match.name == "owner" and "uid-owner" in params:
            out["uid_owner"] = "".join(params["uid-owner"])
        elif match.name == "comment":
            out["comment"] = params.get("comment", [""])[0]
    out["target"] = rule.target.name
    out["to"] = rule.target.get_all_parameters().get("to-destination", [""])[0]
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


def state(family: str) -> dict[str, Any]:
    """Our chain's rules with counters, and how many jumps to it OUTPUT has."""
    table = _nat(family)
    chain = _chain(table, IPTABLES_CHAIN)
    output = _chain(table, "OUTPUT")
    jumps = [r for r in output.rules if r.target.name == IPTABLES_CHAIN] if output is not None else []
    return {
        "chain": chain is not None,
        "jumps": len(jumps),
        "jump_first": bool(output is not None and output.rules and output.rules[0].target.name == IPTABLES_CHAIN),
        "rules": [_describe(r) for r in chain.rules] if chain is not None else [],
    }


def _make_rule(family: str, spec: dict[str, str]) -> Any:
    iptc, _, rule_cls = _tables(family)
    rule = rule_cls()
    rule.protocol = spec["protocol"]
    rule.dst = spec["dst"]
    rule.create_match("tcp").dport = spec["dport"]
    rule.create_match("owner").uid_owner = spec["uid_owner"]
    rule.create_match("comment").comment = spec["comment"]
    rule.create_target("DNAT").to_destination = spec["to"]
    return rule


def apply(family: str, data: dict[str, Any]) -> dict[str, Any]:
    """Make our chain hold exactly ``data['rules']`` and OUTPUT hold exactly one jump to it, first; one commit."""
    iptc, _, rule_cls = _tables(family)
    rules = [_make_rule(family, r) for r in data["rules"]]  # built first: a bad rule changes nothing
    table = _nat(family)
    chain = _chain(table, IPTABLES_CHAIN) or table.create_chain(IPTABLES_CHAIN)
    chain.flush()
    for rule in rules:
        chain.append_rule(rule)
    output = _chain(table, "OUTPUT")
    for rule in [r for r in output.rules if r.target.name == IPTABLES_CHAIN]:
        output.delete_rule(rule)
    jump = rule_cls()
    jump.create_match("comment").comment = data["jump"]["comment"]
    jump.create_target(IPTABLES_CHAIN)
    output.insert_rule(jump)
    table.commit()
    return {"applied": len(rules)}


def remove(family: str) -> dict[str, Any]:
    """Delete every jump to our chain, then the chain; one commit."""
    table = _nat(family)
    removed = False
    output = _chain(table, "OUTPUT")
    if output is not None:
        for rule in [r for r in output.rules if r.target.name == IPTABLES_CHAIN]:
            output.delete_rule(rule)
            removed = True
    chain = _chain(table, IPTABLES_CHAIN)
    if chain is not None:
        chain.flush()
        chain.delete()
        removed = True
    table.commit()
    return {"removed": removed}


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
    """Whether python-iptables loads and the nat table, owner and comment matches and DNAT are usable."""
    _nat(family)
    _make_rule(family, {"protocol": "tcp", "dst": "192.0.2.1/32" if family == "ipv4" else "2001:db8::1/128",
                        "dport": "80", "uid_owner": "!0", "comment": "probe",
                        "to": "127.0.0.1:1" if family == "ipv4" else "[::1]:1"})  # fmt: skip
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
