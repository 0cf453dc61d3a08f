"""Path normalization: every spelling real clients use maps to one path; what cannot be read with certainty is
refused, never called non-sensitive."""

from __future__ import annotations

import pytest

from imds_agent.policy.paths import PathError, compile_glob, is_version, normalize, normalize_pattern

CREDS = "meta-data/iam/security-credentials/role"


@pytest.mark.parametrize(
    "target",
    [
        "/latest/meta-data/iam/security-credentials/role",
        "/2021-03-23/meta-data/iam/security-credentials/role",
        "/2009-04-04/meta-data/iam/security-credentials/role/",
        "/1.0/meta-data/iam/security-credentials/role",
        "//latest//meta-data/iam//security-credentials/role",
        "/latest/meta-data/iam/security-credentials/%72ole",
        "/latest/%6deta-data/iam/security-credentials/role",
        "/latest/meta-data/iam/security%2Dcredentials/role",
        "/%6catest/meta-data/iam/security-credentials/role",
        "/latest/meta-data/./iam/x/../security-credentials/role",
        "/latest/meta-data/iam/security-credentials/role/.",
        "/latest/meta-data/iam/%2e/security-credentials/%2E%2e/security-credentials/role",
        "/./latest/meta-data/iam/security-credentials/role",
        "/latest/meta-data/iam/security-credentials/role?x=1",
        "/meta-data/iam/security-credentials/role",  # no version at all: classed all the same
    ],
)
def test_spellings_of_the_credentials_path(target: str) -> None:
    p = normalize(target)
    assert p.path == CREDS and p.sensitive == "credentials"


def test_versions_and_classes() -> None:
    assert normalize("/").path == "" and normalize("/").version is None
    assert normalize("/latest").version == "latest"
    assert normalize("/latest/").path == ""
    assert normalize("/1.0/meta-data/instance-id").path == "meta-data/instance-id"
    assert normalize("/2024-02-29/meta-data/instance-id").version == "2024-02-29"  # a leap day is a date
    assert normalize("/latest/user-data").sensitive == "user-data"
    assert normalize("/latest/meta-data/identity-credentials/ec2/info").sensitive == "identity-credentials"
    assert normalize("/latest/meta-data/iam/info").sensitive is None
    assert normalize("/latest/meta-data/iam/security-credentials").sensitive == "credentials"
    assert normalize("/dynamic/instance-identity/document").version is None
    # Only an exact segment makes the class: a look-alike name is not sensitive, and not hidden either.
    assert normalize("/latest/meta-data/iam/security-credentials-x").sensitive is None
    assert normalize("/latest/meta-data/tags/instance/Name").path == "meta-data/tags/instance/Name"
    assert normalize("/latest/meta-data/public-keys/0=demo").path == "meta-data/public-keys/0=demo"


@pytest.mark.parametrize(
    ("segment", "version"),
    [
        ("latest", True),
        ("1.0", True),
        ("2021-03-23", True),
        ("2024-02-29", True),
        ("LATEST", False),
        ("Latest", False),
        ("latest.", False),
        ("1.00", False),
        ("1", False),
        ("2021-3-23", False),
        ("2021-02-30", False),
        ("2021-13-01", False),
        ("2023-02-29", False),
        ("0000-01-01", False),
        ("2021-03-23\n", False),
        ("２０２１-03-23", False),  # fullwidth digits match \d but are no version
    ],
)
def test_is_version(segment: str, version: bool) -> None:
    assert is_version(segment) is version


# Each refused spelling with the words its message must contain.
REFUSED = [
    # Unknown version segments: the real service may serve some of them, the agent cannot know which.
    ("/LATEST/meta-data/iam/security-credentials/role", "not a version"),
    ("/Latest/meta-data/iam/security-credentials/role", "not a version"),
    ("/latest./meta-data/iam/security-credentials/role", "not a version"),
    ("/2021-3-23/meta-data/iam/security-credentials/role", "not a version"),
    ("/2021-02-30/meta-data/iam/security-credentials/role", "not a version"),
    ("/1.00/meta-data/iam/security-credentials/role", "not a version"),
    ("/%4cATEST/meta-data/iam/security-credentials/role", "not a version"),
    ("/foo/meta-data/iam/security-credentials/role", "not a version"),
    ("/Meta-Data/iam/security-credentials/role", "not a version"),
    ("/x/../LATEST/meta-data/iam/security-credentials/role", "not a version"),
    ("/latest/latest/meta-data/iam/security-credentials/role", "two versions"),
    ("/latest/2021-03-23/user-data", "two versions"),
    ("/latest/LATEST/meta-data/iam/security-credentials/role", "two versions"),
    # Escaped delimiters, '%', backslash, NUL, controls, space, non-ASCII.
    ("/latest/meta-data/iam/security-credentials%3F/role", "%3F"),
    ("/latest/meta-data/iam%3f/security-credentials/role", "%3F"),
    ("/latest/meta-data/iam/security-credentials%23/role", "%23"),
    ("/latest/meta-data%2fiam/security-credentials/role", "%2F"),
    ("/latest/meta-data%2Fiam/security-credentials/role", "%2F"),
    ("/latest/meta-data%5ciam/security-credentials/role", "%5C"),
    ("/latest/meta-data/%00", "%00"),
    ("/latest/meta-data/%0d%0aX: y", "%0D"),
    ("/latest/meta-data/%09", "%09"),
    ("/latest/meta-data/%20", "%20"),
    ("/latest/meta-data/%7f", "%7F"),
    ("/latest/meta-data/%252e%252e/x", "%25"),
    ("/latest/meta-data/%ff", "%FF"),
    ("/latest/meta-data/%c0%af", "%C0"),
    ("/latest/meta-data/%e2%80%a8", "%E2"),
    ("/latest/meta-data/%c3%a9", "%C3"),
    ("/latest/meta-data/%3c", "%3C"),
    # Malformed escapes.
    ("/latest/meta-data/%", "two-digit hex escape"),
    ("/latest/meta-data/%4", "two-digit hex escape"),
    ("/latest/meta-data/%G1", "two-digit hex escape"),
    ("/latest/meta-data/%%41", "two-digit hex escape"),
    ("/latest/meta-data/% 1", "two-digit hex escape"),
    # Raw characters a request target must not carry (the request parser refuses some already).
    ("/latest/meta-data\\iam", "%5C"),
    ("/latest/meta-data/\x00", "%00"),
    ("/latest/meta-data/\r\nX-Forged: 1", "%0D"),
    ("/latest/meta-data/ x", "%20"),
    ("/latest/meta-data/\x7f", "%7F"),
    ("/latest/meta-data/\x85", "%85"),
    ("/latest/meta-data/é", "%E9"),
    ("/latest/meta-data/{x}", "%7B"),
    ("/latest/meta-data/\u2028", "%E2%80%A8"),
    # Fragments, raw or in the query.
    ("/latest/meta-data/instance-id#/../../iam/security-credentials/role", "fragment"),
    ("/latest/meta-data/instance-id?x#y", "fragment"),
    ("/latest/meta-data/iam/security-credentials#", "fragment"),
    # The query is forwarded as sent, so it may hold nothing but what a query may.
    ("/latest/meta-data/instance-id?x=\x85", "the query has '%85'"),
    ("/latest/meta-data/instance-id?x= y", "the query has '%20'"),
    ("/latest/meta-data/instance-id?x=%", "the query has a '%'"),
    ("/latest/meta-data/instance-id?x=%zz", "the query has a '%'"),
    ("/latest/meta-data/instance-id?x=\\", "the query has '%5C'"),
    # Sensitive classes in another letter case: the service is case sensitive, the agent does not guess.
    ("/latest/meta-data/IAM/security-credentials/role", "credentials class in another letter case"),
    ("/latest/meta-data/iam/Security-Credentials/role", "credentials class in another letter case"),
    ("/latest/META-DATA/iam/security-credentials", "credentials class in another letter case"),
    ("/latest/meta-data/iam/security-credential%53/role", "credentials class in another letter case"),
    ("/latest/User-Data", "user-data class in another letter case"),
    ("/2021-03-23/meta-data/Identity-Credentials/ec2/info", "identity-credentials class in another letter case"),
    # Above the root, relative and absolute forms (the proxy hands normalize the origin form).
    ("/latest/../../etc/passwd", "above the root"),
    ("/..", "above the root"),
    ("/%2e%2e/latest", "above the root"),
    ("relative/path", "does not start with '/'"),
    ("", "does not start with '/'"),
    ("*", "does not start with '/'"),
    ("http://169.254.169.254/latest/meta-data/", "does not start with '/'"),
]


@pytest.mark.parametrize(("target", "words"), REFUSED)
def test_what_cannot_be_read_with_certainty_is_refused(target: str, words: str) -> None:
    with pytest.raises(PathError) as info:
        normalize(target)
    message = str(info.value)
    assert words in message
    # The message reaches 403 bodies and logs: no caller byte in it may end a line or hide in whitespace.
    assert message.isascii() and message.isprintable()
    assert "X-Forged" not in message and "\\" not in message


def test_a_refused_first_segment_is_shown_escaped_and_cut() -> None:
    with pytest.raises(PathError) as info:
        normalize("/" + "A;" * 100 + "/meta-data")
    assert "'A%3BA%3B" in str(info.value) and "..." in str(info.value) and len(str(info.value)) < 250


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


def test_patterns_lose_their_version() -> None:
    assert normalize_pattern("/2021-03-23/meta-data/placement/**") == "meta-data/placement/**"
    assert normalize_pattern("/latest/./meta-data/") == "meta-data"
    assert normalize_pattern("meta-data/*") == "meta-data/*"


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        ("//latest/meta-data/instance-id", "/latest/meta-data/instance-id"),
        ("/latest/meta-data/", "/latest/meta-data/"),
        ("/latest//meta-data//", "/latest/meta-data/"),
        ("/2021-03-23//meta-data/iam/./info?x=1", "/2021-03-23/meta-data/iam/info?x=1"),
        ("/latest/meta-data/%69nstance-id", "/latest/meta-data/instance-id"),
        ("/latest/%6deta-data/%2e/instance-id", "/latest/meta-data/instance-id"),
        ("/latest/meta-data/x/..", "/latest/meta-data"),
        ("/latest/meta-data/public-keys/0=demo", "/latest/meta-data/public-keys/0=demo"),
        ("/latest/meta-data/instance-id?", "/latest/meta-data/instance-id?"),
        ("/latest/meta-data/instance-id?a=%41&b=/?c", "/latest/meta-data/instance-id?a=%41&b=/?c"),
        ("/", "/"),
        ("/?x", "/?x"),
        ("/latest", "/latest"),
        ("/latest/", "/latest/"),
        ("/meta-data/instance-id", "/meta-data/instance-id"),
    ],
)
def test_canonical_target_is_what_the_policy_judged(raw: str, sent: str) -> None:
    assert normalize(raw).canonical_target() == sent


def test_the_query_is_kept_out_of_the_repr() -> None:
    assert "secret" not in repr(normalize("/latest/meta-data/instance-id?secret=1"))
