"""The foreground loop around the agent: readiness, its health checks, and exiting when a needed thread ends."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imds_agent import daemon
from imds_agent.config import AuditConfig, Config, ListenConfig, PolicyConfig, RedirectConfig, UpstreamConfig
from imds_agent.daemon import Agent
from imds_agent.errors import PersistenceError
from imds_agent.sandbox.emulator import Emulator

CREDS = "/latest/meta-data/iam/security-credentials/"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(
        user=str(os.getuid()),
        listen=ListenConfig(port=0, addresses=("127.0.0.1",)),
        upstream=UpstreamConfig(ipv4="127.0.0.1", port=9, connect_timeout=0.2, read_timeout=0.2),
        redirect=RedirectConfig(enabled=False),
        audit=AuditConfig(log=str(tmp_path / "audit.jsonl"), state_dir=str(tmp_path / "state")),
        policy=PolicyConfig(dir=str(tmp_path / "policy.d")),
    )


@pytest.fixture
def handlers() -> Iterator[None]:
    """run() installs its own signal handlers; put pytest's back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_healthy_agent_reports_no_problem_and_a_hung_accept_loop_is_seen(config: Config) -> None:
    agent = Agent(config)
    agent.start()
    try:
        assert agent.problem(stall_limit=5) == (None, False)
        reason, fatal = agent.problem(stall_limit=-1)  # any quiet time is too long
        assert reason is not None and "accept loop has not turned" in reason and not fatal
    finally:
        agent.stop()


def test_the_agent_exits_1_when_its_accept_thread_ends(
    config: Config, handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    def break_the_accept_thread(agent: Agent) -> None:
        def broken(listener: socket.socket) -> None:
            raise RuntimeError("a bug in accept")

        agent.server._accept = broken  # type: ignore[method-assign]
        socket.create_connection(agent.server.addresses[0], timeout=2).close()

    started = time.monotonic()
    assert daemon.run(config, ready=break_the_accept_thread) == 1
    assert "the accept loop failed" in caplog.text and "stopping: the accept thread has ended" in caplog.text
    assert time.monotonic() - started < 5


def test_the_first_denial_per_caller_and_path_class_reaches_the_journal_once(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    emu = Emulator(tokens="required", addresses=[("127.0.0.1", 0)])
    emu.start()
    agent = Agent(dataclasses.replace(config, upstream=UpstreamConfig(ipv4="127.0.0.1", port=emu.addresses[0][1])))
    agent.start()
    try:
        host, port = agent.server.addresses[0]
        for path in [CREDS, CREDS, CREDS + "role", "/latest/meta-data/instance-id"]:
            conn = http.client.HTTPConnection(host, port, timeout=5)
            conn.request("GET", path)
            assert conn.getresponse().status in (200, 404)  # audit mode: forwarded
            conn.close()
    finally:
        agent.stop()
        emu.stop()
    warnings = [r.getMessage() for r in caplog.records if "would deny" in r.getMessage()]
    assert len(warnings) == 1, warnings  # three credential reads, one line; instance-id is allowed
    assert f"pid={os.getpid()}" in warnings[0] and "[credentials]" in warnings[0]
    assert "default: allow-nonsensitive" in warnings[0]


def test_reload_swaps_the_policy_and_a_broken_one_changes_nothing(config: Config, tmp_path: Path) -> None:
    emu = Emulator(tokens="required", addresses=[("127.0.0.1", 0)])
    emu.start()
    source = tmp_path / "agent.yaml"
    source.write_text(f"mode: enforce\npolicy:\n  dir: {config.policy.dir}\n")
    upstream = UpstreamConfig(ipv4="127.0.0.1", port=emu.addresses[0][1])
    agent = Agent(dataclasses.replace(config, mode="enforce", upstream=upstream, source=str(source)))
    agent.start()

    def status() -> int:
        conn = http.client.HTTPConnection(*agent.server.addresses[0], timeout=5)
        conn.request("GET", CREDS)
        code = conn.getresponse().status
        conn.close()
        return code

    policy = Path(config.policy.dir)
    policy.mkdir(exist_ok=True)
    try:
        assert status() == 403  # no rule: the default keeps credentials from everyone
        exe = os.path.realpath(f"/proc/{os.getpid()}/exe")
        (policy / "50-test.yaml").write_text(f"rules:\n  - name: me\n    exe: {exe}\n    sensitive: [credentials]\n")
        assert agent.reload()
        assert status() == 200
        (policy / "60-broken.yaml").write_text("rules:\n  - name: broken\n    exe: [unclosed\n")
        assert not agent.reload()
        assert status() == 200  # the running policy stays
        (policy / "60-broken.yaml").unlink()
        (policy / "50-test.yaml").unlink()
        assert agent.reload()
        assert status() == 403
    finally:
        agent.stop()
        emu.stop()


def test_the_agent_starts_over_a_corrupt_inventory_and_a_state_dir_it_cannot_write(
    config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both used to stop the agent (exit 78, or exit 1 with a traceback), leaving clients with 401s."""
    state = Path(config.audit.state_dir)
    state.mkdir(parents=True)
    (state / "inventory.json").write_text('{"version": 1, "entries": [{"exe": "/x"')  # truncated
    agent = Agent(config)
    agent.start()
    agent.stop()
    assert list(state.glob("inventory.json.corrupt-*")) and "was corrupt" in caplog.text
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")  # a state_dir that cannot be created
    unwritable = dataclasses.replace(config.audit, state_dir=str(blocked / "state"))
    agent = Agent(dataclasses.replace(config, audit=unwritable))
    agent.start()
    try:
        assert agent.server.addresses  # serving
    finally:
        agent.stop()
    assert f"{blocked}/state: not writable" in caplog.text and "serving without keeping the inventory" in caplog.text
    strict = dataclasses.replace(unwritable, require_persistence=True)
    with pytest.raises(PersistenceError, match="audit.require_persistence"):
        Agent(dataclasses.replace(config, audit=strict))


def test_metrics_count_what_the_agent_answered(config: Config, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from imds_agent.config import MetricsConfig

    emu = Emulator(tokens="required", addresses=[("127.0.0.1", 0)])
    emu.start()
    sock_path = tmp_path / "metrics.sock"
    upstream = UpstreamConfig(ipv4="127.0.0.1", port=emu.addresses[0][1])
    agent = Agent(dataclasses.replace(config, mode="enforce", upstream=upstream,
                                      metrics=MetricsConfig(listen=f"unix:{sock_path}")))  # fmt: skip
    agent.start()
    try:
        for path in ["/latest/meta-data/instance-id", "/latest/meta-data/instance-id", CREDS, "/LATEST/x"]:
            conn = http.client.HTTPConnection(*agent.server.addresses[0], timeout=5)
            conn.request("GET", path)
            conn.getresponse().read()
            conn.close()
        deadline = time.monotonic() + 2  # each answer is recorded right after it is sent: wait for the last one
        while agent.recorder.tally.totals().requests < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(sock_path))
            client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
    finally:
        agent.stop()
        emu.stop()
    text = reply.partition(b"\r\n\r\n")[2].decode()
    requests = {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "imds_agent_requests_total"}  # fmt: skip
    assert requests == {
        (("class", "none"), ("decision", "allow"), ("imds", "v1")): 2,
        (("class", "credentials"), ("decision", "deny"), ("imds", "v1")): 1,
        (("class", "none"), ("decision", "refused"), ("imds", "v1")): 1,
    }
    assert "imds_agent_token_injections_total 2.0" in text


def test_status_and_report_ask_the_running_agent(config: Config, tmp_path: Path, capsys) -> None:
    """report right after a request showed nothing: the inventory reached disk only every 10 s."""
    from imds_agent import cli
    from imds_agent.control import ask

    emu = Emulator(tokens="required", addresses=[("127.0.0.1", 0)])
    emu.start()
    sock_path = str(tmp_path / "control.sock")
    upstream = UpstreamConfig(ipv4="127.0.0.1", port=emu.addresses[0][1])
    agent = Agent(dataclasses.replace(config, mode="enforce", upstream=upstream, control_socket=sock_path))
    agent.start()
    source = tmp_path / "cli.yaml"
    source.write_text(f"control_socket: {sock_path}\naudit: {{state_dir: {config.audit.state_dir}}}\n")
    try:
        conn = http.client.HTTPConnection(*agent.server.addresses[0], timeout=5)
        conn.request("GET", CREDS)
        assert conn.getresponse().status == 403
        conn.close()
        # The answer is recorded right after it is sent (recording never delays a client): wait that moment.
        deadline = time.monotonic() + 2
        while (status := ask("status", sock_path)) is not None and not status["totals"]["denied"]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert status is not None
        assert status["mode"] == "enforce" and status["totals"]["denied"] == 1 and status["rules"] == "disabled"
        assert cli.main(["report", "--json", "--config", str(source)]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(r["exe"], r["denied"]) for r in rows] == [(os.path.realpath(f"/proc/{os.getpid()}/exe"), 1)]
        assert cli.main(["status", "--config", str(source)]) == 0
        assert "enforce mode: 1 requests" in capsys.readouterr().out
    finally:
        agent.stop()
        emu.stop()
    assert cli.main(["status", "--config", str(source)]) == 3
    assert "no running agent answered" in capsys.readouterr().err


def test_the_cache_answers_repeated_v1_requests_behind_the_policy(config: Config) -> None:
    from imds_agent.policy.model import Policy

    emu = Emulator(tokens="required", addresses=[("127.0.0.1", 0)])
    emu.start()
    upstream = UpstreamConfig(ipv4="127.0.0.1", port=emu.addresses[0][1])
    agent = Agent(dataclasses.replace(config, mode="enforce", upstream=upstream))
    agent.start()

    def get(path: str, headers: dict[str, str] | None = None) -> int:
        conn = http.client.HTTPConnection(*agent.server.addresses[0], timeout=5)
        conn.request("GET", path, headers=headers or {})
        status = conn.getresponse().status
        conn.close()
        return status

    try:
        emu.reset()
        assert [get("/latest/meta-data/instance-id") for _ in range(5)] == [200] * 5
        assert emu.counters()["requests"] == 1  # one GET upstream (and the token PUT): four from the cache
        agent.gate.replace("enforce", Policy(default="deny"))
        assert get("/latest/meta-data/instance-id") == 403  # the policy comes before the cache
        agent.gate.replace("enforce", Policy(default="allow"))
        token = emu.issue(60)
        before = emu.counters()["requests"]
        assert get("/latest/meta-data/instance-id", {"X-aws-ec2-metadata-token": token}) == 200
        assert emu.counters()["requests"] == before + 1  # a client's own token is the upstream's to judge
    finally:
        agent.stop()
        emu.stop()
    lines = [json.loads(x) for x in Path(config.audit.log).read_text().splitlines()]
    assert [x["cached"] for x in lines if x["status"] == 200] == [False, True, True, True, True, False]
