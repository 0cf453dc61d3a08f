"""The audit log: one JSON object per request, size-rotated, never a token, a credential or a body.

Each line is one Answer (proxy/types.py), which holds no header value except the User-Agent (kept for the
record, never used to decide).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Optional

from ..proxy.types import Answer

log = logging.getLogger(__name__)


# Caller-controlled strings are cut to these lengths in records, so a request cannot make its line huge.
MAX_USER_AGENT = 256
MAX_EXE = 1024


def _clip(text: Optional[str], limit: int) -> Optional[str]:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"...({len(text) - limit} more)"


def audit_line(answer: Answer) -> dict[str, Any]:
    """The JSON-ready audit form of one Answer (ISO time, caller fields flattened)."""
    c = answer.caller
    when = answer.time
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z",
        "mode": answer.mode,
        "pid": c.pid,
        "exe": _clip(c.exe, MAX_EXE),
        "uid": c.uid,
        "user": c.user,
        "unit": c.unit,
        "container": c.container,
        "exe_verified": c.exe_verified if c.known else None,
        "shared_with": [f"{o.pid} {o.exe}" for o in c.sharers] or None,
        "preload": list(c.preload) or None,
        "identified": c.known,
        "unidentified_reason": c.reason or None,
        "user_agent": _clip(answer.user_agent, MAX_USER_AGENT),
        "method": answer.method,
        "path": answer.shown_path,
        "sensitive": answer.path.sensitive if answer.path is not None else None,
        "imds": answer.kind.value,
        "decision": answer.outcome.value,
        "rule": answer.decided_by,
        "reason": answer.reason,
        "status": answer.status,
        "injected": answer.injected,
        "relayed": answer.relayed,
        "sent": answer.sent,
        "latency_ms": round(answer.latency * 1000, 3),
        "identify_ms": round(answer.client.identify_seconds * 1000, 3),
    }


class AuditLog:
    """Appends records to a JSON-lines file, one write(2) each (O_APPEND), rotating by size like logrotate's
    copy-free scheme: audit.jsonl -> audit.jsonl.1 -> ... -> audit.jsonl.N (the oldest is dropped).

    The stdlib RotatingFileHandler does the same through the logging machinery, which cost about a third of
    the agent's per-request CPU; this path runs once per request.
    """

    def __init__(self, path: str, max_bytes: int, backups: int):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = -1
        self._size = 0
        self._failed = False

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1
        if self.backups == 0:
            os.truncate(self.path, 0)
        else:
            for n in range(self.backups - 1, 0, -1):
                older = f"{self.path}.{n}"
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def write(self, answer: Answer) -> None:
        """Append one request's record; a failing disk is logged (once until it recovers), never raised."""
        self.write_record(audit_line(answer))

    def write_record(self, record: dict[str, Any]) -> None:
        """Append one JSON record (a request's, or a summary of suppressed ones) as one line in one write."""
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                if self._fd < 0:
                    self._open()
                if self._size and self._size + len(data) > self.max_bytes:
                    self._rotate()
                os.write(self._fd, data)
                self._size += len(data)
                self._failed = False
            except OSError as exc:
                if not self._failed:
                    log.error("cannot write the audit log %s: %s", self.path, exc)
                self._failed = True

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
