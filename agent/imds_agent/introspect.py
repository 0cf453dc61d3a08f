"""What the running agent says about itself: the control socket's answers and the metrics' gauges.

Read-only views of a started Agent (daemon.py), kept out of the assembler so that it only wires.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from . import __version__
from .audit import metrics

if TYPE_CHECKING:
    from .daemon import Agent


def metrics_state(agent: Agent) -> metrics.AgentState:
    """The gauges' values now."""
    icpt = agent.interception
    families = {"ipv4": True, "ipv6": icpt.spec.with_ipv6} if icpt is not None else {}
    return metrics.AgentState(
        __version__, agent.mode, icpt.backend.name if icpt else "none", agent.config.redirect.fail_mode,
        agent.tokens.expires_at(), families, icpt.repairs if icpt else 0, agent.recorder.audit_dropped,
        agent.recorder.budget.suppressed,
    )  # fmt: skip


def control_answer(agent: Agent, command: str) -> Any:
    """The control socket's answer to ``command`` (status, report, rules); KeyError for any other."""
    if command == "status":
        icpt = agent.interception
        expires = agent.tokens.expires_at()
        return {
            "version": __version__,
            "mode": agent.mode,
            "backend": icpt.backend.name if icpt else None,
            "fail_mode": agent.config.redirect.fail_mode,
            "rules": icpt.backend.check(icpt.spec).state.value if icpt else "disabled",
            "rule_repairs": icpt.repairs if icpt else 0,
            "token_expires_in": round(expires - time.time()) if expires else None,
            "totals": dataclasses.asdict(agent.recorder.tally.totals()),
            "audit_dropped": agent.recorder.audit_dropped,
            "uptime_seconds": round(time.monotonic() - agent.started_at),
            "status_line": agent.status(),
        }
    if command == "report":
        return [vars(e) for e in agent.recorder.inventory.entries()]
    if command == "rules":
        if agent.interception is None:
            return None
        result = agent.interception.backend.check(agent.interception.spec)
        doc = dataclasses.asdict(result)
        doc["state"] = result.state.value
        return doc
    raise KeyError(command)
