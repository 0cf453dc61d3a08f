"""The iptables rule set as plain data, per address family, and its iptables-save rendering.

Pure functions, golden-file tested; the worker process applies the data with python-iptables.
"""

from __future__ import annotations

from typing import Any

from .base import IPTABLES_CHAIN, OWNER_NAME, RedirectSpec

FAMILIES = ("ipv4", "ipv6")


def rule(daddr: str, prefix: int, dport: int, exempt_uid: int, to: str) -> dict[str, str]:
    """One DNAT rule: tcp to daddr:dport from any uid but exempt_uid goes to ``to``."""
    return {
        "dst": f"{daddr}/{prefix}",
        "protocol": "tcp",
        "dport": str(dport),
        "uid_owner": f"!{exempt_uid}",
        "comment": OWNER_NAME,
        "to": to,
    }


def build_rules(spec: RedirectSpec) -> dict[str, dict[str, Any]]:
    """Per family: our chain in the nat table, its rules, and the single jump to it from OUTPUT."""
    out: dict[str, dict[str, Any]] = {
        "ipv4": {
            "table": "nat",
            "chain": IPTABLES_CHAIN,
            "rules": [rule(spec.ipv4, 32, spec.port, spec.exempt_uid, f"{spec.to_ipv4}:{spec.listen_port}")],
            "jump": {"from": "OUTPUT", "comment": OWNER_NAME},
        }
    }
    if spec.with_ipv6:
        out["ipv6"] = {
            "table": "nat",
            "chain": IPTABLES_CHAIN,
            "rules": [rule(spec.ipv6, 128, spec.port, spec.exempt_uid, f"[{spec.to_ipv6}]:{spec.listen_port}")],
            "jump": {"from": "OUTPUT", "comment": OWNER_NAME},
        }
    return out


def render(r: dict[str, Any], chain: str = IPTABLES_CHAIN) -> str:
    """A rule in iptables-save syntax."""
    uid = str(r.get("uid_owner", ""))
    owner = f"! --uid-owner {uid[1:]}" if uid.startswith("!") else f"--uid-owner {uid}"
    return (
        f"-A {chain} -d {r.get('dst')} -p {r.get('protocol')} -m tcp --dport {r.get('dport')} -m owner {owner} "
        f"-m comment --comment {r.get('comment')} -j DNAT --to-destination {r.get('to')}"
    )


def significant(r: dict[str, Any]) -> dict[str, Any]:
    """The fields that define a rule (not its counters)."""
    return {k: r.get(k) for k in ("dst", "protocol", "dport", "uid_owner", "comment", "to")}
