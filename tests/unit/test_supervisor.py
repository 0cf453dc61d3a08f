"""The supervisor: watchdog pacing, withholding the keep-alive for a hung accept loop, exits, reloads, the status
line, and the periodic inventory save, driven through its notify and clock seams."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional

from imds_agent import supervisor
from imds_agent.supervisor import INVENTORY_SAVE_INTERVAL, Supervisor


class FakeAgent:
    def __init__(self) -> None:
        self.mode = "audit"
        self.trouble: tuple[Optional[str], bool] = (None, False)
        self.reloads = 0
        self.saves = 0
        self.requests = 0
        self.limits: list[float] = []

    def problem(self, stall_limit: float) -> tuple[Optional[str], bool]:
        self.limits.append(stall_limit)
        return self.trouble

    def reload(self) -> bool:
        self.reloads += 1
        return True

    def save_inventory(self) -> None:
        self.saves += 1

    def status(self) -> str:
        return f"{self.mode} mode: {self.requests} requests"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(watchdog: Optional[float] = None) -> tuple[Supervisor, FakeAgent, list[tuple[str, ...]], Clock]:
    agent = FakeAgent()
    sent: list[tuple[str, ...]] = []

    def notify(*fields: str) -> bool:
        sent.append(fields)
        return True

    clock = Clock()
    sup = Supervisor(agent, notify=notify, watchdog=watchdog, clock=clock)
    sup.ready()
    sent.clear()
    return sup, agent, sent, clock


def test_the_watchdog_is_kicked_every_turn_at_its_own_pace() -> None:
    sup, agent, sent, _ = make(watchdog=0.4)  # sdnotify gives half of WATCHDOG_USEC: 0.8 s -> 0.4 s
    assert sup.tick == 0.4 and sup.stall_limit == 5.0
    assert sup.turn() is None and sent == [("WATCHDOG=1",)]
    slow, *_ = make(watchdog=30.0)
    assert slow.tick == 1.0 and slow.stall_limit == 60.0  # a hang is judged over two watchdog intervals
    quiet, _, quiet_sent, _ = make()
    quiet.turn()
    assert quiet_sent == []  # no watchdog: nothing to kick, status unchanged


def test_a_hung_accept_loop_withholds_the_keep_alive_and_logs_once_until_it_recovers(caplog) -> None:
    sup, agent, sent, _ = make(watchdog=1.0)
    agent.trouble = ("the accept loop has not turned for 9s", False)
    assert sup.turn() is None and sup.turn() is None
    assert sent == [] and caplog.text.count("not serving") == 1
    agent.trouble = (None, False)
    sup.turn()
    assert sent == [("WATCHDOG=1",)]


def test_a_fatal_problem_stops_with_exit_1() -> None:
    sup, agent, sent, _ = make(watchdog=1.0)
    agent.trouble = ("the reconciler thread has ended", True)
    assert sup.turn() == 1 and sent == []


def test_sighup_reloads_between_turns_and_tells_systemd() -> None:
    sup, agent, sent, _ = make()
    sup.on_signal(signal.SIGHUP)
    assert agent.reloads == 0  # never from inside the signal handler
    sup.turn()
    assert agent.reloads == 1 and sent == [("RELOADING=1",), ("READY=1",)]
    sup.turn()
    assert agent.reloads == 1


def test_sigterm_stops_the_watch_with_exit_0_and_says_stopping() -> None:
    sup, agent, sent, _ = make()
    sup.on_signal(signal.SIGTERM)
    assert sup.watch() == 0 and sent[-1] == ("STOPPING=1",)


def test_the_status_line_is_sent_when_it_changes() -> None:
    sup, agent, sent, _ = make()
    sup.ready()
    assert sent == [("READY=1", "STATUS=audit mode: 0 requests")]
    sup.turn()
    assert len(sent) == 1  # unchanged: not sent again
    agent.requests = 3
    sup.turn()
    assert sent[-1] == ("STATUS=audit mode: 3 requests",)


def test_the_inventory_is_saved_every_interval() -> None:
    sup, agent, _, clock = make()
    sup.turn()
    assert agent.saves == 0
    clock.now += INVENTORY_SAVE_INTERVAL
    sup.turn()
    sup.turn()
    assert agent.saves == 1


def test_the_pidfile_is_written_and_removed_only_while_it_is_ours(tmp_path: Path) -> None:
    path = str(tmp_path / "imds-agent.pid")
    supervisor.write_pidfile(path)
    assert Path(path).read_text() == f"{os.getpid()}\n"
    supervisor.remove_pidfile(path)
    assert not Path(path).exists()
    Path(path).write_text("1\n")  # a newer agent's
    supervisor.remove_pidfile(path)
    assert Path(path).read_text() == "1\n"
    supervisor.write_pidfile(str(tmp_path / "missing-dir" / "x.pid"))  # no runtime directory: nothing, no error


def test_the_descriptor_limit_is_raised_to_the_hard_one(monkeypatch) -> None:
    set_to: list[tuple[int, int]] = []
    monkeypatch.setattr("resource.getrlimit", lambda which: (1024, 65536))
    monkeypatch.setattr("resource.setrlimit", lambda which, limits: set_to.append(limits))
    assert supervisor.raise_descriptor_limit() == 65536 and set_to == [(65536, 65536)]
