"""The recorder: one Answer -> audit line, inventory count, totals, and one journal line per caller and class;
a failing record is logged once and counted and never stops the others."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from imds_agent.audit.inventory import Inventory
from imds_agent.audit.log import AuditLog
from imds_agent.audit.recorder import REFUSED_CLASS, Recorder
from imds_agent.identity.caller import Caller, ContainerInfo
from imds_agent.policy.paths import normalize
from imds_agent.proxy.types import Answer, Client, Kind, Outcome

CURL = Caller(True, 10, "/usr/bin/curl", 1000, "app")
CREDS = "/latest/meta-data/iam/security-credentials/role"


def answer(outcome: Outcome, target: str = CREDS, status: int = 200) -> Answer:
    client = Client(("127.0.0.1", 1), ("127.0.0.1", 2), None, CURL, 0.0)
    path = normalize(target) if outcome is not Outcome.REFUSED else None
    return Answer(1700000000.0, "audit", client, "GET", target, Kind.V1, status, outcome, "default: x", "why", path)


def make(tmp_path: Path) -> Recorder:
    return Recorder(AuditLog(str(tmp_path / "log" / "audit.jsonl"), 1 << 20, 1), Inventory(str(tmp_path / "state")))


def test_each_answer_becomes_a_line_a_count_and_a_total(tmp_path: Path) -> None:
    rec = make(tmp_path)
    rec(answer(Outcome.WOULD_DENY))
    rec(answer(Outcome.ALLOW, "/latest/meta-data/instance-id"))
    rec(answer(Outcome.REFUSED, "/latest/api/token", status=405))
    rec.close()
    lines = [json.loads(x) for x in (tmp_path / "log" / "audit.jsonl").read_text().splitlines()]
    assert [(x["decision"], x["status"]) for x in lines] == [("would-deny", 200), ("allow", 200), ("refused", 405)]
    classes = {(e.path_class, e.decision) for e in Inventory(str(tmp_path / "state")).load().entries()}
    assert classes == {("credentials", "would-deny"), ("meta-data/instance-id", "allow"), (REFUSED_CLASS, "refused")}
    totals = rec.tally.totals()
    assert (totals.requests, totals.would_deny, totals.refused) == (3, 1, 1)


def test_the_first_denial_per_caller_and_class_reaches_the_journal_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = make(tmp_path)
    for _ in range(3):
        rec(answer(Outcome.WOULD_DENY))
    rec(answer(Outcome.ALLOW, "/latest/meta-data/instance-id"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("would deny (audit): /usr/bin/curl (pid=10, uid=1000)")


class Broken:
    def write(self, answer: Answer) -> None:
        raise OSError(5, "Input/output error")

    def close(self) -> None:
        pass


def test_a_failing_record_is_logged_once_counted_and_the_others_are_still_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(Broken(), Inventory(str(tmp_path)))  # type: ignore[arg-type]
    rec(answer(Outcome.ALLOW))
    rec(answer(Outcome.ALLOW))
    assert caplog.text.count("cannot record an answer in the audit log") == 1
    assert rec.tally.totals().record_failures == 2 and rec.tally.totals().requests == 2
    assert sum(e.count for e in rec.inventory.entries()) == 2


def test_a_flood_from_one_uid_cannot_wash_out_the_records_of_others(tmp_path: Path) -> None:
    """A 16 KB User-Agent in a loop used to rotate every earlier record out of all the audit files."""
    from imds_agent.audit.budget import AuditBudget

    rec = Recorder(AuditLog(str(tmp_path / "audit.jsonl"), 64 * 1024, 1), Inventory(str(tmp_path / "s")),
                   budget=AuditBudget(rate=0.001, burst=5))  # fmt: skip
    victim = answer(Outcome.WOULD_DENY)
    rec(victim)
    attacker = dataclasses.replace(CURL, uid=1001, exe="/tmp/flood")
    client = Client(("127.0.0.1", 9), ("127.0.0.1", 2), None, attacker, 0.0)
    flood = dataclasses.replace(answer(Outcome.ALLOW, "/latest/meta-data/x"), client=client, user_agent="A" * 16384)
    for _ in range(2000):
        rec(flood)
    rec.close()
    text = (tmp_path / "audit.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert lines[0]["uid"] == 1000 and lines[0]["decision"] == "would-deny"  # still there, not rotated away
    assert not (tmp_path / "audit.jsonl.1").exists()
    flood_lines = [x for x in lines if x.get("uid") == 1001 and "summary" not in x]
    assert len(flood_lines) == 5 and all(len(x["user_agent"]) < 300 for x in flood_lines)
    (summary,) = [x for x in lines if "summary" in x]
    assert summary["suppressed"] == 1995 and summary["decisions"] == {"allow": 1995}


def test_a_denial_in_a_container_names_it_in_the_journal_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    web = ContainerInfo("ab" * 32, "docker", "web\nINFO forged", "docker.io/library/nginx:1.25")
    caller = Caller(True, 10, "/usr/sbin/nginx", 0, "root", exe_verified=False, workload=web, uid_inside=0)
    rec = make(tmp_path)
    a = answer(Outcome.WOULD_DENY)
    rec(dataclasses.replace(a, client=dataclasses.replace(a.client, caller=caller)))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "in docker container abababababab, name web\\nINFO forged, image docker.io/library/nginx:1.25" in warning
    assert "\n" not in warning
    (entry,) = rec.inventory.entries()
    assert (entry.image, entry.container) == ("docker.io/library/nginx:1.25", "web\nINFO forged")
