"""Running totals since the agent started, for the one-line status systemd shows (`systemctl status imds-agent`).

The inventory answers "who, over time"; these answer "is it working right now" at a glance on one host: traffic,
IMDSv1 share, denials, upstream failures and rule repairs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Totals:
    """A consistent snapshot of the counters."""

    requests: int = 0
    imdsv1: int = 0
    denied: int = 0
    would_deny: int = 0
    upstream_errors: int = 0
    unidentified: int = 0


class Tally:
    """Thread-safe counters, one add() per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys((f.name for f in fields(Totals)), 0)

    def add(self, kind: str, decision: str, status: int, identified: bool) -> None:
        """Count one request: its kind (v1, v2, token, invalid), decision, status sent and whether the caller
        was identified."""
        with self._lock:
            c = self._counts
            c["requests"] += 1
            c["imdsv1"] += kind == "v1"
            c["denied"] += decision == "deny"
            c["would_deny"] += decision == "would-deny"
            c["upstream_errors"] += status in (502, 504)
            c["unidentified"] += not identified

    def totals(self) -> Totals:
        """The counters as they are now."""
        with self._lock:
            return Totals(**self._counts)


def status_line(mode: str, totals: Totals, repairs: int) -> str:
    """What `systemctl status` shows as the agent's Status."""
    denials = f"{totals.denied} denied" if mode == "enforce" else f"{totals.would_deny} would-deny"
    return (
        f"{mode} mode: {totals.requests} requests ({totals.imdsv1} IMDSv1), {denials}, "
        f"{totals.upstream_errors} upstream errors, {totals.unidentified} unidentified, {repairs} rule repairs"
    )
