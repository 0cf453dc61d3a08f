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


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_failure_is_retried_after_a_pause_and_the_drop_is_told_when_writing_works_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    path.mkdir()  # cannot be opened as a file
    clock = Clock()
    log = AuditLog(str(path), max_bytes=4096, backups=1, clock=clock)
    with caplog.at_level(logging.INFO, logger="imds_agent.audit.log"):
        write(log, 0)
        path.rmdir()
        write(log, 1)  # within the pause: counted, not tried
        clock.now += AuditLog.RETRY_SECONDS
        write(log, 2)  # works again
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0]["dropped"] == 2 and lines[0]["summary"].startswith("2 records dropped between ")
    assert [x.get("n") for x in lines[1:]] == [2] and log.dropped == 2
    # The cause is the failure's (a directory in the way), not the pause's that followed it.
    assert lines[0]["cause"] == "Is a directory" and lines[0]["summary"].endswith(": Is a directory")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot write the audit log" in m for m in messages) == 1 and any("written again" in m for m in messages)


def test_a_failed_rotation_keeps_writing_to_the_current_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), max_bytes=LINE, backups=1)
    write(log, 0)
    backup = tmp_path / "audit.log.1"
    backup.mkdir()
    (backup / "keep").write_text("")  # rotating onto a non-empty directory fails
    write(log, 1, 2)
    log.close()
    assert numbers(path) == [0, 1, 2] and log.dropped == 0  # a failed rotation used to lose the record
    assert "cannot rotate the audit log" in caplog.text


def test_a_vanished_file_or_directory_is_recreated(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    path = folder / "audit.log"
    clock = Clock()
    log = AuditLog(str(path), max_bytes=4096, backups=1, clock=clock)
    write(log, 0)
    path.unlink()
    folder.rmdir()  # removed while running: 700 of 700 records used to be lost with no log line
    clock.now += AuditLog.RETRY_SECONDS
    write(log, 1)
    log.close()
    assert numbers(path) == [1]


def test_a_short_write_leaves_no_partial_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.log"
    clock = Clock()
    log = AuditLog(str(path), max_bytes=4096, backups=1, clock=clock)
    write(log, 0)
    real_write = os.write
    monkeypatch.setattr("os.write", lambda fd, data: real_write(fd, data[:3]))  # the disk fills up mid-line
    write(log, 1)
    monkeypatch.setattr("os.write", real_write)
    clock.now += AuditLog.RETRY_SECONDS
    write(log, 2)
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]  # every line parses: no truncated JSON
    assert [x.get("n") for x in lines] == [0, None, 2] and lines[1]["dropped"] == 1
    assert "no space left" in lines[1]["cause"]
