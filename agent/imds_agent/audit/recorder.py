"""Every Answer becomes its records here, in one place: the audit line, the inventory count, the running totals
and, once per caller and path class, a journal line for a denial.

Recording never costs a client its answer: the server reports an Answer after sending it, and an exception in
any one record is logged (with a traceback once per kind of failure, so a broken disk does not flood the journal)
and counted, and the other records are still written.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import Any, Callable, Optional

from ..config import AuditConfig
from ..errors import PersistenceError
from ..identity.containers import describe_workload
from ..proxy.types import Answer, Outcome
from .budget import AuditBudget
from .inventory import Inventory, path_class
from .log import AuditLog
from .metrics import Metrics
from .stats import Tally
from .writer import AuditWriter

log = logging.getLogger(__name__)

REFUSED_CLASS = "(refused)"


def inventory_class(answer: Answer) -> str:
    """The class an Answer is counted under: refusals apart, so that `suggest` never allows what was refused."""
    return REFUSED_CLASS if answer.outcome is Outcome.REFUSED else path_class(answer.path)


class Recorder:
    """The server's ``report`` hook; owns the audit log, the inventory and the running totals."""

    def __init__(
        self,
        audit: Optional[AuditLog],
        inventory: Inventory,
        tally: Optional[Tally] = None,
        budget: Optional[AuditBudget] = None,
        metrics: Optional[Metrics] = None,
        writer: Optional[AuditWriter] = None,
    ):
        self.audit = audit
        self.writer = writer
        self.inventory = inventory
        self.tally = tally or Tally()
        self.budget = budget or AuditBudget(rate=0, burst=1)
        self.metrics = metrics
        self._failed: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, answer: Answer) -> None:
        steps: list[tuple[str, Callable[[Answer], None]]] = [
            ("the audit log", self._audit),
            ("the inventory", self._count),
        ]
        if self.metrics is not None:
            steps.append(("the metrics", self.metrics.observe))
        steps.append(("the totals", self.tally.add))  # last: a total that moved means every other record is made
        failed = False
        for what, step in steps:
            try:
                step(answer)
            except Exception:
                failed = True
                if self._first_failure(what):
                    log.exception("cannot record an answer in %s (counted; not logged again)", what)
        if failed:
            self.tally.failed_to_record()

    def save(self, force: bool = False) -> None:
        """Write the summaries of suppressed lines still pending (a flood that stopped gets its summary within one
        save interval), and persist the inventory (if it changed, unless ``force``)."""
        for summary in self.budget.pending():
            self._line(summary.as_dict())
        self.inventory.save(force=force)

    def close(self) -> None:
        """Write the summaries still pending, save the inventory and close the audit log."""
        try:
            self.save(force=True)
        finally:
            if self.writer is not None:
                self.writer.close()
            elif self.audit is not None:
                self.audit.close()

    @property
    def audit_dropped(self) -> int:
        """Audit lines lost: the log could not write them, or the writer's queue was full."""
        return (self.audit.dropped if self.audit is not None else 0) + (self.writer.dropped if self.writer else 0)

    def _line(self, item: Any) -> None:
        if self.writer is not None:
            self.writer.submit(item)
        elif self.audit is not None:
            if isinstance(item, Answer):
                self.audit.write(item)
            else:
                self.audit.write_record(item)

    def _audit(self, answer: Answer) -> None:
        if self.audit is None:
            return
        admitted, summary = self.budget.admit(answer.caller.budget_key, answer.outcome.value, answer.time)
        if summary is not None:
            self._line(summary.as_dict())
        if admitted:
            self._line(answer)

    def _count(self, answer: Answer) -> None:
        caller = answer.caller
        cls = inventory_class(answer)
        first = self.inventory.add(caller.exe, caller.uid, caller.user, cls, answer.kind.value,
                                   answer.outcome.value, answer.time, caller.exe_verified,
                                   caller.workload)  # fmt: skip
        if first and answer.outcome in (Outcome.DENY, Outcome.WOULD_DENY):
            # Once per caller and path class in the journal, so operators see denials without a flood; every
            # request is in the audit log.
            verb = "denied" if answer.outcome is Outcome.DENY else "would deny (audit)"
            who = caller.describe()
            if caller.workload is not None:
                who += f" in {describe_workload(caller.workload, caller.uid_inside)}"
            log.warning("%s: %s %s %s [%s] by %s: %s", verb, who, answer.method, answer.shown_path,
                        cls, answer.decided_by, answer.reason)  # fmt: skip
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s %s -> %d %s", caller.describe(), answer.method, answer.shown_path,
                      answer.kind.value, answer.status, answer.outcome.value)  # fmt: skip

    def _first_failure(self, what: str) -> bool:
        """Whether this is the first failure of that record since the agent started."""
        with self._lock:
            first = what not in self._failed
            self._failed.add(what)
        return first


def open_records(
    config: AuditConfig, uid: int, gid: int, metrics: Optional[Metrics] = None, background: bool = True
) -> Recorder:
    """The audit log and the inventory, opened (and loaded) as root and handed to the agent's account, so that the
    agent can keep writing them after it drops privileges (under systemd LogsDirectory and StateDirectory do the
    same).

    A directory that cannot be created, handed over or written (a read-only mount, a full disk) does not stop the
    agent: it serves, says once what will not be kept, and keeps trying. With ``require_persistence`` it refuses
    to start instead (exit 70, one line naming the directory).
    """
    for directory, what in ((os.path.dirname(config.log), "the audit log"), (config.state_dir, "the inventory")):
        problem = _prepare(directory, uid, gid)
        if problem is None:
            continue
        if config.require_persistence:
            raise PersistenceError(f"{directory}: {problem}; {what} cannot be kept (audit.require_persistence)")
        log.error("%s: %s; serving without keeping %s until it can be written", directory, problem, what)
    audit = AuditLog(config.log, config.max_bytes, config.backups)
    inventory = Inventory(config.state_dir).load(repair=True)
    if os.geteuid() == 0 and uid != 0:
        for path in (config.log, inventory.path):
            try:
                if os.path.exists(path):
                    os.chown(path, uid, gid)
            except OSError as exc:
                log.error("cannot hand %s to uid %d: %s", path, uid, exc.strerror)
    budget = AuditBudget(config.rate_per_uid, config.burst_per_uid)
    writer = AuditWriter(audit) if background else None
    return Recorder(audit, inventory, budget=budget, metrics=metrics, writer=writer)


def _prepare(directory: str, uid: int, gid: int) -> Optional[str]:
    """Create ``directory`` for the agent's account and check it takes a file; what is wrong, or None."""
    try:
        os.makedirs(directory, mode=0o750, exist_ok=True)
        if os.geteuid() == 0 and uid != 0:
            os.chown(directory, uid, gid)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"not writable ({exc.strerror or exc})"
    return None
