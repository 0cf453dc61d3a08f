"""The access gate: one Verdict per request; enforce denies with a useful 403 body, audit says would-deny, and a
relayed tokenless request never gets the agent's token in either mode."""

from __future__ import annotations

import dataclasses

from imds_agent.identity.caller import Caller
from imds_agent.policy.model import Policy, Rule
from imds_agent.policy.paths import normalize
from imds_agent.proxy.gate import AccessGate
from imds_agent.proxy.httpio import Request
from imds_agent.proxy.types import Client, Kind, Outcome, Verdict

CURL = Caller(True, 10, "/usr/bin/curl", 1000, "app", ("curl",))
SSM_ROOT = Caller(True, 1, "/usr/bin/amazon-ssm-agent", 0, "root")
CREDS = "/latest/meta-data/iam/security-credentials/role"
POLICY = Policy((Rule("ssm", ("/usr/bin/amazon-ssm-agent",), "10-ssm.yaml:3", sensitive=("credentials",)),))


def client(caller: Caller) -> Client:
    return Client(("127.0.0.1", 40000), ("127.0.0.1", 8775), ("169.254.169.254", 80), caller, 0.0)


def request(path: str, *headers: tuple[str, str], method: str = "GET") -> Request:
    return Request(method, path, (1, 1), list(headers))


def judge(mode: str, caller: Caller, path: str, *headers: tuple[str, str], kind: Kind = Kind.V1) -> Verdict:
    return AccessGate(mode, POLICY).judge(client(caller), request(path, *headers), normalize(path), kind)


def test_enforce_denies_with_a_message_naming_exe_uid_path_and_rule() -> None:
    v = judge("enforce", CURL, CREDS)
    assert v.outcome is Outcome.DENY and not v.forwards and v.mode == "enforce"
    assert "exe=/usr/bin/curl uid=1000" in v.message and "path=/latest/" in v.message
    assert "default: allow-nonsensitive" in v.message and v.decided_by == "default: allow-nonsensitive"


def test_audit_forwards_and_says_would_deny() -> None:
    v = judge("audit", CURL, CREDS)
    assert v.outcome is Outcome.WOULD_DENY and v.forwards and v.inject
    assert v.path is not None and v.path.sensitive == "credentials"


def test_an_allowed_caller_is_allowed_with_the_token() -> None:
    v = judge("enforce", SSM_ROOT, CREDS)
    assert (v.outcome, v.inject, v.relayed, v.message) == (Outcome.ALLOW, True, False, "")
    assert v.decided_by == "ssm (10-ssm.yaml:3)"


def test_a_relayed_tokenless_request_never_gets_the_token_in_either_mode() -> None:
    v = judge("enforce", SSM_ROOT, CREDS, ("X-Forwarded-For", "1.2.3.4"))
    assert v.outcome is Outcome.DENY and "relayed" in v.message
    # audit mode used to say "inject" here, leaving only a second check in the handler to keep the token off.
    v = judge("audit", SSM_ROOT, CREDS, ("Via", "1.1 proxy"))
    assert v.outcome is Outcome.WOULD_DENY and v.decided_by == "SSRF guard"
    assert v.relayed and not v.inject and v.forwards
    # A request the policy denies anyway is still marked relayed and still gets no token.
    v = judge("audit", CURL, CREDS, ("Forwarded", "for=1.2.3.4"))
    assert v.relayed and not v.inject


def test_a_relayed_request_with_its_own_token_is_judged_as_any_v2_request() -> None:
    v = judge("enforce", SSM_ROOT, CREDS, ("X-Forwarded-For", "1.2.3.4"), kind=Kind.V2)
    assert v.outcome is Outcome.ALLOW and not v.relayed


def test_user_agent_changes_nothing() -> None:
    for ua in ("aws-sdk-go/1.44", "amazon-ssm-agent/3.3", ""):
        assert judge("enforce", CURL, CREDS, ("User-Agent", ua)).outcome is Outcome.DENY


def test_an_unidentified_client_is_not_trusted() -> None:
    v = judge("enforce", Caller.unknown("gone"), "/latest/meta-data/")
    assert v.outcome is Outcome.DENY and "unidentified caller" in v.message


def test_replace_switches_mode_and_policy_together() -> None:
    g = AccessGate("audit", POLICY)
    g.replace("enforce", Policy(default="allow"))
    v = g.judge(client(CURL), request(CREDS), normalize(CREDS), Kind.V1)
    assert (v.outcome, v.mode, g.mode) == (Outcome.ALLOW, "enforce", "enforce")


def test_a_shared_connection_is_allowed_only_what_every_holder_may_have() -> None:
    ssm = Caller(True, 1, "/usr/bin/amazon-ssm-agent", 1000, "app")
    lent = dataclasses.replace(ssm, sharers=(CURL,))  # curl holds the same socket
    v = judge("enforce", lent, CREDS)
    assert v.outcome is Outcome.DENY and "shared with /usr/bin/curl (pid=10, uid=1000)" in v.message
    assert v.decided_by == "default: allow-nonsensitive"
    # What both may read (instance metadata, by the default) stays readable: a shell script's /dev/tcp
    # connection that `cat` reads from keeps working.
    assert judge("enforce", lent, "/latest/meta-data/instance-id").outcome is Outcome.ALLOW


def test_the_403_says_when_the_path_did_not_lead_to_the_hosts_file() -> None:
    impostor = dataclasses.replace(CURL, exe_verified=False)
    v = judge("enforce", impostor, CREDS)
    assert "exe=/usr/bin/curl uid=1000 (not the host's file at that path" in v.message
