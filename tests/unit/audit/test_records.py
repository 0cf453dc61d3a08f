"""What an audit log line says about a request, and what it never says."""

from __future__ import annotations

import json
from pathlib import Path

from imds_agent.audit.log import AuditLog
from imds_agent.identity.caller import Caller
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
