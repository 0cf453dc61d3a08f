"""The access gate: enforce denies with a useful 403, audit records would-deny, relayed v1 requests are refused."""

from __future__ import annotations

import dataclasses

import pytest

from imds_agent.identity.caller import Caller
from imds_agent.policy.model import Policy, Rule
from imds_agent.proxy.gate import AccessGate
from imds_agent.proxy.handler import Exchange
from imds_agent.proxy.httpio import HttpError, Request

CURL = Caller(True, 10, "/usr/bin/curl", 1000, "app", ("curl",))
CREDS = "/latest/meta-data/iam/security-credentials/role"
POLICY = Policy((Rule("ssm", ("/usr/bin/amazon-ssm-agent",), "10-ssm.yaml:3", sensitive=("credentials",)),))


class NoIdentity:
    def close(self) -> None:
        pass


def gate(mode: str) -> AccessGate:
    return AccessGate(mode, POLICY, identifier=NoIdentity())  # type: ignore[arg-type]


def request(path: str, *headers: tuple[str, str], method: str = "GET") -> Request:
    return Request(method, path, (1, 1), list(headers))


def test_enforce_denies_with_a_message_naming_exe_uid_path_and_rule() -> None:
    ex = Exchange("GET", CREDS, "v1")
    with pytest.raises(HttpError) as info:
        gate("enforce").admit({"caller": CURL}, request(CREDS), CREDS, ex)
    err = info.value
    assert err.status == 403 and ex.decision == "deny"
    assert "exe=/usr/bin/curl uid=1000" in err.message and "path=/latest/" in err.message
    assert "default: allow-nonsensitive" in err.message


def test_audit_forwards_and_records_would_deny() -> None:
    g = gate("audit")
    ex = Exchange("GET", CREDS, "v1")
    assert g.admit({"caller": CURL}, request(CREDS), CREDS, ex) is True
    assert ex.decision == "would-deny"


def test_relayed_tokenless_request_is_refused_even_for_an_allowed_caller() -> None:
    ssm = Caller(True, 1, "/usr/bin/amazon-ssm-agent", 0, "root")
    ex = Exchange("GET", CREDS, "v1")
    with pytest.raises(HttpError, match="relayed"):
        gate("enforce").admit({"caller": ssm}, request(CREDS, ("X-Forwarded-For", "1.2.3.4")), CREDS, ex)
    ex = Exchange("GET", CREDS, "v1")
    gate("audit").admit({"caller": ssm}, request(CREDS, ("Via", "1.1 proxy")), CREDS, ex)
    assert ex.decision == "would-deny" and ex.decided_by == "SSRF guard"


def test_user_agent_changes_nothing() -> None:
    for ua in ("aws-sdk-go/1.44", "amazon-ssm-agent/3.3", ""):
        ex = Exchange("GET", CREDS, "v1")
        with pytest.raises(HttpError):
            gate("enforce").admit({"caller": CURL}, request(CREDS, ("User-Agent", ua)), CREDS, ex)


def test_unidentified_connection_is_not_trusted() -> None:
    ex = Exchange("GET", "/latest/meta-data/", "v1")
    with pytest.raises(HttpError, match="unidentified caller"):
        gate("enforce").admit({}, request("/latest/meta-data/"), "/latest/meta-data/", ex)


def test_replace_switches_mode_and_policy_together() -> None:
    g = gate("audit")
    g.replace("enforce", Policy(default="allow"))
    ex = Exchange("GET", CREDS, "v1")
    assert g.admit({"caller": CURL}, request(CREDS), CREDS, ex) and ex.decision == "allow"


def test_a_shared_connection_is_allowed_only_what_every_holder_may_have() -> None:
    ssm = Caller(True, 1, "/usr/bin/amazon-ssm-agent", 1000, "app")
    lent = dataclasses.replace(ssm, sharers=(CURL,))  # curl holds the same socket
    ex = Exchange("GET", CREDS, "v1")
    with pytest.raises(HttpError) as info:
        gate("enforce").admit({"caller": lent}, request(CREDS), CREDS, ex)
    assert "shared with /usr/bin/curl (pid=10, uid=1000)" in info.value.message
    assert ex.decided_by == "default: allow-nonsensitive"
    # What both may read (instance metadata, by the default) stays readable: a shell script's /dev/tcp
    # connection that `cat` reads from keeps working.
    plain = "/latest/meta-data/instance-id"
    ex = Exchange("GET", plain, "v1")
    assert gate("enforce").admit({"caller": lent}, request(plain), plain, ex) is True
    assert ex.decision == "allow"


def test_the_403_says_when_the_path_did_not_lead_to_the_hosts_file() -> None:
    impostor = dataclasses.replace(CURL, exe_verified=False)
    ex = Exchange("GET", CREDS, "v1")
    with pytest.raises(HttpError) as info:
        gate("enforce").admit({"caller": impostor}, request(CREDS), CREDS, ex)
    assert "exe=/usr/bin/curl uid=1000 (not the host's file at that path" in info.value.message
