"""Prometheus metrics: counted from Answers with bounded labels, gauges from the agent, parsed back with the
client library's own parser, served on a unix socket, written as a node_exporter textfile."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imds_agent.audit.metrics import AgentState, Metrics, MetricsService
from imds_agent.identity.caller import Caller
from imds_agent.policy.paths import normalize
from imds_agent.proxy.types import Answer, Client, Kind, Outcome

STATE = AgentState("9.9", "enforce", "nftables", "open", 1700000000.0, {"ipv4": True, "ipv6": False}, 3, 2, 5)


def answer(kind: Kind, outcome: Outcome, target: str, status: int = 200, **kw: object) -> Answer:
    caller = Caller(True, 1, "/usr/bin/curl", 1000) if kw.pop("known", True) else Caller.unknown("gone")
    client = Client(("127.0.0.1", 1), ("127.0.0.1", 2), None, caller, 0.0, 0.002)
    path = normalize(target) if outcome is not Outcome.REFUSED else None
    return Answer(0.0, "enforce", client, "GET", target, kind, status, outcome, path=path, latency=0.003, **kw)  # type: ignore[arg-type]


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_known_sequence_of_answers_is_counted_where_it_belongs() -> None:
    metrics = Metrics(lambda: STATE)
    creds = "/latest/meta-data/iam/security-credentials/role"
    metrics.observe(answer(Kind.V1, Outcome.ALLOW, "/latest/meta-data/instance-id", injected=True))
    metrics.observe(answer(Kind.V1, Outcome.DENY, creds, status=403))
    metrics.observe(answer(Kind.V1, Outcome.DENY, creds, status=403, known=False))
    metrics.observe(answer(Kind.V2, Outcome.ALLOW, creds, status=504, cause="did not answer within 1.0s"))
    metrics.observe(answer(Kind.INVALID, Outcome.REFUSED, "", status=400, cause="not HTTP"))
    got = samples(metrics.text())
    assert got[("imds_agent_requests_total", (("class", "none"), ("decision", "allow"), ("imds", "v1")))] == 1
    assert got[("imds_agent_requests_total", (("class", "credentials"), ("decision", "deny"), ("imds", "v1")))] == 2
    assert got[("imds_agent_requests_total", (("class", "none"), ("decision", "refused"), ("imds", "invalid")))] == 1
    assert got[("imds_agent_token_injections_total", ())] == 1
    assert got[("imds_agent_upstream_errors_total", (("kind", "timeout"),))] == 1
    assert got[("imds_agent_unidentified_callers_total", ())] == 1
    assert got[("imds_agent_request_duration_seconds_count", ())] == 4  # the unparsable one has no duration
    assert got[("imds_agent_identification_duration_seconds_count", ())] == 5
    info = (("backend", "nftables"), ("fail_mode", "open"), ("mode", "enforce"), ("version", "9.9"))
    assert got[("imds_agent_info", info)] == 1
    assert got[("imds_agent_token_expiry_timestamp_seconds", ())] == 1700000000.0
    assert got[("imds_agent_redirect_installed", (("family", "ipv6"),))] == 0
    assert got[("imds_agent_rule_repairs_total", ())] == 3
    assert got[("imds_agent_audit_records_dropped_total", ())] == 2
    # Bounded labels only: no executable, no raw path anywhere.
    assert "/usr/bin/curl" not in metrics.text().decode() and "role" not in metrics.text().decode()


def test_served_on_a_unix_socket_and_written_as_a_textfile(tmp_path: Path) -> None:
    sock_path = tmp_path / "metrics.sock"
    service = MetricsService(Metrics(lambda: STATE), f"unix:{sock_path}", str(tmp_path))
    service.start()
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(sock_path))
            client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and b"text/plain; version=0.0.4" in head
        assert ("imds_agent_rule_repairs_total", ()) in samples(body)
        assert sock_path.stat().st_mode & 0o777 == 0o660
    finally:
        service.close()  # writes the textfile a last time
    assert ("imds_agent_rule_repairs_total", ()) in samples((tmp_path / "imds_agent.prom").read_bytes())


def test_metrics_configuration_is_checked() -> None:
    from imds_agent.config import Config, ListenConfig, MetricsConfig, _FieldError

    with pytest.raises(_FieldError, match="loopback"):
        MetricsConfig(listen="0.0.0.0:9100")
    with pytest.raises(_FieldError, match="absolute path"):
        MetricsConfig(listen="unix:metrics.sock")
    with pytest.raises(_FieldError, match="listener's port"):
        Config(listen=ListenConfig(port=968), metrics=MetricsConfig(listen="127.0.0.1:968"))
    assert MetricsConfig(listen="[::1]:9775").listen == "[::1]:9775"


def test_silent_scrapers_get_no_thread_each_and_are_dropped(tmp_path: Path) -> None:
    import threading
    import time

    from imds_agent.audit import metrics as metricsmod

    sock_path = tmp_path / "metrics.sock"
    service = MetricsService(Metrics(lambda: STATE), f"unix:{sock_path}", "")
    service.start()
    before = threading.active_count()
    silent = []
    try:
        for _ in range(20):
            client = socket.socket(socket.AF_UNIX)
            client.connect(str(sock_path))
            silent.append(client)
        time.sleep(0.3)
        assert threading.active_count() - before <= metricsmod.MAX_SCRAPES
    finally:
        for client in silent:
            client.close()
        service.close()
