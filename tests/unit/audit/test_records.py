"""Audit log lines, the persisted inventory, the report and the suggested policy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from imds_agent.audit.inventory import Entry, Inventory, path_class
from imds_agent.audit.log import AuditLog
from imds_agent.audit.report import render_table, report, suggest
from imds_agent.errors import ConfigError
from imds_agent.identity.caller import Caller
from imds_agent.policy.engine import decide
from imds_agent.policy.loader import load_policy
from imds_agent.policy.paths import normalize
from imds_agent.proxy.types import Answer, Client, Kind, Outcome

CURL = Caller(True, 10, "/usr/bin/curl", 1000, "app", ("curl",), unit="app.service")


def test_audit_line_has_the_fields_and_no_secrets(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "a" / "audit.jsonl"), 4096, 2)
    client = Client(("127.0.0.1", 1), ("127.0.0.1", 2), None, CURL, 0.0)
    record = Answer(1700000000.25, "audit", client, "GET", "/latest/meta-data/iam/security-credentials/r?x=secret",
                    Kind.V1, 200, Outcome.WOULD_DENY, "default: allow-nonsensitive", "credentials paths need a rule",
                    normalize("/latest/meta-data/iam/security-credentials/r"), injected=True, latency=0.00123456,
                    user_agent="curl/7.88")  # fmt: skip
    for _ in range(40):  # enough to rotate at 4 KiB
        log.write(record)
    log.close()
    line = json.loads((tmp_path / "a" / "audit.jsonl").read_text().splitlines()[-1])
    assert line["time"] == "2023-11-14T22:13:20.250Z"
    assert (line["exe"], line["uid"], line["user"], line["unit"], line["user_agent"]) == (
        "/usr/bin/curl",
        1000,
        "app",
        "app.service",
        "curl/7.88",
    )
    assert (line["imds"], line["decision"], line["status"], line["latency_ms"]) == ("v1", "would-deny", 200, 1.235)
    assert not any("token" in k.lower() and k != "injected" for k in line)
    assert (line["path"], line["sensitive"], line["sent"]) == ("/latest/meta-data/iam/security-credentials/r",
                                                               "credentials", True)  # fmt: skip
    assert "secret" not in json.dumps(line)  # the query string is never recorded
    assert (tmp_path / "a" / "audit.jsonl.1").exists()


def test_inventory_aggregates_and_survives_a_restart(tmp_path: Path) -> None:
    inv = Inventory(str(tmp_path))
    for when in (100.0, 200.0, 150.0):
        inv.add("/usr/bin/curl", 1000, "app", "credentials", "v1", "would-deny", when)
    inv.add("/usr/bin/curl", 1000, "app", "meta-data/placement", "v2", "allow", 120.0)
    inv.save()
    again = Inventory(str(tmp_path)).load().entries()
    creds = next(e for e in again if e.path_class == "credentials")
    assert (creds.count, creds.first_seen, creds.last_seen) == (3, 100.0, 200.0)
    assert len(again) == 2


def test_corrupt_inventory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "inventory.json").write_text("{not json")
    with pytest.raises(ConfigError, match="inventory.json"):
        Inventory(str(tmp_path)).load()


def test_path_classes() -> None:
    assert path_class(normalize("/latest/meta-data/placement/region")) == "meta-data/placement"
    assert path_class(normalize("/latest/meta-data/iam/security-credentials/x")) == "credentials"
    assert path_class(normalize("/latest/meta-data/")) == "meta-data"
    assert path_class(normalize("/")) == "/"
    assert path_class(None) == "(invalid path)"


def test_report_rows() -> None:
    inv = Inventory("/nonexistent")
    inv.add("/usr/bin/curl", 1000, "app", "credentials", "v1", "would-deny", 100.0)
    inv.add("/usr/bin/curl", 1000, "app", "meta-data/placement", "v2", "allow", 300.0)
    inv.add("/usr/bin/amazon-ssm-agent", 0, "root", "credentials", "v2", "allow", 50.0)
    rows = report(inv.entries())
    curl = rows[0]
    assert (curl.exe, curl.requests, curl.imdsv1, curl.would_deny, curl.sensitive) == (
        "/usr/bin/curl",
        2,
        1,
        1,
        {"credentials"},
    )
    assert curl.last_seen == 300.0
    assert [r.exe for r in report(inv.entries(), since=200.0)] == ["/usr/bin/curl"]


def test_suggest_then_enforce_allows_exactly_what_was_seen(tmp_path: Path) -> None:
    inv = Inventory("/nonexistent")
    inv.add("/usr/bin/curl", 1000, "app", "credentials", "v1", "would-deny", 1.0)
    inv.add("/usr/bin/curl", 1000, "app", "meta-data/placement", "v1", "allow", 1.0)
    inv.add("/usr/bin/curl", 1000, "app", "meta-data", "v1", "allow", 1.0)
    inv.add(None, None, None, "credentials", "v1", "would-deny", 1.0)  # unidentified: never suggested
    (tmp_path / "50-suggested.yaml").write_text(suggest(inv.entries()))
    policy = load_policy(str(tmp_path), default="deny")
    assert len(policy.rules) == 1

    def allowed(path: str, uid: int = 1000, exe: str = "/usr/bin/curl") -> bool:
        return decide(policy, Caller(True, 1, exe, uid, "app"), "GET", path).allow

    assert allowed("/latest/meta-data/iam/security-credentials/role")
    assert allowed("/2021-03-23/meta-data/placement/region")
    assert allowed("/latest/meta-data/")
    assert not allowed("/latest/meta-data/instance-id")  # never seen
    assert not allowed("/latest/user-data")
    assert not allowed("/latest/meta-data/placement/region", uid=1001)
    assert not allowed("/latest/meta-data/placement/region", exe="/usr/bin/wget")


def test_inventory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from imds_agent.audit import inventory as inv_mod

    monkeypatch.setattr(inv_mod, "MAX_ENTRIES", 3)
    inv = Inventory("/nonexistent")
    for n in range(5):
        inv.add(f"/tmp/run-{n}", 1000, "app", "meta-data", "v1", "allow", float(n))
    assert sorted(e.exe for e in inv.entries()) == ["/tmp/run-2", "/tmp/run-3", "/tmp/run-4"]
    assert inv.evicted == 2
    inv.add("/tmp/run-2", 1000, "app", "meta-data", "v1", "allow", 5.0)  # seen again: now the most recent
    inv.add("/tmp/run-5", 1000, "app", "meta-data", "v1", "allow", 6.0)
    assert sorted(e.exe for e in inv.entries()) == ["/tmp/run-2", "/tmp/run-4", "/tmp/run-5"]


def test_report_table_has_aligned_columns_and_the_last_seen_time() -> None:
    t = 1_790_000_000.0
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))
    rows = report(
        [
            Entry("/usr/bin/curl", 65534, "nobody", "credentials", "v1", "would-deny", 3, t - 60, t),
            Entry("/usr/bin/curl", 65534, "nobody", "identity", "v2", "allow", 2, t - 60, t - 30),
            Entry("/opt/app/bin/exporter", 1000, None, "metadata", "v1", "allow", 1, t, t),
        ]
    )
    head, curl, exporter = render_table(rows).splitlines()
    assert curl.split()[:7] == ["/usr/bin/curl", "nobody", "5", "3", "3", "0", "credentials"]
    assert exporter.split()[:2] == ["/opt/app/bin/exporter", "1000"]  # no user name: the uid
    assert head.index("SENSITIVE") == curl.index("credentials") == exporter.index("-  ")
    assert head.index("LAST SEEN") == curl.index(when) == exporter.index(when)


def test_files_that_are_not_the_hosts_are_kept_apart_and_suggested_as_container_rules(tmp_path: Path) -> None:
    inv = Inventory(str(tmp_path))
    t = time.time()
    assert inv.add("/agent", 0, "root", "credentials", "v1", "would-deny", t, exe_verified=False)
    assert inv.add("/agent", 0, "root", "credentials", "v1", "would-deny", t, exe_verified=True)
    assert not inv.add("/agent", 0, "root", "credentials", "v1", "would-deny", t, exe_verified=False)
    inv.save(force=True)
    again = Inventory(str(tmp_path)).load().entries()
    assert sorted((e.exe_verified, e.count) for e in again) == [(False, 2), (True, 1)]
    table = render_table(report(again))
    assert "/agent [not the host's file]" in table

    (tmp_path / "policy.d").mkdir()
    (tmp_path / "policy.d" / "50-seen.yaml").write_text(suggest(again))
    policy = load_policy(str(tmp_path / "policy.d"), default="deny")
    rules = {r.in_containers: r for r in policy.rules}
    assert set(rules) == {True, False}
    creds = "/latest/meta-data/iam/security-credentials/role"
    in_container = Caller(True, 7, "/agent", 0, "root", ("/agent",), exe_verified=False)
    assert decide(policy, in_container, "GET", creds).decided_by.startswith(rules[True].name)


def test_inventories_saved_before_exe_verification_load_as_host_files(tmp_path: Path) -> None:
    old = {"exe": "/usr/bin/curl", "uid": 0, "user": "root", "path_class": "meta-data/placement", "imds": "v1",
           "decision": "allow", "count": 3, "first_seen": 1.0, "last_seen": 2.0}  # fmt: skip
    (tmp_path / "inventory.json").write_text(json.dumps({"version": 1, "entries": [old]}))
    (entry,) = Inventory(str(tmp_path)).load().entries()
    assert entry.exe_verified is True and entry.count == 3


def test_a_loaded_inventory_evicts_by_last_seen_whatever_order_the_file_had(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imds_agent.audit import inventory as inv_mod

    def entry(exe: str, last: float) -> dict[str, object]:
        return {"exe": exe, "uid": 0, "user": "root", "path_class": "meta-data", "imds": "v1", "decision": "allow",
                "count": 1, "first_seen": 0.0, "last_seen": last}  # fmt: skip

    entries = [entry("/new", 30.0), entry("/old", 10.0), entry("/mid", 20.0)]
    (tmp_path / "inventory.json").write_text(json.dumps({"version": 1, "entries": entries}))
    monkeypatch.setattr(inv_mod, "MAX_ENTRIES", 3)
    inv = Inventory(str(tmp_path)).load()
    inv.add("/newest", 0, "root", "meta-data", "v1", "allow", 40.0)
    assert sorted(e.exe for e in inv.entries()) == ["/mid", "/new", "/newest"]
