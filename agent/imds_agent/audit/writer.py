"""Audit lines written off the request path: a bounded queue and one writer thread.

Building a line's JSON and writing it cost about 100 us of a request's CPU, in the thread that serves the
client's next keep-alive request. The recorder hands each line here instead; a full queue (the disk slower than
the requests for longer than the queue lasts) is counted as dropped and never blocks a client, and the audit
log's own summary records say so once it can write again.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Union

from ..proxy.types import Answer
from .log import AuditLog

log = logging.getLogger(__name__)

Item = Union[Answer, dict[str, Any]]


class AuditWriter:
    """Writes queued Answers and records to an AuditLog on its own thread."""

    def __init__(self, audit: AuditLog, capacity: int = 10000):
        self.audit = audit
        self._queue: queue.Queue[Item | None] = queue.Queue(maxsize=capacity)
        self.dropped = 0  # lines that found the queue full
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="imds-audit", daemon=True)
        self._thread.start()

    def submit(self, item: Item) -> None:
        """Queue one line; never waits."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1
            if not self._warned:
                self._warned = True
                log.error("the audit queue is full (%d lines): lines are dropped and counted until it drains",
                          self._queue.maxsize)  # fmt: skip

    def flush(self) -> None:
        """Wait until every queued line was written."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, end the thread, close the log."""
        self._queue.put(None)
        self._thread.join(10)
        self.audit.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if isinstance(item, Answer):
                    self.audit.write(item)
                else:
                    self.audit.write_record(item)
                self._warned = False
            except Exception:
                log.exception("writing an audit line failed")
            finally:
                self._queue.task_done()
