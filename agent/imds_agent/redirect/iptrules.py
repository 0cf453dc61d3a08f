"""The iptables rule set as plain data, per address family, and its iptables-save rendering.

Pure functions, golden-file tested; the worker process applies the data with python-iptables.

Per family, two tables hold a chain named IMDS_AGENT, each jumped to first from their OUTPUT chain:

- nat: the redirect, DNAT to the listener for every uid but the agent's.
- filter: the guard. NAT rules are consulted only for a connection's first packet, so a connection conntrack does
  not see as new is never redirected: one opened while the agent was down (fail_mode open removes the rules) and
  used after it is back, or one whose SYN matches an entry of the agent's own (a squatted source port). filter
  OUTPUT runs after nat OUTPUT, so a redirected packet already carries the listener's address and does not match;
  a packet still addressed to the metadata service from another uid went round the redirect and is rejected with
  a TCP reset. Reset, not drop: a client holding such a connection fails at once, and its retry opens a new
  connection, which the redirect catches.

The guard adds ``--socket-exists`` to the owner match: ``! --uid-owner`` alone also matches packets without a
user socket (an orphaned socket finishing its close, a TIME_WAIT acknowledgement), so it would reset the agent's
own closing upstream connections. nftables' ``meta skuid`` never matches such packets either; no process can read
through a socket it no longer holds.

With container interfaces in the spec, two more chains per family catch connections entering from containers with
network namespaces of their own (they never pass OUTPUT): IMDS_AGENT_IN in nat, jumped to first from PREROUTING
(``-i docker+ ... -j REDIRECT --to-ports <container port>``), and IMDS_AGENT_FWD in filter, jumped to first from
FORWARD (what the redirect missed from those interfaces is reset, as the guard does). A third, IMDS_AGENT_LSN in
filter from INPUT, resets connections to the container listener's port that no redirect translated
(``-m conntrack ! --ctstate DNAT``): the listener is on every address, and only redirected connections are for it.
"""

from __future__ import annotations

from typing import Any

from .base import IPTABLES_CHAIN, OWNER_NAME, RedirectSpec

FAMILIES = ("ipv4", "ipv6")
#: The tables we own a chain in, in the order they are applied (the redirect before the guard, so that no new
#: connection is reset while the redirect is still missing); removal goes the other way.
TABLES = ("nat", "filter")
SIGNIFICANT = ("dst", "protocol", "dport", "in_interface", "uid_owner", "socket_exists", "ctstate", "comment",
               "target", "to", "to_ports", "reject_with")  # fmt: skip
#: The container chains: (table, chain, the built-in chain that jumps to it).
CONTAINER_CHAINS = (
    ("nat", "IMDS_AGENT_IN", "PREROUTING"),
    ("filter", "IMDS_AGENT_FWD", "FORWARD"),
    ("filter", "IMDS_AGENT_LSN", "INPUT"),
)


def rule(daddr: str, prefix: int, dport: int, exempt_uid: int, to: str) -> dict[str, str]:
    """One DNAT rule: tcp to daddr:dport from any uid but exempt_uid goes to ``to``."""
    return {
        "dst": f"{daddr}/{prefix}",
        "protocol": "tcp",
        "dport": str(dport),
        "uid_owner": f"!{exempt_uid}",
        "comment": OWNER_NAME,
        "target": "DNAT",
        "to": to,
    }


def guard_rule(daddr: str, prefix: int, dport: int, exempt_uid: int) -> dict[str, Any]:
    """One guard rule: tcp to daddr:dport from a socket of any uid but exempt_uid is reset."""
    return {
        "dst": f"{daddr}/{prefix}",
        "protocol": "tcp",
        "dport": str(dport),
        "socket_exists": True,
        "uid_owner": f"!{exempt_uid}",
        "comment": OWNER_NAME,
        "target": "REJECT",
        "reject_with": "tcp-reset",
    }


def _family(daddr: str, prefix: int, spec: RedirectSpec, to: str) -> dict[str, Any]:
    jump = {"from": "OUTPUT", "comment": OWNER_NAME}
    return {
        "tables": [
            {"table": "nat", "chain": IPTABLES_CHAIN, "rules": [rule(daddr, prefix, spec.port, spec.exempt_uid, to)],
             "jump": jump},
            {"table": "filter", "chain": IPTABLES_CHAIN,
             "rules": [guard_rule(daddr, prefix, spec.port, spec.exempt_uid)], "jump": jump},
        ]
    }  # fmt: skip


def iface(pattern: str) -> str:
    """An interface pattern in iptables' spelling: ``docker*`` is ``docker+``."""
    return pattern[:-1] + "+" if pattern.endswith("*") else pattern


def container_rule(daddr: str, prefix: int, dport: int, pattern: str, to_port: int) -> dict[str, str]:
    """One REDIRECT rule: tcp to daddr:dport entering on ``pattern`` goes to the container listener's port."""
    return {"dst": f"{daddr}/{prefix}", "protocol": "tcp", "dport": str(dport), "in_interface": iface(pattern),
            "comment": OWNER_NAME, "target": "REDIRECT", "to_ports": str(to_port)}  # fmt: skip


def container_guard_rule(daddr: str, prefix: int, dport: int, pattern: str) -> dict[str, str]:
    """One forward guard rule: tcp to daddr:dport entering on ``pattern`` that the redirect missed is reset."""
    return {"dst": f"{daddr}/{prefix}", "protocol": "tcp", "dport": str(dport), "in_interface": iface(pattern),
            "comment": OWNER_NAME, "target": "REJECT", "reject_with": "tcp-reset"}  # fmt: skip


def listener_guard_rule(any_address: str, port: int) -> dict[str, str]:
    """The container listener's port dialled directly (no redirect translated the connection) is reset."""
    return {"dst": any_address, "protocol": "tcp", "dport": str(port), "ctstate": "!DNAT", "comment": OWNER_NAME,
            "target": "REJECT", "reject_with": "tcp-reset"}  # fmt: skip


def _containers(daddr: str, prefix: int, spec: RedirectSpec) -> list[dict[str, Any]]:
    (nat, nat_chain, nat_from), (filt, filt_chain, filt_from), (_, lsn_chain, lsn_from) = CONTAINER_CHAINS
    pats = spec.container_ifaces
    any_address = "0.0.0.0/0" if prefix == 32 else "::/0"
    return [
        {"table": nat, "chain": nat_chain, "jump": {"from": nat_from, "comment": OWNER_NAME},
         "rules": [container_rule(daddr, prefix, spec.port, p, spec.container_port) for p in pats]},
        {"table": filt, "chain": filt_chain, "jump": {"from": filt_from, "comment": OWNER_NAME},
         "rules": [container_guard_rule(daddr, prefix, spec.port, p) for p in pats]},
        {"table": filt, "chain": lsn_chain, "jump": {"from": lsn_from, "comment": OWNER_NAME},
         "rules": [listener_guard_rule(any_address, spec.container_port)]},
    ]  # fmt: skip


def build_rules(spec: RedirectSpec) -> dict[str, dict[str, Any]]:
    """Per family: our chain in the nat and in the filter table, their rules, and the single jump to each from
    that table's OUTPUT; with container interfaces, the container chains under ``containers`` as well."""
    out = {"ipv4": _family(spec.ipv4, 32, spec, f"{spec.to_ipv4}:{spec.listen_port}")}
    if spec.with_ipv6:
        out["ipv6"] = _family(spec.ipv6, 128, spec, f"[{spec.to_ipv6}]:{spec.listen_port}")
    if spec.container_ifaces:
        out["ipv4"]["containers"] = _containers(spec.ipv4, 32, spec)
        if spec.with_ipv6:
            out["ipv6"]["containers"] = _containers(spec.ipv6, 128, spec)
    return out


def render(r: dict[str, Any], chain: str = IPTABLES_CHAIN) -> str:
    """A rule in iptables-save syntax."""
    uid = str(r.get("uid_owner", ""))
    owner = f"! --uid-owner {uid[1:]}" if uid.startswith("!") else f"--uid-owner {uid}"
    if r.get("socket_exists"):
        owner = f"--socket-exists {owner}"
    owner = f"-m owner {owner} " if uid else ""
    if r.get("ctstate"):
        state = str(r["ctstate"])
        owner += f"-m conntrack {'! ' if state.startswith('!') else ''}--ctstate {state.lstrip('!')} "
    into = f"-i {r.get('in_interface')} " if r.get("in_interface") else ""
    if r.get("target", "DNAT") == "DNAT":
        target = f"DNAT --to-destination {r.get('to')}"
    elif r.get("target") == "REDIRECT":
        target = f"REDIRECT --to-ports {r.get('to_ports')}"
    elif r.get("target") == "REJECT":
        target = f"REJECT --reject-with {r.get('reject_with')}"
    else:
        target = str(r.get("target"))
    return (
        f"-A {chain} {into}-d {r.get('dst')} -p {r.get('protocol')} -m tcp --dport {r.get('dport')} {owner}"
        f"-m comment --comment {r.get('comment')} -j {target}"
    )


def significant(r: dict[str, Any]) -> dict[str, Any]:
    """The fields that define a rule (not its counters)."""
    return {k: r.get(k) for k in SIGNIFICANT}
