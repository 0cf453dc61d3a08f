"""The fail-open guardian: the agent's goodbye leaves the rules alone, its death removes them."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from typing import Any, Optional

import pytest

from imds_agent.redirect import guardian


class FakeBackend:
    def __init__(self, removed: bool = True, error: Optional[Exception] = None):
        self.removed = removed
        self.error = error
        self.calls: list[str] = []

    def remove(self) -> bool:
        self.calls.append("remove")
        if self.error is not None:
            raise self.error
        return self.removed

    def close(self) -> None:
        self.calls.append("close")


@pytest.fixture
def signals(monkeypatch: pytest.MonkeyPatch) -> dict[int, Any]:
    """The dispositions main() sets, recorded instead of changing the test process's own."""
    seen: dict[int, Any] = {}
    monkeypatch.setattr(signal, "signal", lambda signum, handler: seen.__setitem__(signum, handler))
    return seen


def run_main(monkeypatch: pytest.MonkeyPatch, stdin: bytes, backend: Optional[FakeBackend] = None) -> int:
    """main() with ``stdin`` as what the agent wrote before the pipe closed; make_backend yields ``backend``."""
    made: list[str] = []

    def make_backend(name: str) -> FakeBackend:
        made.append(name)
        assert backend is not None, "the guardian made a backend after the agent said stop"
        return backend

    monkeypatch.setattr(guardian, "make_backend", make_backend)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = guardian.main(["--backend", "iptables"])
    assert made == ([] if backend is None else ["iptables"])
    return code


def test_the_agents_goodbye_leaves_the_rules_alone(monkeypatch: pytest.MonkeyPatch, signals: dict[int, Any]) -> None:
    assert run_main(monkeypatch, b"stop\n") == 0


def test_sigterm_and_sigint_are_ignored(monkeypatch: pytest.MonkeyPatch, signals: dict[int, Any]) -> None:
    run_main(monkeypatch, b"stop\n")
    assert signals == {signal.SIGTERM: signal.SIG_IGN, signal.SIGINT: signal.SIG_IGN}


@pytest.mark.parametrize("written", [b"", b"sto", b"stopped\n"], ids=["nothing", "cut-short", "another-word"])
def test_the_agents_death_removes_the_rules(
    monkeypatch: pytest.MonkeyPatch, signals: dict[int, Any], written: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend()
    assert run_main(monkeypatch, written, backend) == 0
    assert backend.calls == ["remove", "close"]
    assert "redirect rules removed" in caplog.text


def test_rules_already_gone_is_still_success(
    monkeypatch: pytest.MonkeyPatch, signals: dict[int, Any], caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend(removed=False)
    assert run_main(monkeypatch, b"", backend) == 0
    assert "were already gone" in caplog.text


def test_a_failed_removal_is_exit_1_and_the_backend_is_still_closed(
    monkeypatch: pytest.MonkeyPatch, signals: dict[int, Any], caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend(error=RuntimeError("iptables worker crashed"))
    assert run_main(monkeypatch, b"", backend) == 1
    assert backend.calls == ["remove", "close"]
    assert "could not be removed: iptables worker crashed" in caplog.text


class FakeStdin:
    def __init__(self, error: Optional[OSError] = None):
        self.error = error
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        self.written += data
        return len(data)

    def close(self) -> None:
        self.closed = True


class FakeProc:
    def __init__(self, stdin: Optional[FakeStdin], exits: bool = True):
        self.stdin = stdin
        self.exits = exits
        self.calls: list[str] = []

    def wait(self, timeout: Optional[float] = None) -> int:
        self.calls.append(f"wait {timeout}")
        if not self.exits:
            raise subprocess.TimeoutExpired(["guardian"], timeout or 0)
        return 0

    def kill(self) -> None:
        self.calls.append("kill")


def test_stop_says_goodbye_closes_the_pipe_and_waits() -> None:
    stdin = FakeStdin()
    proc = FakeProc(stdin)
    guardian.Guardian(proc).stop()  # type: ignore[arg-type]
    assert (stdin.written, stdin.closed) == (b"stop\n", True)
    assert proc.calls == ["wait 10"]


def test_a_guardian_that_does_not_exit_is_killed() -> None:
    proc = FakeProc(FakeStdin(), exits=False)
    guardian.Guardian(proc).stop()  # type: ignore[arg-type]
    assert proc.calls == ["wait 10", "kill"]


def test_a_guardian_already_gone_is_still_waited_for() -> None:
    proc = FakeProc(FakeStdin(error=BrokenPipeError(32, "Broken pipe")))
    guardian.Guardian(proc).stop()  # type: ignore[arg-type]
    assert proc.calls == ["wait 10"]


def test_start_runs_the_guardian_module_in_its_own_session(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[list[str], dict[str, Any]]] = []

    class Popen:
        pid = 4242
        stdin = None

        def __init__(self, argv: list[str], **kwargs: Any):
            started.append((argv, kwargs))

    monkeypatch.setattr(subprocess, "Popen", Popen)
    handle = guardian.start_guardian("nftables")
    ((argv, kwargs),) = started
    assert argv == [sys.executable, "-m", "imds_agent.redirect.guardian", "--backend", "nftables"]
    assert kwargs["stdin"] == subprocess.PIPE and kwargs["start_new_session"] is True
    assert kwargs["env"]["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"
    assert handle.proc.pid == 4242
