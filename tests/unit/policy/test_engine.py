"""Decisions: rule matching on exe, uid, user, cmdline and hash; grants; sensitive classes; defaults."""

from __future__ import annotations

import dataclasses

import pytest

from imds_agent.identity.caller import Caller, ContainerInfo
from imds_agent.policy.engine import decide
from imds_agent.policy.model import ANY_EXE, Policy, Rule, WorkloadPattern

CURL = Caller(True, 100, "/usr/bin/curl", 1000, "app", ("curl", "http://169.254.169.254/"))
SSM = Caller(True, 200, "/usr/bin/amazon-ssm-agent", 0, "root", ("/usr/bin/amazon-ssm-agent",))
CREDS = "/latest/meta-data/iam/security-credentials/role"


def policy(*rules: Rule, default: str = "allow-nonsensitive", unknown: str = "deny") -> Policy:
    return Policy(rules, default, unknown)


def test_rule_grants_sensitive_only_when_named() -> None:
    wild = Rule("curl", ("/usr/bin/curl",), "f:1")
    assert decide(policy(wild), CURL, "GET", "/latest/meta-data/instance-id").allow
    d = decide(policy(wild), CURL, "GET", CREDS)
    assert not d.allow and d.decided_by == "curl (f:1)" and "credentials" in d.reason
    named = Rule("curl", ("/usr/bin/curl",), "f:1", sensitive=("credentials",))
    assert decide(policy(named), CURL, "GET", CREDS).allow
    assert not decide(policy(named), CURL, "GET", "/latest/user-data").allow


def test_paths_limit_what_a_rule_grants_and_the_next_matching_rule_may_grant_more() -> None:
    narrow = Rule("narrow", ("/usr/bin/*",), paths=("meta-data/placement/**",))
    assert decide(policy(narrow), CURL, "GET", "/2021-03-23/meta-data/placement/region").allow
    assert not decide(policy(narrow), CURL, "GET", "/latest/meta-data/instance-id").allow
    wide = Rule("wide", ("/usr/bin/curl",))
    assert decide(policy(narrow, wide), CURL, "GET", "/latest/meta-data/instance-id").decided_by.startswith("wide")


@pytest.mark.parametrize(
    ("rule", "matches"),
    [
        (Rule("r", ("/usr/bin/curl",), uids=(1000,)), True),
        (Rule("r", ("/usr/bin/curl",), uids=(0,)), False),
        (Rule("r", ("/usr/bin/curl",), users=("app",)), True),
        (Rule("r", ("/usr/bin/curl",), users=("root",)), False),
        (Rule("r", ("/usr/bin/curl",), cmdline="curl http://*"), True),
        (Rule("r", ("/usr/bin/curl",), cmdline="curl -X*"), False),
        (
            Rule(
                "r",
                ("/usr/bin/wget", "/usr/bin/cu*"),
            ),
            True,
        ),
        (Rule("r", ("/usr/local/bin/curl",)), False),
    ],
)
def test_caller_matching(rule: Rule, matches: bool) -> None:
    d = decide(policy(rule, default="deny"), CURL, "GET", "/latest/meta-data/instance-id")
    assert d.allow is matches


def test_sha256_rule_needs_the_hash_to_match() -> None:
    digest = "a" * 64
    rule = Rule("pinned", ("/usr/bin/curl",), sha256=(digest,))
    p = policy(rule, default="deny")
    assert decide(p, CURL, "GET", "/latest/meta-data/", digest).allow
    assert not decide(p, CURL, "GET", "/latest/meta-data/", "b" * 64).allow
    assert not decide(p, CURL, "GET", "/latest/meta-data/", None).allow
    assert p.needs_hash


@pytest.mark.parametrize(
    ("default", "plain", "sensitive"),
    [("allow", True, True), ("allow-nonsensitive", True, False), ("deny", False, False)],
)
def test_defaults_for_callers_no_rule_matches(default: str, plain: bool, sensitive: bool) -> None:
    p = policy(default=default)
    assert decide(p, SSM, "GET", "/latest/meta-data/instance-id").allow is plain
    d = decide(p, SSM, "GET", CREDS)
    assert d.allow is sensitive and d.decided_by == f"default: {default}"


def test_unknown_callers_follow_their_own_setting_and_never_match_rules() -> None:
    unknown = Caller.unknown("process exited", uid=1000)
    everyone = Rule("all", ("/**",), sensitive=("credentials",))
    assert not decide(policy(everyone), unknown, "GET", "/latest/meta-data/").allow
    assert decide(policy(everyone, unknown="allow-nonsensitive"), unknown, "GET", "/latest/meta-data/").allow


def test_token_put_is_allowed_and_bad_paths_are_denied() -> None:
    p = policy(default="deny")
    assert decide(p, CURL, "PUT", "/latest/api/token").allow
    d = decide(p, CURL, "GET", "/latest/../../x")
    assert not d.allow and "climbs" in d.reason


def test_inject_token_false_is_carried_in_the_decision() -> None:
    rule = Rule("v2-only", ("/usr/bin/curl",), inject_token=False)
    d = decide(policy(rule), CURL, "GET", "/latest/meta-data/")
    assert d.allow and not d.inject


def test_a_file_other_than_the_hosts_matches_only_rules_for_containers() -> None:
    impostor = dataclasses.replace(CURL, exe_verified=False)
    host_rule = Rule("host", ("/usr/bin/curl",), sensitive=("credentials",))
    container_rule = Rule("ctr", ("/usr/bin/curl",), sensitive=("credentials",), in_containers=True)
    creds = "/latest/meta-data/iam/security-credentials/"
    assert decide(policy(host_rule, default="deny"), CURL, "GET", creds).allow
    denied = decide(policy(host_rule, default="deny"), impostor, "GET", creds)
    assert not denied.allow and denied.decided_by == "default: deny"
    assert decide(policy(container_rule, default="deny"), impostor, "GET", creds).allow
    assert decide(policy(container_rule, default="deny"), CURL, "GET", creds).allow  # host files too


IN_POD = Caller(
    True,
    300,
    "/app/exporter",
    1000,
    None,
    exe_verified=False,
    workload=ContainerInfo(
        "ab" * 32,
        "containerd",
        "exporter",
        "registry.example.com/payments/exporter:1.4",
        pod_namespace="payments",
        pod_name="exporter-7d9f8b6c5-x2x7q",
    ),
)


@pytest.mark.parametrize(
    ("default", "metadata", "credentials"),
    [("allow-nonsensitive", True, False), ("deny", False, False), ("allow", True, True)],
)
def test_a_container_caller_no_rule_names_gets_the_default_and_never_credentials_under_allow_nonsensitive(
    default: str, metadata: bool, credentials: bool
) -> None:
    host_rules = policy(
        Rule("curl", ("/usr/bin/curl",)),
        Rule("ssm", ("/app/exporter",), sensitive=("credentials",)),
        Rule("web", ANY_EXE, workload=WorkloadPattern(image="registry.example.com/web:*")),
        default=default,
    )
    assert decide(host_rules, IN_POD, "GET", "/latest/meta-data/placement/region").allow is metadata
    d = decide(host_rules, IN_POD, "GET", CREDS)
    assert d.allow is credentials and d.decided_by == f"default: {default}"


def test_a_pod_rule_grants_its_pod_the_credentials_and_nobody_else() -> None:
    pods = policy(
        Rule(
            "exporter",
            ANY_EXE,
            "p:1",
            sensitive=("credentials",),
            workload=WorkloadPattern(image="registry.example.com/payments/*:*", pod_namespace="payments"),
        )
    )
    assert decide(pods, IN_POD, "GET", CREDS).decided_by == "exporter (p:1)"
    assert IN_POD.workload is not None
    elsewhere = dataclasses.replace(IN_POD, workload=dataclasses.replace(IN_POD.workload, pod_namespace="default"))
    assert not decide(pods, elsewhere, "GET", CREDS).allow
    assert not decide(pods, dataclasses.replace(IN_POD, workload=None), "GET", CREDS).allow
