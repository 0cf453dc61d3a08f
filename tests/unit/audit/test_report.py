"""The report of who called what, its table, and the policy suggested from an inventory."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import yaml

from imds_agent.audit.inventory import Entry, Inventory
from imds_agent.audit.report import NOT_HOST_FILE, render_table, report, suggest
from imds_agent.identity.caller import Caller, ContainerInfo
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


EXPORTER = ContainerInfo("ab" * 32, "containerd", "exporter", "registry.example.com/payments/exporter:1.4",
                         pod_namespace="payments", pod_name="exporter-7d9f8b6c5-x2x7q")  # fmt: skip
WEB = ContainerInfo("cd" * 32, "docker", "web", "docker.io/library/nginx:1.25")


def test_the_report_shows_the_container_and_escapes_what_it_chose() -> None:
    inv = Inventory("/nonexistent")
    inv.add("/app/exporter", 1000, None, "credentials", "v1", "would-deny", 10.0, False, EXPORTER)
    inv.add("/usr/bin/curl", 1000, "app", "meta-data/placement", "v2", "allow", 10.0)
    odd = dataclasses.replace(WEB, name="web\nforged", image="docker.io/x/y:1\x1b[2J")
    inv.add("/usr/sbin/nginx", 0, "root", "meta-data/placement", "v1", "allow", 10.0, False, odd)
    rows = report(inv.entries())
    table = render_table(rows)
    head, *lines = table.splitlines()
    assert len(lines) == 3 and head.endswith("LAST SEEN (UTC)   CONTAINER")
    exporter = next(line for line in lines if line.startswith("/app/exporter"))
    assert NOT_HOST_FILE not in exporter  # inside a container, the path is the image's: nothing to flag
    assert exporter.index("registry.example.com/payments/exporter:1.4 [exporter] ns payments") == head.index(
        "CONTAINER"
    )
    assert next(line for line in lines if line.startswith("/usr/bin/curl")).endswith("  -")
    assert "web\\nforged" in table and "\x1b" not in table
    assert {r.image for r in rows} == {"", "registry.example.com/payments/exporter:1.4", "docker.io/x/y:1\x1b[2J"}
    assert "CONTAINER" not in render_table(report([e for e in inv.entries() if not e.in_container]))


def test_suggest_names_the_image_and_pod_for_container_callers_and_enforce_allows_exactly_them(
    tmp_path: Path,
) -> None:
    inv = Inventory("/nonexistent")
    inv.add("/app/exporter", 1000, None, "credentials", "v1", "would-deny", 1.0, False, EXPORTER)
    inv.add("/app/healthcheck", 1000, None, "meta-data/placement", "v1", "allow", 1.0, False, EXPORTER)
    inv.add("/usr/sbin/nginx", 0, "root", "meta-data/placement", "v1", "allow", 1.0, False, WEB)
    text = suggest(inv.entries())
    doc = yaml.safe_load(text)
    web, exporter = doc["rules"]  # sorted by image
    assert exporter["container"] == {"image": "registry.example.com/payments/exporter:1.4"}
    assert exporter["pod"] == {"namespace": "payments"} and exporter["exe"] == ["/app/exporter", "/app/healthcheck"]
    assert exporter["sensitive"] == ["credentials"] and "uid" not in exporter and "in_containers" not in exporter
    assert web["container"] == {"image": "docker.io/library/nginx:1.25"} and "pod" not in web
    (tmp_path / "50-suggested.yaml").write_text(text)
    policy = load_policy(str(tmp_path), default="deny")
    creds = "/latest/meta-data/iam/security-credentials/role"

    def allowed(caller: Caller, path: str = creds) -> bool:
        return decide(policy, caller, "GET", path).allow

    in_pod = Caller(True, 1, "/app/exporter", 1000, None, exe_verified=False, workload=EXPORTER)
    assert allowed(in_pod)
    assert not allowed(dataclasses.replace(in_pod, exe="/bin/sh"))  # not seen inside it
    other_ns = dataclasses.replace(EXPORTER, pod_namespace="default")
    assert not allowed(dataclasses.replace(in_pod, workload=other_ns))
    assert not allowed(dataclasses.replace(in_pod, workload=None, exe_verified=True))  # the host's /app/exporter
    in_web = Caller(True, 2, "/usr/sbin/nginx", 0, "root", exe_verified=False, workload=WEB)
    assert allowed(in_web, "/latest/meta-data/placement/region") and not allowed(in_web)


def test_a_container_known_only_by_an_image_id_is_suggested_as_before() -> None:
    inv = Inventory("/nonexistent")
    by_id = dataclasses.replace(WEB, image="sha256:" + "ab" * 32)
    inv.add("/agent", 0, "root", "credentials", "v1", "would-deny", 1.0, False, by_id)
    (rule,) = yaml.safe_load(suggest(inv.entries()))["rules"]
    assert rule["exe"] == "/agent" and rule["in_containers"] is True and "container" not in rule
