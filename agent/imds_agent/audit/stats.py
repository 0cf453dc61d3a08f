"""Running totals since the agent started, for the one-line status systemd shows (`systemctl status imds-agent`).

The inventory answers "who, over time"; these answer "is it working right now" at a glance on one host: traffic,
IMDSv1 share, denials, upstream failures and rule repairs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

from ..proxy.types import Answer, Kind, Outcome


@dataclass(frozen=True)
class Totals:
    """A consistent snapshot of the counters."""

    requests: int = 0
    imdsv1: int = 0
    denied: int = 0
    would_deny: int = 0
    refused: int = 0
    upstream_errors: int = 0
    unidentified: int = 0
    record_failures: int = 0  # answers that could not be recorded in full (audit/recorder.py)


class Tally:
    """Thread-safe counters, one add() per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys((f.name for f in fields(Totals)), 0)

    def add(self, answer: Answer) -> None:
        """Count one answer: its kind, outcome, the status sent and whether the caller was identified."""
        with self._lock:
            c = self._counts
            c["requests"] += 1
            c["imdsv1"] += answer.kind is Kind.V1
            c["denied"] += answer.outcome is Outcome.DENY
            c["would_deny"] += answer.outcome is Outcome.WOULD_DENY
            c["refused"] += answer.outcome is Outcome.REFUSED
            c["upstream_errors"] += answer.cause is not None and answer.outcome is not Outcome.REFUSED
            c["unidentified"] += not answer.caller.known

    def failed_to_record(self) -> None:
        """Count an answer whose recording raised."""
        with self._lock:
            self._counts["record_failures"] += 1

    def totals(self) -> Totals:
        """The counters as they are now."""
        with self._lock:
            return Totals(**self._counts)


def status_line(mode: str, totals: Totals, repairs: int, dropped: int = 0) -> str:
    """What `systemctl status` shows as the agent's Status; audit records lost are named only when there are."""
    denials = f"{totals.denied} denied" if mode == "enforce" else f"{totals.would_deny} would-deny"
    line = (
        f"{mode} mode: {totals.requests} requests ({totals.imdsv1} IMDSv1), {denials}, "
        f"{totals.upstream_errors} upstream errors, {totals.unidentified} unidentified, {repairs} rule repairs"
    )
    return line + (f", {dropped} audit records dropped" if dropped else "")
