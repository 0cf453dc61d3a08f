from __future__ import annotations

from typing import Any

import pytest

from imds_agent.errors import UpstreamError
from imds_agent.identity.caller import Caller
from imds_agent.imds.token import FetchedToken, TokenCache
from imds_agent.imds.upstream import Headers, UpstreamResponse
from imds_agent.policy.model import Policy
from imds_agent.proxy.gate import AccessGate
from imds_agent.proxy.handler import Forwarder, origin_form, strip_hop_by_hop
from imds_agent.proxy.httpio import HttpError, parse_head
from imds_agent.proxy.types import Client, Kind, Outcome

CLIENT = Client(("127.0.0.1", 1), ("127.0.0.1", 2), None, Caller(True, 10, "/usr/bin/curl", 1000, "app"), 0.0)


class FakeUpstream:
    """Records requests; answers 401 to tokens listed in ``rejected``."""

    netloc = "upstream"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Headers]] = []
        self.rejected: set[str] = set()
        self.error: UpstreamError | None = None

    def request(self, method: str, target: str, headers: Headers) -> UpstreamResponse:
        self.sent.append((method, target, headers))
        if self.error is not None:
            raise self.error
        token = dict((n.lower(), v) for n, v in headers).get("x-aws-ec2-metadata-token")
        if token is None or token in self.rejected:
            return UpstreamResponse(401, "Unauthorized", [("Content-Length", "0")], b"")
        return UpstreamResponse(200, "OK", [("Content-Type", "text/plain"), ("Connection", "keep-alive")], b"i-0abc")


def make(mode: str = "audit", default: str = "allow") -> tuple[Forwarder, FakeUpstream, list[int]]:
    up = FakeUpstream()
    n = [0]

    def fetch(ttl: int) -> FetchedToken:
        n[0] += 1
        return FetchedToken(f"agent-token-{n[0]}", ttl)

    gate = AccessGate(mode, Policy(default=default))
    fwd = Forwarder(up, TokenCache(fetch, 600, 60), gate, clock=lambda: 1234.5)  # type: ignore[arg-type]
    return fwd, up, n


def req(text: str) -> Any:
    return parse_head(text.replace("\n", "\r\n").encode())


def sent_headers(up: FakeUpstream, i: int = -1) -> dict[str, str]:
    return {n.lower(): v for n, v in up.sent[i][2]}


def test_v1_request_gets_the_agent_token() -> None:
    fwd, up, _ = make()
    reply = fwd.handle(req("GET /latest/meta-data/instance-id HTTP/1.1\nHost: 169.254.169.254"), CLIENT)
    assert reply.data.startswith(b"HTTP/1.1 200 OK") and reply.data.endswith(b"i-0abc")
    assert sent_headers(up)["x-aws-ec2-metadata-token"] == "agent-token-1"
    assert reply.answer.kind is Kind.V1 and reply.answer.injected
    assert b"keep-alive" not in reply.data.lower()  # hop-by-hop header from upstream dropped


def test_v2_request_passes_untouched() -> None:
    fwd, up, fetched = make()
    reply = fwd.handle(
        req("GET /latest/meta-data/ HTTP/1.1\nx-aws-ec2-metadata-token:client-tok\nUser-Agent: x"), CLIENT
    )
    assert sent_headers(up) == {"x-aws-ec2-metadata-token": "client-tok", "user-agent": "x"}
    assert fetched[0] == 0 and not reply.answer.injected and reply.answer.kind is Kind.V2


def test_nothing_identifying_is_added() -> None:
    fwd, up, _ = make()
    fwd.handle(req("GET /latest/meta-data/ HTTP/1.1\nConnection: close, X-Secret\nX-Secret: s\nKeep-Alive: 5"), CLIENT)
    names = set(sent_headers(up))
    assert names == {"x-aws-ec2-metadata-token"}
    assert not names & {"x-forwarded-for", "forwarded", "via"}


def test_token_put_passes_ttl_and_refuses_xff() -> None:
    fwd, up, _ = make()
    fwd.handle(
        req("PUT /latest/api/token HTTP/1.1\nX-aws-ec2-metadata-token-ttl-seconds: 60\nContent-Length: 0"), CLIENT
    )
    assert up.sent[-1][0] == "PUT" and sent_headers(up) == {"x-aws-ec2-metadata-token-ttl-seconds": "60"}
    reply = fwd.handle(req("PUT /latest/api/token HTTP/1.1\nX-Forwarded-For: 10.0.0.1"), CLIENT)
    assert reply.data.startswith(b"HTTP/1.1 403") and len(up.sent) == 1


def test_relayed_tokenless_request_gets_no_token() -> None:
    fwd, up, fetched = make()
    reply = fwd.handle(req("GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\nVia: 1.1 squid"), CLIENT)
    assert "x-aws-ec2-metadata-token" not in sent_headers(up)
    assert reply.answer.relayed and fetched[0] == 0 and reply.data.startswith(b"HTTP/1.1 401")


def test_upstream_401_refreshes_once_and_retries_once() -> None:
    fwd, up, fetched = make()
    fwd.handle(req("GET / HTTP/1.1"), CLIENT)
    up.rejected.add("agent-token-1")
    reply = fwd.handle(req("GET /latest/meta-data/ HTTP/1.1"), CLIENT)
    assert reply.data.startswith(b"HTTP/1.1 200") and reply.answer.retried
    assert fetched[0] == 2 and sent_headers(up)["x-aws-ec2-metadata-token"] == "agent-token-2"
    up.rejected.add("agent-token-2")
    up.rejected.add("agent-token-3")
    before = len(up.sent)
    reply = fwd.handle(req("GET /latest/meta-data/ HTTP/1.1"), CLIENT)
    assert reply.data.startswith(b"HTTP/1.1 401") and len(up.sent) - before == 2  # one retry, not a loop


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("DELETE / HTTP/1.1", 405),
        ("POST /latest/api/token HTTP/1.1", 405),
        ("PUT /latest/meta-data/ HTTP/1.1", 405),
        ("GET / HTTP/1.1\nContent-Length: 5", 400),
        ("GET / HTTP/1.1\nTransfer-Encoding: chunked", 400),
        ("GET / HTTP/1.1\nContent-Length: 0\nContent-Length: 1", 400),
        ("GET example HTTP/1.1", 400),
    ],
)
def test_refusals(text: str, status: int) -> None:
    fwd, up, _ = make()
    reply = fwd.handle(req(text), CLIENT)
    assert reply.data.startswith(f"HTTP/1.1 {status}".encode())
    assert b"imds-agent: " in reply.data and up.sent == []
    # Recorded as the agent's own refusal with its status and cause, never as "allow".
    answer = reply.answer
    assert (answer.outcome, answer.status, answer.decided_by) == (Outcome.REFUSED, status, "agent")
    assert answer.cause and answer.cause in reply.data.decode()


def test_upstream_errors_become_502_or_504_naming_the_cause() -> None:
    fwd, up, _ = make()
    up.error = UpstreamError("metadata service at x did not answer within 3.0s", 504)
    reply = fwd.handle(req("GET /latest/meta-data/ HTTP/1.1\nx-aws-ec2-metadata-token: t"), CLIENT)
    assert reply.data.startswith(b"HTTP/1.1 504") and b"did not answer within 3.0s" in reply.data
    assert not reply.close


def test_head_keeps_upstream_length_without_body() -> None:
    fwd, up, _ = make()
    reply = fwd.handle(req("HEAD /latest/meta-data/instance-id HTTP/1.1"), CLIENT)
    assert reply.data.endswith(b"\r\n\r\n") and b"Content-Length: 6" in reply.data


def test_origin_form_and_hop_by_hop_helpers() -> None:
    assert origin_form("http://169.254.169.254/latest/meta-data/?x=1") == "/latest/meta-data/?x=1"
    assert origin_form("/a") == "/a"
    with pytest.raises(HttpError):
        origin_form("*")
    assert strip_hop_by_hop([("Connection", "foo"), ("Foo", "1"), ("TE", "x"), ("A", "b")]) == [("A", "b")]


def test_enforce_answers_the_verdicts_403_and_sends_nothing_upstream() -> None:
    fwd, up, fetched = make(mode="enforce", default="deny")
    reply = fwd.handle(req("GET /latest/meta-data/instance-id HTTP/1.1"), CLIENT)
    assert reply.data.startswith(b"HTTP/1.1 403") and b"exe=/usr/bin/curl uid=1000" in reply.data
    assert up.sent == [] and fetched[0] == 0
    answer = reply.answer
    assert (answer.outcome, answer.status, answer.mode, answer.time) == (Outcome.DENY, 403, "enforce", 1234.5)
    assert answer.decided_by == "default: deny" and answer.client is CLIENT


def test_audit_forwards_a_would_deny_request_and_records_it_so() -> None:
    fwd, up, _ = make(mode="audit", default="deny")
    reply = fwd.handle(req("GET /latest/meta-data/instance-id HTTP/1.1\nUser-Agent: probe/1"), CLIENT)
    assert reply.data.startswith(b"HTTP/1.1 200") and len(up.sent) == 1
    answer = reply.answer
    assert (answer.outcome, answer.status, answer.injected) == (Outcome.WOULD_DENY, 200, True)
    assert answer.user_agent == "probe/1" and answer.shown_path == "/latest/meta-data/instance-id"


def test_the_path_forwarded_is_the_one_judged() -> None:
    fwd, up, _ = make()
    fwd.handle(req("GET //latest/./meta-data//instance-id?x=1 HTTP/1.1"), CLIENT)
    assert up.sent[-1][1] == "/latest/meta-data/instance-id?x=1"


def test_an_upstream_failure_is_recorded_with_its_cause() -> None:
    fwd, up, _ = make()
    up.error = UpstreamError("metadata service at x refused the connection", 502)
    answer = fwd.handle(req("GET /latest/meta-data/ HTTP/1.1"), CLIENT).answer
    assert (answer.status, answer.outcome) == (502, Outcome.ALLOW)
    assert answer.cause == "metadata service at x refused the connection"


@pytest.mark.parametrize("mode", ["audit", "enforce"])
def test_a_path_that_cannot_be_classified_is_refused_in_every_mode_and_never_forwarded(mode: str) -> None:
    fwd, up, _ = make(mode=mode)
    for target in ("/latest/meta-data/iam/security-credentials%3F", "/LATEST/meta-data/iam/security-credentials/",
                   "/latest/meta-data/%ff", "/latest/meta-data/%0A%0Dforged:%20line"):  # fmt: skip
        reply = fwd.handle(req(f"GET {target} HTTP/1.1"), CLIENT)
        assert reply.data.startswith(b"HTTP/1.1 400") and b"refused path" in reply.data
        answer = reply.answer
        assert (answer.outcome, answer.path) == (Outcome.REFUSED, None)
        assert "\n" not in answer.shown_path and "\r" not in answer.shown_path
    assert up.sent == []
