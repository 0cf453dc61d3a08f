"""The audit writer: lines leave the request path, a full queue drops and counts, never blocks."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from imds_agent.audit.log import AuditLog
from imds_agent.audit.writer import AuditWriter


def test_queued_lines_are_written_in_order_and_close_drains_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    writer = AuditWriter(AuditLog(str(path), 1 << 20, 1))
    for n in range(100):
        writer.submit({"n": n})
    writer.flush()
    assert [json.loads(x)["n"] for x in path.read_text().splitlines()] == list(range(100))
    writer.submit({"n": 100})
    writer.close()
    assert json.loads(path.read_text().splitlines()[-1]) == {"n": 100}


class SlowLog(AuditLog):
    def __init__(self, path: str, gate: threading.Event) -> None:
        super().__init__(path, 1 << 20, 1)
        self.gate = gate

    def write_record(self, record: dict[str, object]) -> None:
        self.gate.wait(5)  # a disk that has stopped answering
        super().write_record(record)


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()
    writer = AuditWriter(SlowLog(str(tmp_path / "audit.jsonl"), gate), capacity=10)
    started = time.monotonic()
    for n in range(50):
        writer.submit({"n": n})
    assert time.monotonic() - started < 0.5  # never waited for the disk
    assert writer.dropped >= 39 and caplog.text.count("the audit queue is full") == 1
    gate.set()
    writer.close()
