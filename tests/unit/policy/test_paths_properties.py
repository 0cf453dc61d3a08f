"""Properties of the path classifier over spellings mutated from the sensitive paths.

A reference model reads a request target as a strict HTTP server such as the metadata service would: split the
query off at the first raw '?', percent-decode (strict UTF-8), collapse empty segments, resolve dot segments,
match the version exactly. Whatever the target, normalize() either refuses it, or the target it forwards is
byte for byte what the model makes of the original, the model reads the forwarded target back as the same path,
and a sensitive resource the model (or a case-insensitive server) would serve is classed as such.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote_to_bytes

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imds_agent.policy.paths import PathError, normalize

SENSITIVE = {
    "credentials": ("meta-data", "iam", "security-credentials"),
    "identity-credentials": ("meta-data", "identity-credentials"),
    "user-data": ("user-data",),
}
BASES = [
    "/latest/meta-data/iam/security-credentials/role",
    "/latest/meta-data/iam/security-credentials/",
    "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    "/latest/user-data",
    "/2021-03-23/meta-data/iam/security-credentials/role",
]
VERSIONS = ["latest", "LATEST", "Latest", "latest.", "%6catest", "%4Catest", "./latest", "1.0", "1.00",
            "2021-03-23", "2021-3-23", "2021-02-30", "2024-02-29", "", "x/../latest", "latest%3F", "lat%65st",
            "latest/latest"]  # fmt: skip
INSERTS = ["?", "#", "%3F", "%3f", "%23", "%2F", "%2f", "%5C", "%00", "%25", "%2e", "%2E%2E", "%ff", "%c0%af", "%",
           "%G1", "/", "//", "/./", "/../", "/x/../", "\\", " ", "\t", "\x85", "é", ";", "=", "~", ".", "..", "%20",
           "%0d%0a", "?a=%", "?a=b#c", "?/../"]  # fmt: skip
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")


# --- the reference model -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reading:
    """What a strict server makes of a target: the decoded segments, the trailing slash, the raw query."""

    segments: tuple[str, ...]
    directory: bool
    query: Optional[str]

    @property
    def target(self) -> str:
        """The target rebuilt from the decoded segments, without escaping anything again."""
        out = "/" + "/".join(self.segments) + ("/" if self.directory and self.segments else "")
        return out if self.query is None else f"{out}?{self.query}"

    def served_class(self, fold: bool = False) -> Optional[str]:
        """The sensitive class of the resource served, exact-case (or, with ``fold``, by a server that ignores
        letter case); None when it serves nothing sensitive (no version: 404)."""
        segments = tuple(s.lower() for s in self.segments) if fold else self.segments
        if not segments or not model_version(segments[0]):
            return None
        rest = segments[1:]
        for name, prefix in SENSITIVE.items():
            if rest[: len(prefix)] == prefix:
                return name
        return None


def model_version(segment: str) -> bool:
    if segment in ("latest", "1.0"):
        return True
    match = _DATE.fullmatch(segment)
    if match is None:
        return False
    try:
        datetime.date(*(int(g) for g in match.groups()))
    except ValueError:
        return False
    return True


def model_read(target: str) -> Optional[Reading]:
    """A strict server's reading of an origin-form target, or None where it answers 400 (no resource)."""
    if not target.startswith("/") or "#" in target:
        return None
    if any(not (0x21 <= ord(c) < 0x7F) for c in target):
        return None
    raw, sep, query = target.partition("?")
    if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
        return None
    try:
        decoded = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                return None
            segments.pop()
            continue
        segments.append(segment)
    return Reading(tuple(segments), raw.endswith("/"), query if sep else None)


# --- generating spellings ------------------------------------------------------------------------------------
def _escape(char: str, upper: bool) -> str:
    return "".join(f"%{b:02X}" if upper else f"%{b:02x}" for b in char.encode("utf-8"))


@st.composite
def mutated_targets(draw: st.DrawFn) -> str:
    target = draw(st.sampled_from(BASES))
    if draw(st.booleans()):
        rest = target.split("/", 2)[2]
        target = "/" + draw(st.sampled_from(VERSIONS)) + "/" + rest
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["case", "escape", "insert", "double", "dot"]))
        i = draw(st.integers(0, len(target)))
        if kind == "case" and i < len(target):
            target = target[:i] + target[i].swapcase() + target[i + 1 :]
        elif kind == "escape" and i < len(target):
            target = target[:i] + _escape(target[i], draw(st.booleans())) + target[i + 1 :]
        elif kind == "insert":
            target = target[:i] + draw(st.sampled_from(INSERTS)) + target[i:]
        elif kind == "double":
            target = target.replace("/", "//", 1) if draw(st.booleans()) else target + "/"
        elif kind == "dot":
            slashes = [j for j, c in enumerate(target) if c == "/"]
            if slashes:  # an earlier escape may have taken the only one
                j = draw(st.sampled_from(slashes))
                target = target[:j] + draw(st.sampled_from(["/.", "/%2e", "/meta-data/..", "/x/%2E%2E"])) + target[j:]
    if draw(st.integers(0, 9)) == 0:
        target = "http://169.254.169.254" + target
    return target


# --- the properties ------------------------------------------------------------------------------------------
def check(target: str) -> None:
    try:
        judged = normalize(target)
    except PathError:
        return  # a refusal is always safe; anything but PathError fails the test
    sent = judged.canonical_target()
    model = model_read(target)
    assert model is not None, f"accepted {target!r}, which a strict server cannot read"
    assert sent == model.target, f"{target!r}: forwards {sent!r}, the model reads {model.target!r}"
    again = model_read(sent)
    assert again is not None and again.target == sent, f"{target!r}: {sent!r} reads differently upstream"
    assert list(again.segments) == [s for s in (judged.version, *judged.path.split("/")) if s]
    for fold in (False, True):
        served = again.served_class(fold)
        if served is not None:
            assert judged.sensitive == served, f"{target!r}: serves {served}, classed {judged.sensitive}"


@settings(
    max_examples=500, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(mutated_targets())
@example("/latest/meta-data/iam/security-credentials%3F/role")
@example("/latest/meta-data/iam/security-credentials/role%23")
@example("/LATEST/meta-data/iam/security-credentials/role")
@example("/latest/meta-data/IAM/security-credentials/role")
@example("/latest/meta-data/%ff")
def test_what_is_forwarded_is_what_was_judged(target: str) -> None:
    check(target)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.lists(st.sampled_from([*"/.%?#aA0fF2Ee-_", "latest", "meta-data", "user-data", "iam"]), max_size=20))
def test_arbitrary_short_targets(pieces: list[str]) -> None:
    check("/" + "".join(pieces))


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.text(max_size=30))
def test_normalize_raises_only_path_errors(text: str) -> None:
    check(text)
