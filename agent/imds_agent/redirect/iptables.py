"""The iptables backend, for hosts that use legacy xtables: our own IMDS_AGENT chain in the nat table (the redirect,
`-m owner ! --uid-owner`) and one in the filter table (the guard, see iptrules), each jumped to first from that
table's OUTPUT; ip6tables for IPv6. With container interfaces, IMDS_AGENT_IN (nat, from PREROUTING) and
IMDS_AGENT_FWD (filter, from FORWARD) as well (iptrules).

The editing happens in iptworker processes (one per family and operation, see there for why); this class turns
their JSON answers into the backend protocol. iptables cannot tie rules to a process, so fail_mode open after a
SIGKILL relies on the guardian (guardian.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Optional

from .. import subproc
from ..errors import RedirectError
from ..privileges import CAP_NET_ADMIN, CAP_NET_RAW
from . import iptrules
from .base import IPTABLES_CHAIN, CheckResult, RedirectSpec, RuleView, State

log = logging.getLogger(__name__)

IP_TABLES_NAMES = "/proc/net/ip_tables_names"
WORKER_TIMEOUT = 20.0
XTABLES_DIRS = ("/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib/aarch64-linux-gnu/xtables", "/usr/lib64/xtables",
                "/usr/lib/xtables", "/usr/libexec/xtables")  # fmt: skip


def _worker_env() -> dict[str, str]:
    """Start-up costs of python-iptables halve when it need not search for libxtables or load setuptools'
    distutils shim (300 ms -> 150 ms per worker)."""
    env = subproc.python_helper_env()
    env["SETUPTOOLS_USE_DISTUTILS"] = "stdlib"
    for path in XTABLES_DIRS:
        if os.path.isdir(path):
            env["XTABLES_LIBDIR"] = path
            break
    return env


def _worker(family: str, op: str, payload: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    argv = [sys.executable, "-m", "imds_agent.redirect.iptworker", family, op]
    env = _worker_env()
    try:
        proc = subproc.run(argv, timeout=WORKER_TIMEOUT, env=env, input=json.dumps(payload) if payload else None)
        answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except subproc.ProcessError as exc:
        raise RedirectError(f"iptables {family} {op}: {exc}") from None
    except (ValueError, IndexError):
        raise RedirectError(f"iptables {family} {op}: the worker gave no answer") from None
    if not answer.get("ok"):
        error = str(answer.get("error", "unknown error"))
        if "Permission denied" in error or "Operation not permitted" in error:
            error += " (needs CAP_NET_ADMIN and CAP_NET_RAW)"
        raise RedirectError(f"iptables {family} {op}: {error}")
    return answer


def legacy_rules_in_use() -> bool:
    """Whether this host already has legacy iptables rules of its own (then auto picks this backend).

    Probing loads the legacy tables, so nothing is asked of the kernel unless some are already registered.
    """
    try:
        with open(IP_TABLES_NAMES, encoding="ascii") as fh:
            if not fh.read().split():
                return False
    except OSError:
        return False
    try:
        return int(_worker("ipv4", "usage").get("rules", 0)) > 0
    except RedirectError as exc:
        log.debug("legacy iptables probe failed: %s", exc)
        return False


class IptablesBackend:
    """Redirect with an IMDS_AGENT chain in the legacy nat tables and guard with one in the filter tables (IPv4 and
    IPv6)."""

    name = "iptables"
    # libiptc talks to the kernel through a raw socket, so repairs need CAP_NET_RAW as well.
    capabilities: tuple[int, ...] = (CAP_NET_ADMIN, CAP_NET_RAW)
    containers = True

    def __init__(self) -> None:
        self._reason = ""

    def can_own(self) -> bool:
        """iptables rules cannot belong to a process: fail_mode open needs the guardian (guardian.py)."""
        return False

    def is_supported(self) -> bool:
        """Whether python-iptables, the legacy nat and filter tables and the owner, comment, DNAT and REJECT
        extensions work here."""
        try:
            _worker("ipv4", "probe")
        except RedirectError as exc:
            text = str(exc)
            if "owner" in text:
                text += " (kernel needs CONFIG_NETFILTER_XT_MATCH_OWNER)"
            self._reason = text
            return False
        return True

    def unsupported_reason(self) -> str:
        """What is missing, after is_supported() said no."""
        return self._reason

    def apply(self, spec: RedirectSpec, owned: bool = False) -> None:
        """Install our chains and jumps (nat, then filter) for each family in the spec; remove IPv6 ones when IPv6
        is off."""
        del owned  # iptables rules cannot belong to a process; see guardian.py
        wanted = iptrules.build_rules(spec)
        for family, data in wanted.items():
            _worker(family, "apply", data)
        for family in iptrules.FAMILIES:
            if family not in wanted:
                self._remove_family(family)

    def _remove_family(self, family: str) -> bool:
        try:
            return bool(_worker(family, "remove").get("removed"))
        except RedirectError as exc:
            if family == "ipv6" and "Address family not supported" in str(exc):
                return False
            raise

    def remove(self) -> bool:
        """Remove our chains and jumps from both tables of both families."""
        removed = False
        for family in iptrules.FAMILIES:
            removed = self._remove_family(family) or removed
        return removed

    def check(self, spec: Optional[RedirectSpec] = None) -> CheckResult:
        """Compare both families' chains and jumps, in both tables, with ``spec``."""
        wanted = iptrules.build_rules(spec) if spec is not None else {}
        details: list[str] = []
        views: list[RuleView] = []
        present_any = False
        for family in iptrules.FAMILIES:
            answer = _worker(family, "state")
            found, containers = answer["tables"], answer.get("containers", {})
            chains = [(t, found.get(t, {}), IPTABLES_CHAIN) for t in iptrules.TABLES]
            chains += [(t, containers.get(name, {}), name) for t, name, _ in iptrules.CONTAINER_CHAINS]
            for table, part, name in chains:
                present_any = present_any or bool(part.get("chain")) or part.get("jumps", 0) > 0
                for rule in part.get("rules", []):
                    text = f"-t {table} {iptrules.render(rule, name)}"
                    views.append(RuleView(family, text, rule.get("packets"), rule.get("bytes")))
            if spec is not None:
                details.extend(self._differences(family, found, wanted.get(family)))
                details.extend(self._container_differences(family, containers, wanted.get(family)))
        if not present_any:
            return CheckResult(self.name, State.ABSENT, ("chain IMDS_AGENT is missing",), owned=False)
        return CheckResult(self.name, State.PARTIAL if details else State.PRESENT, tuple(details), tuple(views), False)

    @staticmethod
    def _differences(family: str, found: dict[str, Any], wanted: Optional[dict[str, Any]]) -> list[str]:
        """``found``: per table, what the worker's state read; ``wanted``: the family's part of build_rules."""
        if wanted is None:
            installed = any(part.get("chain") or part.get("jumps") for part in found.values())
            return [f"{family} rules are installed but not wanted"] if installed else []
        out: list[str] = []
        empty = {"chain": False, "jumps": 0, "jump_first": False, "rules": []}
        for part in wanted["tables"]:
            # The nat table's messages name no table (it was the only one); the guard's say "filter".
            label = f"{family} " if part["table"] == "nat" else f"{family} {part['table']} "
            out.extend(IptablesBackend._table_differences(label, found.get(part["table"], empty), part))
        return out

    @staticmethod
    def _container_differences(family: str, found: dict[str, Any], wanted: Optional[dict[str, Any]]) -> list[str]:
        """The container chains (``found``: per chain, as the worker's state read them) against the spec's."""
        parts = (wanted or {}).get("containers", [])
        if not parts:
            there = any(p.get("chain") or p.get("jumps") for p in found.values())
            return [f"{family} container chains are installed but not wanted"] if there else []
        empty = {"chain": False, "jumps": 0, "jump_first": False, "rules": []}
        out: list[str] = []
        for part in parts:
            label = f"{family} {part['table']} "
            got = found.get(part["chain"], empty)
            out.extend(IptablesBackend._table_differences(label, got, part, part["chain"], part["jump"]["from"]))
        return out

    @staticmethod
    def _table_differences(
        label: str, found: dict[str, Any], wanted: dict[str, Any], chain: str = "IMDS_AGENT", hook: str = "OUTPUT"
    ) -> list[str]:
        out: list[str] = []
        if not found["chain"]:
            out.append(f"{label}chain {chain} is missing")
        if found["jumps"] == 0:
            out.append(f"{label}jump from {hook} is missing")
        elif found["jumps"] > 1:
            out.append(f"{label}{hook} jumps to {chain} {found['jumps']} times")
        elif not found["jump_first"]:
            out.append(f"{label}jump is not the first rule in {hook}")
        have = [iptrules.significant(r) for r in found["rules"]]
        want = [iptrules.significant(r) for r in wanted["rules"]]
        if found["chain"] and have != want:
            out.append(f"{label}rules differ: has {len(have)}, wants '{iptrules.render(wanted['rules'][0], chain)}'")
        return out

    def close(self) -> None:
        """Nothing held between calls."""
