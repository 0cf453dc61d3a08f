"""`explain`'s wording: the container a caller was described in, the rules that passed it by, and escaping."""

from __future__ import annotations

import pytest

from imds_agent.identity.caller import Caller, ContainerInfo
from imds_agent.policy.explain import EXPLAINED_ID, described_container, explain, label
from imds_agent.policy.model import ANY_EXE, Policy, Rule, WorkloadPattern

CREDS = "/latest/meta-data/iam/security-credentials/role"
PAYMENTS = WorkloadPattern(image="registry.example.com/payments/*:*", pod_namespace="payments")
EXPORTER = Rule("exporter", ANY_EXE, "50-pods.yaml:2", sensitive=("credentials",), workload=PAYMENTS)


def test_the_options_describe_a_container_as_the_agent_would_see_it() -> None:
    assert described_container() is None
    assert described_container(image="nginx:1.25", labels=[("b", "2"), ("a", "1"), ("b", "3")]) == ContainerInfo(
        EXPLAINED_ID, "unknown", image="docker.io/library/nginx:1.25", labels=(("a", "1"), ("b", "3"))
    )
    assert described_container(pod_namespace="payments", runtime="containerd") == ContainerInfo(
        EXPLAINED_ID, "containerd", pod_namespace="payments"
    )
    assert label("team=billing=yes") == ("team", "billing=yes") and label("empty=") == ("empty", "")
    for bad in ("team", "=billing"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            label(bad)


def test_a_pod_caller_is_explained_with_its_container_and_the_rule_that_granted() -> None:
    pod = described_container("registry.example.com/payments/exporter:1.4", "exporter", "containerd",
                              pod_namespace="payments", pod_name="exporter-1")  # fmt: skip
    caller = Caller(True, None, "/app/exporter", 1000, None, exe_verified=False, workload=pod, uid_inside=0)
    allowed, lines = explain(Policy((EXPORTER,)), caller, "GET", CREDS)
    assert allowed
    assert lines[:3] == [
        f"allow: /app/exporter (uid 1000) GET {CREDS}",
        "  in: containerd container (explain), name exporter, image registry.example.com/payments/exporter:1.4, "
        "pod payments/exporter-1, uid 0 inside",
        "  decided by: exporter (50-pods.yaml:2)",
    ]


def test_a_container_rule_that_passed_a_caller_by_says_which_field() -> None:
    other = described_container("registry.example.com/payments/exporter:1.4", pod_namespace="default",
                                labels=[("team", "billing\nforged: line")])  # fmt: skip
    caller = Caller(True, None, "/app/exporter\x1b[2J", 1000, None, exe_verified=False, workload=other)
    allowed, lines = explain(Policy((EXPORTER,)), caller, "GET", CREDS)
    assert not allowed and lines[-1] == (
        "  not exporter [50-pods.yaml:2]: the container's pod namespace does not match "
        "(image registry.example.com/payments/*:*, pod namespace payments)"
    )
    assert "  labels: team=billing\\nforged: line" in lines
    assert all("\n" not in line and "\x1b" not in line for line in lines)
    assert "  decided by: default: allow-nonsensitive" in lines
