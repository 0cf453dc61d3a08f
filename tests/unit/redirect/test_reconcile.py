"""The reconciler: repairs what is not fully present, counts repairs and failures, never dies on errors."""

from __future__ import annotations

import time
from typing import Optional

from imds_agent.errors import RedirectError
from imds_agent.redirect.base import CheckResult, RedirectSpec, State
from imds_agent.redirect.reconcile import Reconciler

SPEC = RedirectSpec(exempt_uid=990, listen_port=8775)


class FakeBackend:
    name = "fake"

    def __init__(self, states: list[State], fail_apply: bool = False, fail_check: bool = False):
        self.states = states
        self.fail_apply = fail_apply
        self.fail_check = fail_check
        self.applied: list[tuple[RedirectSpec, bool]] = []

    def check(self, spec: Optional[RedirectSpec] = None) -> CheckResult:
        if self.fail_check:
            raise RedirectError("netlink: permission denied")
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return CheckResult("fake", state, details=("chain output missing",) if state is not State.PRESENT else ())

    def apply(self, spec: RedirectSpec, owned: bool = False) -> None:
        if self.fail_apply:
            raise RedirectError("batch rejected")
        self.applied.append((spec, owned))


def test_present_rules_are_left_alone() -> None:
    backend = FakeBackend([State.PRESENT])
    rec = Reconciler(backend, SPEC, owned=True, interval=5)  # type: ignore[arg-type]
    assert rec.check_once() is State.PRESENT
    assert backend.applied == [] and rec.repairs == 0


def test_partial_and_absent_rules_are_reapplied_with_the_same_ownership(caplog) -> None:
    backend = FakeBackend([State.PARTIAL, State.ABSENT, State.PRESENT])
    rec = Reconciler(backend, SPEC, owned=True, interval=5)  # type: ignore[arg-type]
    assert rec.check_once() is State.PARTIAL
    assert rec.check_once() is State.ABSENT
    assert rec.check_once() is State.PRESENT
    assert backend.applied == [(SPEC, True), (SPEC, True)]
    assert rec.repairs == 2
    assert "chain output missing" in caplog.text


def test_failures_are_counted_and_do_not_raise() -> None:
    backend = FakeBackend([State.ABSENT], fail_apply=True)
    rec = Reconciler(backend, SPEC, owned=False, interval=5)  # type: ignore[arg-type]
    rec.check_once()
    assert rec.failures == 1 and rec.repairs == 0
    backend = FakeBackend([State.ABSENT], fail_check=True)
    rec = Reconciler(backend, SPEC, owned=False, interval=5)  # type: ignore[arg-type]
    rec.check_once()
    assert rec.failures == 1 and backend.applied == []


def test_background_thread_repairs_and_stops() -> None:
    backend = FakeBackend([State.ABSENT, State.PRESENT])
    rec = Reconciler(backend, SPEC, owned=False, interval=0.01)  # type: ignore[arg-type]
    rec.start()
    deadline = time.monotonic() + 2
    while rec.repairs == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    rec.stop()
    assert rec.repairs == 1


def test_interval_zero_disables_the_thread() -> None:
    rec = Reconciler(FakeBackend([State.ABSENT]), SPEC, owned=False, interval=0)  # type: ignore[arg-type]
    rec.start()
    assert rec._thread is None
    rec.stop()


def test_an_unexpected_error_does_not_end_the_background_checks(caplog) -> None:
    class Flaky(FakeBackend):
        calls = 0

        def check(self, spec: Optional[RedirectSpec] = None) -> CheckResult:
            self.calls += 1
            if self.calls == 1:
                raise KeyError("a library bug")
            return super().check(spec)

    backend = Flaky([State.ABSENT, State.PRESENT])
    rec = Reconciler(backend, SPEC, owned=False, interval=0.02)  # type: ignore[arg-type]
    rec.start()
    try:
        deadline = time.monotonic() + 5
        while backend.applied == [] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rec.alive() and rec.failures == 1 and backend.applied == [(SPEC, False)]
        assert "unexpected error while checking" in caplog.text
    finally:
        rec.stop()
    assert rec.alive()  # stopped on purpose is not a problem


def test_a_change_notification_wakes_the_check_and_a_stop_during_it_is_never_missed(monkeypatch) -> None:
    import socket as socketmod

    from imds_agent.redirect import reconcile

    checks: list[float] = []
    events_r, events_w = socketmod.socketpair()

    class Notified:
        def check(self, spec: Optional[RedirectSpec] = None) -> CheckResult:
            checks.append(time.monotonic())
            return CheckResult("nftables", State.PRESENT)

        def change_events(self) -> socketmod.socket:
            return events_r

    monkeypatch.setattr(reconcile, "EVENT_SETTLE", 0.2)
    rec = Reconciler(Notified(), SPEC, owned=False, interval=3)  # type: ignore[arg-type]
    rec.start()
    events_w.send(b"a rule set change")
    deadline = time.monotonic() + 2
    while not checks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert checks, "the notification did not wake a check (the poll is 3 s away)"
    events_w.send(b"another change")  # the loop is now in its settle pause: a stop lands in it
    time.sleep(0.05)
    started = time.monotonic()
    rec.stop()
    assert time.monotonic() - started < 1.0  # the stop used to be swallowed and wait out the next poll
    events_w.close()
