"""The audit log: one JSON object per request, size-rotated, never a token, a credential or a body.

Each line is one Answer (proxy/types.py), which holds no header value except the User-Agent (kept for the
record, never used to decide). A caller in a container the agent could describe gets a ``workload`` object beside
the ``container`` id (which keeps its meaning: the id, or null).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

from ..identity.caller import Caller
from ..proxy.types import Answer

log = logging.getLogger(__name__)


# Caller-controlled strings are cut to these lengths in records, so a request cannot make its line huge.
MAX_USER_AGENT = 256
MAX_EXE = 1024
MAX_WORKLOAD_FIELD = 512  # a container's name, image, pod namespace and name, service account


def _clip(text: Optional[str], limit: int) -> Optional[str]:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"...({len(text) - limit} more)"


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z"


def _endpoint(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def workload_record(caller: Caller) -> Optional[dict[str, Any]]:
    """The audit form of the container a caller runs in (None when it runs in none the agent described): id,
    runtime, name, image, the uid inside its user namespace and, for a Kubernetes pod, ``pod``. Labels are left
    out: there may be a hundred of them on every line."""
    w = caller.workload
    if w is None:
        return None
    out: dict[str, Any] = {
        "id": w.id,
        "runtime": w.runtime,
        "name": _clip(w.name, MAX_WORKLOAD_FIELD) or None,
        "image": _clip(w.image, MAX_WORKLOAD_FIELD) or None,
        "uid_inside": caller.uid_inside,
    }
    if w.pod_namespace or w.pod_name:
        pod = {"namespace": w.pod_namespace, "name": w.pod_name, "service_account": w.service_account}
        out["pod"] = {k: _clip(v, MAX_WORKLOAD_FIELD) for k, v in pod.items() if v}
    return out


def audit_line(answer: Answer) -> dict[str, Any]:
    """The JSON-ready audit form of one Answer (ISO time, caller fields flattened)."""
    c = answer.caller
    when = answer.time
    return {
        "time": _iso(when),
        "mode": answer.mode,
        "pid": c.pid,
        "exe": _clip(c.exe, MAX_EXE),
        "uid": c.uid,
        "user": c.user,
        "unit": c.unit,
        "container": c.container or (c.workload.id if c.workload is not None else None),
        "workload": workload_record(c),
        "netns": c.netns or None,  # the container's own network namespace, when the socket was found in one
        "peer": _endpoint(answer.client.peer),  # where the connection came from (a container's address, or loopback)
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
        "cached": answer.cached,
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

    Nothing is lost silently. A line is written whole or not at all (a short write on a full disk is cut back).
    When a write fails, or the file or its directory vanished, the file is reopened (the directory recreated) at
    most once a second until it works; every record that could not be written is counted, and the first line
    written again is a summary: how many were dropped, between when and when, and why. A failed rotation keeps
    writing to the current file rather than losing the record.
    """

    RETRY_SECONDS = 1.0

    def __init__(self, path: str, max_bytes: int, backups: int, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.clock = clock
        self._lock = threading.Lock()
        self._fd = -1
        self._size = 0
        self._inode = (0, 0)
        self._next_try = 0.0
        self._next_check = 0.0
        self._failed = False
        self.dropped = 0  # records lost since the agent started (also in the summaries)
        self._pending: Optional[tuple[int, float, float, str]] = None  # (count, first, last, cause) not yet told

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(self._fd)
        self._size, self._inode = st.st_size, (st.st_dev, st.st_ino)

    def _close_fd(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1

    def _vanished(self) -> bool:
        """Whether the open file is no longer at the path (deleted, moved, its directory removed); checked once a
        second, not per record."""
        now = self.clock()
        if now < self._next_check:
            return False
        self._next_check = now + self.RETRY_SECONDS
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._inode

    def _rotate(self) -> None:
        self._close_fd()
        try:
            if self.backups == 0:
                os.truncate(self.path, 0)
            else:
                for n in range(self.backups - 1, 0, -1):
                    older = f"{self.path}.{n}"
                    if os.path.exists(older):
                        os.replace(older, f"{self.path}.{n + 1}")
                os.replace(self.path, f"{self.path}.1")
        except OSError as exc:
            log.error("cannot rotate the audit log %s: %s; writing on to the current file", self.path, exc)
        self._open()

    def write(self, answer: Answer) -> None:
        """Append one request's record; a failing disk is logged (once until it recovers), never raised."""
        self.write_record(audit_line(answer))

    def write_record(self, record: dict[str, Any]) -> None:
        """Append one JSON record (a request's, or a summary of suppressed ones) as one line in one write."""
        data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        when = time.time()
        with self._lock:
            if self._fd >= 0 and self._vanished():
                self._close_fd()
            if self._fd < 0 and self.clock() < self._next_try:
                self._drop(when, "the audit log could not be opened")
                return
            try:
                if self._fd < 0:
                    self._open()
                if self._pending is not None:
                    self._append(self._summary_line())
                    self._pending = None
                if self._size and self._size + len(data) > self.max_bytes:
                    self._rotate()
                self._append(data)
                if self._failed:
                    log.warning("the audit log %s is written again", self.path)
                self._failed = False
            except OSError as exc:
                if not self._failed:
                    log.error("cannot write the audit log %s: %s (records are counted until it works)", self.path,
                              exc)  # fmt: skip
                self._failed = True
                self._close_fd()
                self._next_try = self.clock() + self.RETRY_SECONDS
                self._drop(when, exc.strerror or str(exc))

    def _append(self, data: bytes) -> None:
        """One write of a whole line; a short write (a full disk) is cut back so no partial line stays."""
        written = os.write(self._fd, data)
        if written != len(data):
            os.ftruncate(self._fd, self._size)
            raise OSError(errno.ENOSPC, "short write: no space left on the device")
        self._size += written

    def _drop(self, when: float, cause: str) -> None:
        self.dropped += 1
        # The first cause is the one that matters: later drops in the same stretch only wait for the retry.
        count, first, _, cause = self._pending or (0, when, when, cause)
        self._pending = (count + 1, first, when, cause)

    def _summary_line(self) -> bytes:
        assert self._pending is not None
        count, first, last, cause = self._pending
        record = {
            "time": _iso(last),
            "summary": f"{count} records dropped between {_iso(first)} and {_iso(last)}: {cause}",
            "dropped": count,
            "since": _iso(first),
            "until": _iso(last),
            "cause": cause,
        }
        return (json.dumps(record, separators=(",", ":")) + "\n").encode()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
