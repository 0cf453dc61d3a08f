"""The rule files shipped in rules/ load, and they grant what the agents they name need (and no more)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imds_agent.errors import ConfigError
from imds_agent.identity.caller import Caller
from imds_agent.policy.engine import decide
from imds_agent.policy.loader import load_policy
from imds_agent.policy.model import Policy

RULES = Path(__file__).parents[3] / "rules"
CREDS = "/latest/meta-data/iam/security-credentials/role"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(str(RULES), default="deny")


@pytest.mark.parametrize(
    ("exe", "uid", "cmdline", "path", "allowed"),
    [
        ("/usr/bin/amazon-ssm-agent", 0, (), CREDS, True),
        ("/snap/amazon-ssm-agent/7993/ssm-agent-worker", 0, (), "/latest/meta-data/identity-credentials/ec2/x", True),
        ("/usr/bin/amazon-ssm-agent", 1000, (), CREDS, False),  # not as another user
        ("/usr/bin/amazon-ssm-agent", 0, (), "/latest/user-data", False),
        ("/usr/bin/python3.11", 0, ("/usr/bin/python3", "/usr/bin/cloud-init", "init"), "/2021-03-23/user-data", True),
        ("/usr/bin/python3.11", 0, ("/usr/bin/python3", "/tmp/evil.py"), "/latest/user-data", False),
        ("/usr/local/aws-cli/v2/2.17.0/dist/aws", 1000, (), CREDS, True),
        ("/usr/bin/python3.11", 1000, ("/usr/bin/python3", "/usr/bin/aws", "s3", "ls"), CREDS, True),
        ("/usr/bin/curl", 1000, (), CREDS, False),
        ("/usr/bin/kubelet", 0, (), CREDS, True),
    ],
)
def test_shipped_rules(policy: Policy, exe: str, uid: int, cmdline: tuple[str, ...], path: str, allowed: bool) -> None:
    caller = Caller(True, 1, exe, uid, None, cmdline or (exe,))
    assert decide(policy, caller, "GET", path).allow is allowed


@pytest.mark.parametrize(
    ("exe", "allowed"),
    [
        ("/agent", True),  # the ECS agent in its container
        ("/app/aws-k8s-agent", True),  # the VPC CNI's aws-node
        ("/usr/bin/amazon-ssm-agent", False),  # a container image's binary of that name is not the host's agent
        ("/usr/bin/kubelet", False),
    ],
)
def test_only_rules_for_containerised_agents_match_files_that_are_not_the_hosts(
    policy: Policy, exe: str, allowed: bool
) -> None:
    caller = Caller(True, 1, exe, 0, "root", (exe,), exe_verified=False)
    assert decide(policy, caller, "GET", CREDS).allow is allowed


def test_examples_file_is_all_comments(policy: Policy) -> None:
    assert not any(r.source.endswith("90-examples.yaml") for r in policy.rules)
    assert len(policy.files) == 8


def test_the_commented_examples_load_once_uncommented(tmp_path: Path) -> None:
    lines = (RULES / "90-examples.yaml").read_text().splitlines()
    body = [line[2:] for line in lines if line.startswith(("# rules:", "#   "))]
    (tmp_path / "90-examples.yaml").write_text("\n".join(body) + "\n")
    examples = load_policy(str(tmp_path))
    assert len(examples.rules) >= 5 and any(r.in_containers for r in examples.rules)
    assert all(r.source.startswith(str(tmp_path)) for r in examples.rules)


def test_an_unquoted_numeric_hash_gets_a_hint(tmp_path: Path) -> None:
    (tmp_path / "50-x.yaml").write_text("rules:\n  - exe: /opt/x\n    sha256: " + "1" * 64 + "\n")
    with pytest.raises(ConfigError, match="quote it"):
        load_policy(str(tmp_path))
