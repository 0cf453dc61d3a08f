"""set-mode edits one line, keeps comments and layout, refuses to write an invalid file."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any, NoReturn, Optional

import pytest

from imds_agent import setmode, subproc
from imds_agent.errors import ConfigError
from imds_agent.setmode import edit_mode, set_mode

TEXT = "# operator's notes\nmode: audit   # switched by the rollout\nuser: imds-agent\n"


def test_mode_line_is_edited_in_place() -> None:
    assert edit_mode(TEXT, "enforce", "a.yaml") == TEXT.replace("mode: audit ", "mode: enforce ")


def test_missing_mode_is_appended_and_empty_file_gets_one() -> None:
    assert edit_mode("user: x", "enforce", "a.yaml") == "user: x\nmode: enforce\n"
    assert edit_mode("", "audit", "a.yaml") == "mode: audit\n"


def test_an_invalid_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("mode: audit\nredirect: {backend: bogus}\n")
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="redirect.backend"):
        set_mode(str(path), "enforce", pid=None)
    assert path.read_text() == "mode: audit\nredirect: {backend: bogus}\n"


def test_set_mode_keeps_permissions_and_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(setmode, "reload_agent", lambda pid: f"reloaded {pid}")
    path = tmp_path / "agent.yaml"
    path.write_text(TEXT)
    os.chmod(path, 0o640)
    summary = set_mode(str(path), "enforce", pid=4242)
    assert summary.endswith("mode enforce; reloaded 4242")
    assert path.read_text().splitlines()[1].startswith("mode: enforce")
    assert oct(path.stat().st_mode & 0o777) == "0o640"


class Kills:
    """Stands in for os.kill: records (pid, signal), or raises ``error``."""

    def __init__(self, error: Optional[OSError] = None):
        self.error = error
        self.sent: list[tuple[int, int]] = []

    def __call__(self, pid: int, sig: int) -> None:
        if self.error is not None:
            raise self.error
        self.sent.append((pid, sig))


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> Kills:
    fake = Kills()
    monkeypatch.setattr(os, "kill", fake)
    return fake


@pytest.fixture
def no_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    real_isdir = os.path.isdir

    def isdir(path: Any) -> bool:
        return False if path == "/run/systemd/system" else real_isdir(path)

    def no_run(argv: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError(f"systemctl asked without systemd: {argv}")

    monkeypatch.setattr(os.path, "isdir", isdir)
    monkeypatch.setattr(subproc, "run", no_run)


def test_an_explicit_pid_gets_sighup(kills: Kills, no_systemd: None) -> None:
    assert setmode.reload_agent(4242) == "sent SIGHUP to 4242"
    assert kills.sent == [(4242, signal.SIGHUP)]


def test_without_systemd_the_pid_file_names_the_agent(
    kills: Kills, no_systemd: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = tmp_path / "imds-agent.pid"
    pidfile.write_text("5151\n")
    monkeypatch.setattr(setmode, "PIDFILE", str(pidfile))
    assert setmode.reload_agent() == f"sent SIGHUP to 5151 (from {pidfile})"
    assert kills.sent == [(5151, signal.SIGHUP)]


@pytest.mark.parametrize("content", [None, "", "not a pid\n"], ids=["missing", "empty", "garbage"])
def test_without_a_readable_pid_file_nothing_is_signalled(
    kills: Kills, no_systemd: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: Optional[str]
) -> None:
    pidfile = tmp_path / "imds-agent.pid"
    if content is not None:
        pidfile.write_text(content)
    monkeypatch.setattr(setmode, "PIDFILE", str(pidfile))
    assert setmode.reload_agent() == "no running agent found; the new mode applies when it starts"
    assert kills.sent == []


def test_a_pid_file_left_by_a_dead_agent_is_no_running_agent(
    no_systemd: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "kill", Kills(ProcessLookupError(3, "No such process")))
    pidfile = tmp_path / "imds-agent.pid"
    pidfile.write_text("5151\n")
    monkeypatch.setattr(setmode, "PIDFILE", str(pidfile))
    assert setmode.reload_agent().startswith("no running agent found")


def systemd(monkeypatch: pytest.MonkeyPatch, active: int) -> list[list[str]]:
    """A host booted with systemd whose imds-agent.service is (0) or is not (3) active; records systemctl calls."""
    runs: list[list[str]] = []

    def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        runs.append(list(argv))
        return subprocess.CompletedProcess(argv, active if argv[1] == "is-active" else 0, "", "")

    real_isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda path: path == "/run/systemd/system" or real_isdir(path))
    monkeypatch.setattr(subproc, "run", run)
    return runs


def test_under_systemd_an_active_service_is_reloaded(kills: Kills, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = systemd(monkeypatch, active=0)
    assert setmode.reload_agent() == "reloaded imds-agent.service"
    assert runs == [
        ["systemctl", "is-active", "--quiet", "imds-agent.service"],
        ["systemctl", "reload", "imds-agent.service"],
    ]
    assert kills.sent == []


def test_under_systemd_an_inactive_service_falls_back_to_the_pid_file(
    kills: Kills, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = systemd(monkeypatch, active=3)
    pidfile = tmp_path / "imds-agent.pid"
    pidfile.write_text("6262")
    monkeypatch.setattr(setmode, "PIDFILE", str(pidfile))
    assert setmode.reload_agent() == f"sent SIGHUP to 6262 (from {pidfile})"
    assert [argv[1] for argv in runs] == ["is-active"]
    assert kills.sent == [(6262, signal.SIGHUP)]


def test_set_mode_with_a_pid_signals_that_pid(kills: Kills, no_systemd: None, tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(TEXT)
    assert set_mode(str(path), "enforce", pid=7373).endswith("mode enforce; sent SIGHUP to 7373")
    assert kills.sent == [(7373, signal.SIGHUP)]
