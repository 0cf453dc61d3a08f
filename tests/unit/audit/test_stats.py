"""The running totals behind the agent's systemd status line."""

from __future__ import annotations

import threading
import time

from imds_agent.audit.stats import Tally, Totals, status_line
from imds_agent.identity.caller import Caller
from imds_agent.proxy.types import Answer, Client, Kind, Outcome


def answer(kind: Kind, outcome: Outcome, status: int, known: bool = True, cause: str | None = None) -> Answer:
    caller = Caller(True, 1, "/usr/bin/curl", 1000) if known else Caller.unknown("gone")
    client = Client(("127.0.0.1", 1), ("127.0.0.1", 2), None, caller, 0.0)
    return Answer(0.0, "audit", client, "GET", "/", kind, status, outcome, cause=cause)


def test_each_request_counts_where_it_belongs() -> None:
    tally = Tally()
    tally.add(answer(Kind.V1, Outcome.ALLOW, 200))
    tally.add(answer(Kind.V1, Outcome.WOULD_DENY, 200))
    tally.add(answer(Kind.V2, Outcome.DENY, 403, known=False))
    tally.add(answer(Kind.TOKEN, Outcome.ALLOW, 502, cause="refused the connection"))
    tally.add(answer(Kind.V1, Outcome.ALLOW, 504, cause="did not answer"))
    tally.add(answer(Kind.INVALID, Outcome.REFUSED, 400, cause="not an HTTP/1.x request"))
    tally.failed_to_record()
    assert tally.totals() == Totals(requests=6, imdsv1=3, denied=1, would_deny=1, refused=1, upstream_errors=2,
                                    unidentified=1, record_failures=1)  # fmt: skip


class SlowCounts(dict[str, int]):
    """Counters whose every store waits a moment first, which opens the window between reading a count and
    writing it back that a missing lock would let two threads share."""

    def __setitem__(self, key: str, value: int) -> None:
        time.sleep(0.0002)
        super().__setitem__(key, value)


def test_concurrent_adds_are_not_lost() -> None:
    tally = Tally()
    tally._counts = SlowCounts(tally._counts)
    one = answer(Kind.V1, Outcome.ALLOW, 200)

    def many() -> None:
        for _ in range(25):
            tally.add(one)

    threads = [threading.Thread(target=many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tally.totals().requests == 100 == tally.totals().imdsv1


def test_the_status_line_names_the_denials_that_matter_in_each_mode() -> None:
    totals = Totals(requests=10, imdsv1=4, denied=2, would_deny=3, upstream_errors=1, unidentified=0)
    audit = status_line("audit", totals, repairs=1)
    assert audit == (
        "audit mode: 10 requests (4 IMDSv1), 3 would-deny, 1 upstream errors, 0 unidentified, 1 rule repairs"
    )
    assert "2 denied" in status_line("enforce", totals, repairs=0)


def test_the_status_line_names_lost_audit_records_only_when_there_are_some() -> None:
    assert "dropped" not in status_line("audit", Totals(), repairs=0)
    assert status_line("audit", Totals(), repairs=0, dropped=920).endswith(", 920 audit records dropped")
