"""The audit log file: size rotation with numbered backups, truncation without backups, a failing disk logged
once. What a line says is tested in test_records.py; here every record is a tiny dict of a known size."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from imds_agent.audit import log as logmod
from imds_agent.audit.log import AuditLog

LINE = len('{"n":0}\n')  # the size of every record below


@pytest.fixture(autouse=True)
def _records_are_their_own_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logmod, "audit_line", dict)


def write(log: AuditLog, *numbers: int) -> None:
    for n in numbers:
        log.write({"n": n})  # type: ignore[arg-type]


def numbers(path: Path) -> list[int]:
    return [json.loads(line)["n"] for line in path.read_text().splitlines()]


def test_rotation_shifts_older_backups_and_drops_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "audit.log"
    log = AuditLog(str(path), max_bytes=LINE, backups=3)  # one record per file
    write(log, 0, 1, 2, 3, 4)
    log.close()
    assert [numbers(Path(f"{path}{suffix}")) for suffix in ("", ".1", ".2", ".3")] == [[4], [3], [2], [1]]
    assert not Path(f"{path}.4").exists()


def test_a_file_fills_up_to_max_bytes_before_it_rotates(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), max_bytes=2 * LINE, backups=1)
    write(log, 0, 1, 2)
    log.close()
    assert (numbers(path), numbers(Path(f"{path}.1"))) == ([2], [0, 1])


def test_without_backups_the_file_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), max_bytes=LINE, backups=0)
    write(log, 0, 1, 2)
    log.close()
    assert numbers(path) == [2]
    assert sorted(os.listdir(tmp_path)) == ["audit.log"]


def test_a_reopened_log_counts_what_the_file_already_holds(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    first = AuditLog(str(path), max_bytes=LINE, backups=1)
    write(first, 0)
    first.close()
    again = AuditLog(str(path), max_bytes=LINE, backups=1)
    write(again, 1)
    again.close()
    assert (numbers(path), numbers(Path(f"{path}.1"))) == ([1], [0])


def test_a_failing_write_is_logged_once_and_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.log"
    path.mkdir()  # opening it fails with EISDIR
    log = AuditLog(str(path), max_bytes=LINE, backups=1)
    with caplog.at_level(logging.ERROR, logger="imds_agent.audit.log"):
        write(log, 0, 1, 2)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"cannot write the audit log {path}"]


def test_a_failure_after_recovery_is_logged_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.log"
    path.mkdir()
    log = AuditLog(str(path), max_bytes=LINE, backups=1)
    with caplog.at_level(logging.ERROR, logger="imds_agent.audit.log"):
        write(log, 0)
        path.rmdir()
        write(log, 1)  # recovers
        backup = tmp_path / "audit.log.1"
        backup.mkdir()
        (backup / "keep").write_text("")  # rotating onto a non-empty directory fails
        write(log, 2, 3)
    log.close()
    assert len(caplog.records) == 2
    assert numbers(path) == [1]
