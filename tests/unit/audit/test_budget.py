"""The audit budget: one uid's flood is summarised instead of written, and never costs another uid its records."""

from __future__ import annotations

from imds_agent.audit.budget import AuditBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_past_the_burst_lines_are_counted_and_summarised_when_the_uid_may_write_again() -> None:
    clock = Clock()
    budget = AuditBudget(rate=2.0, burst=3, clock=clock)
    assert [budget.admit(1000, "allow", 1.0)[0] for _ in range(3)] == [True] * 3
    assert [budget.admit(1000, d, 2.0 + i)[0] for i, d in enumerate(["allow", "would-deny", "allow"])] == [False] * 3
    assert budget.suppressed == 3
    clock.now += 0.5  # one token back at 2 a second
    admitted, summary = budget.admit(1000, "allow", 9.0)
    assert admitted and summary is not None
    assert (summary.uid, summary.count, summary.first, summary.last) == (1000, 3, 2.0, 4.0)
    assert summary.decisions == {"allow": 2, "would-deny": 1}
    record = summary.as_dict()
    assert record["summary"] == "3 similar requests from uid 1000 suppressed (audit budget)"
    assert budget.admit(1000, "allow", 9.5) == (False, None)  # that token is spent; nothing pending to summarise


def test_one_uids_flood_leaves_others_and_root_alone() -> None:
    budget = AuditBudget(rate=1.0, burst=2, clock=Clock())
    for _ in range(1000):
        budget.admit(1001, "would-deny", 1.0)
    assert budget.admit(1000, "allow", 1.0) == (True, None)
    assert all(budget.admit(0, "allow", 1.0)[0] for _ in range(100))  # root can remove the log anyway
    assert budget.admit(None, "deny", 1.0)[0]  # unidentified callers have a bucket of their own


def test_pending_summaries_are_handed_over_at_stop_and_rate_0_is_unbounded() -> None:
    budget = AuditBudget(rate=1.0, burst=1, clock=Clock())
    budget.admit(1000, "allow", 1.0)
    budget.admit(1000, "allow", 2.0)
    (summary,) = budget.pending()
    assert summary.count == 1 and budget.pending() == []
    unbounded = AuditBudget(rate=0, burst=1)
    assert all(unbounded.admit(1000, "allow", 1.0)[0] for _ in range(10000))


def test_at_the_bucket_bound_the_quietest_uid_is_forgotten_never_the_flooder(monkeypatch) -> None:
    from imds_agent.audit import budget as budgetmod

    monkeypatch.setattr(budgetmod, "MAX_BUCKETS", 2)
    budget = AuditBudget(rate=0.001, burst=2, clock=Clock())
    for _ in range(5):
        budget.admit(1001, "allow", 1.0)  # the flooder: bucket empty, 3 suppressed
    budget.admit(1002, "allow", 1.0)  # a quiet uid
    budget.admit(1003, "allow", 1.0)  # a third uid: one bucket must go
    assert budget.admit(1001, "allow", 2.0) == (False, None)  # still limited: its empty bucket was kept


def test_root_in_a_container_is_not_exempt() -> None:
    # Caller.budget_key gives container callers a negative key: the budget applies to them as to any uid.
    budget = AuditBudget(rate=1, burst=2, clock=lambda: 0.0)
    assert [budget.admit(-4026532000, "allow", 0.0)[0] for _ in range(3)] == [True, True, False]
    summary = budget.pending()[0].as_dict()
    assert (
        summary["summary"]
        == "1 similar requests from the container network namespace 4026532000 suppressed (audit budget)"
    )
