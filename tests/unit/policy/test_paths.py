"""Path normalization: every spelling real clients use maps to one path; unsafe ones are refused."""

from __future__ import annotations

import pytest

from imds_agent.policy.paths import PathError, compile_glob, normalize

CREDS = "meta-data/iam/security-credentials/role"


@pytest.mark.parametrize(
    "target",
    [
        "/latest/meta-data/iam/security-credentials/role",
        "/2021-03-23/meta-data/iam/security-credentials/role",
        "/2009-04-04/meta-data/iam/security-credentials/role/",
        "//latest//meta-data/iam//security-credentials/role",
        "/latest/meta-data/iam/security-credentials/%72ole",
        "/latest/meta-data/./iam/x/../security-credentials/role",
        "/latest/meta-data/iam/security-credentials/role?x=1",
    ],
)
def test_spellings_of_the_credentials_path(target: str) -> None:
    p = normalize(target)
    assert p.path == CREDS and p.sensitive == "credentials"


def test_versions_and_classes() -> None:
    assert normalize("/").path == "" and normalize("/").version is None
    assert normalize("/latest").version == "latest"
    assert normalize("/1.0/meta-data/instance-id").path == "meta-data/instance-id"
    assert normalize("/latest/user-data").sensitive == "user-data"
    assert normalize("/latest/meta-data/identity-credentials/ec2/info").sensitive == "identity-credentials"
    assert normalize("/latest/meta-data/iam/info").sensitive is None
    assert normalize("/latest/meta-data/iam/security-credentials").sensitive == "credentials"
    # Only an exact segment makes the class: a look-alike name is not sensitive, and not hidden either.
    assert normalize("/latest/meta-data/iam/security-credentials-x").sensitive is None


@pytest.mark.parametrize(
    "target",
    [
        "/latest/../../etc/passwd",
        "/..",
        "/latest/meta-data%2fiam/security-credentials/role",
        "/latest/meta-data/%252e%252e/x",
        "/latest/meta-data\\iam",
        "/latest/meta-data/%00",
        "relative/path",
    ],
)
def test_unsafe_paths_are_refused(target: str) -> None:
    with pytest.raises(PathError):
        normalize(target)


def test_dot_dot_inside_cannot_escape_into_a_sensitive_class_unseen() -> None:
    assert normalize("/latest/meta-data/placement/../iam/security-credentials/r").sensitive == "credentials"


def test_globs() -> None:
    assert compile_glob("meta-data/*").match("meta-data/instance-id")
    assert not compile_glob("meta-data/*").match("meta-data/placement/region")
    assert compile_glob("meta-data/**").match("meta-data/placement/region")
    assert compile_glob("meta-data/**").match("meta-data")
    assert compile_glob("**").match("")
    assert compile_glob("/usr/bin/*").match("/usr/bin/curl")
    assert not compile_glob("/usr/bin/*").match("/usr/bin/x/curl")


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        ("//latest/meta-data/instance-id", "/latest/meta-data/instance-id"),
        ("/latest/meta-data/", "/latest/meta-data/"),
        ("/2021-03-23//meta-data/iam/./info?x=1", "/2021-03-23/meta-data/iam/info?x=1"),
        ("/latest/meta-data/%69nstance-id", "/latest/meta-data/instance-id"),
        ("/", "/"),
        ("/latest", "/latest"),
    ],
)
def test_canonical_target_is_what_the_policy_judged(raw: str, sent: str) -> None:
    assert normalize(raw).canonical_target(raw) == sent
