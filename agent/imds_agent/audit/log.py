"""The audit log: one JSON object per request, size-rotated, never a token, a credential or a body.

Records are built from the Caller, the Decision and the Exchange, which hold no header values except the
User-Agent (kept for the record, never used to decide).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from ..identity.caller import Caller

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditRecord:
    """What the audit log says about one request."""

    time: float
    mode: str
    caller: Caller
    method: str
    path: str
    version: str  # v1 (no token), v2 (client token), token (the PUT)
    decision: str  # allow | deny | would-deny
    decided_by: str
    reason: str
    status: int
    latency_ms: float
    user_agent: Optional[str] = None
    injected: bool = False
    relayed: bool = False
    sensitive: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready form (ISO time, caller fields flattened)."""
        c = self.caller
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.time)) + f".{int(self.time % 1 * 1000):03d}Z",
            "mode": self.mode,
            "pid": c.pid,
            "exe": c.exe,
            "uid": c.uid,
            "user": c.user,
            "unit": c.unit,
            "container": c.container,
            "identified": c.known,
            "unidentified_reason": c.reason or None,
            "user_agent": self.user_agent,
            "method": self.method,
            "path": self.path,
            "sensitive": self.sensitive,
            "imds": self.version,
            "decision": self.decision,
            "rule": self.decided_by,
            "reason": self.reason,
            "status": self.status,
            "injected": self.injected,
            "relayed": self.relayed,
            "latency_ms": round(self.latency_ms, 3),
        }


class AuditLog:
    """Appends records to a JSON-lines file with size-based rotation (stdlib RotatingFileHandler)."""

    def __init__(self, path: str, max_bytes: int, backups: int):
        self.path = path
        directory = os.path.dirname(path)
        os.makedirs(directory, mode=0o750, exist_ok=True)
        self._logger = logging.getLogger(f"imds_agent.audit.file.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._handler = handler
        self._logger.addHandler(handler)

    def write(self, record: AuditRecord) -> None:
        """Append one record; a failing disk is logged once per failure, never raised into the request path."""
        try:
            self._logger.info("%s", json.dumps(record.as_dict(), separators=(",", ":")))
        except Exception:
            log.exception("cannot write the audit log %s", self.path)

    def close(self) -> None:
        """Flush and close the file."""
        self._logger.removeHandler(self._handler)
        self._handler.close()
