"""What an audit log line says about a request, and what it never says."""

from __future__ import annotations

import json
from pathlib import Path

from imds_agent.audit.log import AuditLog, audit_line
from imds_agent.identity.caller import Caller, ContainerInfo
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


def line_of(caller: Caller) -> dict[str, object]:
    client = Client(("127.0.0.1", 1), ("127.0.0.1", 2), None, caller, 0.0)
    target = "/latest/meta-data/instance-id"
    answer = Answer(1700000000.0, "audit", client, "GET", target, Kind.V1, 200, Outcome.ALLOW,
                    "default: allow-nonsensitive", "", normalize(target))  # fmt: skip
    return audit_line(answer)


def test_a_container_caller_gets_a_workload_object_beside_the_container_id() -> None:
    pod = ContainerInfo("ab" * 32, "containerd", "exporter", "registry.example.com/payments/exporter:1.4",
                        (("team", "billing"),), "payments", "exporter-7d9f8b6c5-x2x7q")  # fmt: skip
    caller = Caller(True, 11, "/app/exporter", 100000, None, exe_verified=False, workload=pod, uid_inside=0)
    line = line_of(caller)
    assert line["container"] == "ab" * 32  # the id, as before (also when procs did not set it)
    assert line["workload"] == {
        "id": "ab" * 32,
        "runtime": "containerd",
        "name": "exporter",
        "image": "registry.example.com/payments/exporter:1.4",
        "uid_inside": 0,
        "pod": {"namespace": "payments", "name": "exporter-7d9f8b6c5-x2x7q"},  # no service account: none known
    }
    assert "team" not in json.dumps(line)  # labels stay out of every line
    alpine = ContainerInfo("cd" * 32, "docker", image="docker.io/library/alpine:3")
    plain = line_of(Caller(True, 12, "/bin/sh", 0, "root", exe_verified=False, workload=alpine))
    assert plain["workload"] == {"id": "cd" * 32, "runtime": "docker", "name": None,
                                 "image": "docker.io/library/alpine:3", "uid_inside": None}  # fmt: skip
    host = line_of(CURL)
    assert host["container"] is None and host["workload"] is None


def test_what_a_container_chose_is_cut_and_escaped_by_json() -> None:
    odd = ContainerInfo("ab" * 32, "docker", 'web\n{"forged": 1}', "docker.io/x/" + "y" * 2000 + ":1")
    text = json.dumps(line_of(Caller(True, 11, "/w", 0, "root", exe_verified=False, workload=odd)))
    assert "\n" not in text and len(text) < 2000 and "more)" in text


def test_a_container_callers_line_names_its_network_namespace() -> None:
    import dataclasses

    inside = dataclasses.replace(CURL, netns=4026532999)
    client = Client(("172.17.0.2", 1), ("172.17.0.1", 969), ("169.254.169.254", 80), inside, 0.0)
    answer = Answer(1700000000.0, "audit", client, "GET", "/latest/meta-data/instance-id", Kind.V1, 200,
                    Outcome.ALLOW, "default", "ok", normalize("/latest/meta-data/instance-id"))  # fmt: skip
    assert audit_line(answer)["netns"] == 4026532999 and audit_line(answer)["peer"] == "172.17.0.2:1"
    host = Client(("127.0.0.1", 1), ("127.0.0.1", 968), None, CURL, 0.0)
    assert audit_line(dataclasses.replace(answer, client=host))["netns"] is None
