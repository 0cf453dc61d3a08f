"""The report of who called what, its table, and the policy suggested from an inventory."""

from __future__ import annotations

import time
from pathlib import Path

from imds_agent.audit.inventory import Entry, Inventory
from imds_agent.audit.report import render_table, report, suggest
from imds_agent.identity.caller import Caller
from imds_agent.policy.engine import decide
from imds_agent.policy.loader import load_policy


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
