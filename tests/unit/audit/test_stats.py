"""The running totals behind the agent's systemd status line."""

from __future__ import annotations

import threading

from imds_agent.audit.stats import Tally, Totals, status_line


def test_each_request_counts_where_it_belongs() -> None:
    tally = Tally()
    tally.add("v1", "allow", 200, True)
    tally.add("v1", "would-deny", 200, True)
    tally.add("v2", "deny", 403, False)
    tally.add("token", "allow", 502, True)
    tally.add("v1", "allow", 504, True)
    assert tally.totals() == Totals(requests=5, imdsv1=3, denied=1, would_deny=1, upstream_errors=2, unidentified=1)


def test_concurrent_adds_are_not_lost() -> None:
    tally = Tally()

    def many() -> None:
        for _ in range(2000):
            tally.add("v1", "allow", 200, True)

    threads = [threading.Thread(target=many) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tally.totals().requests == 16000 == tally.totals().imdsv1


def test_the_status_line_names_the_denials_that_matter_in_each_mode() -> None:
    totals = Totals(requests=10, imdsv1=4, denied=2, would_deny=3, upstream_errors=1, unidentified=0)
    audit = status_line("audit", totals, repairs=1)
    assert audit == (
        "audit mode: 10 requests (4 IMDSv1), 3 would-deny, 1 upstream errors, 0 unidentified, 1 rule repairs"
    )
    assert "2 denied" in status_line("enforce", totals, repairs=0)
