"""Metadata paths as the policy sees them: normalized, version prefix removed, sensitive class named.

Real clients send the same resource many ways: /latest/meta-data/iam/security-credentials/role,
/2021-03-23/meta-data/iam/security-credentials/role (cloud-init pins a version), a missing or doubled slash,
percent-encoding, dot segments. The policy must see one spelling, or a deny on one is an allow on another.

The classifier is closed: the agent forwards only the path it judged, rebuilt from its segments, and refuses
whatever it cannot read with certainty instead of calling it non-sensitive. A first segment that is not a version
the metadata service serves (or a resource name, for a path without one), an escape that decodes to a delimiter,
control byte, '%' or non-ASCII byte, a character that must be escaped, a fragment, a '..' above the root, and a
sensitive class spelled in another letter case are all refused with PathError. Once the escapes of ordinary
characters are decoded, every segment holds only characters that stand for themselves in a path, so the target
sent upstream means to the metadata service exactly what the policy judged.
"""

from __future__ import annotations

import datetime
import re
import string
from dataclasses import dataclass, field
from typing import Optional

# The sensitive classes: never granted by a wildcard, only by naming the class in a rule's `sensitive:` list.
SENSITIVE_CLASSES = {
    "credentials": "meta-data/iam/security-credentials",
    "identity-credentials": "meta-data/identity-credentials",
    "user-data": "user-data",
}
# What may follow the root when a client names no version (the entries of a version's listing, and the token).
RESOURCES = ("meta-data", "user-data", "dynamic", "api")
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_HEX = frozenset(string.hexdigits)
# RFC 3986 pchar without '%': the characters that mean themselves inside a path segment, raw or decoded.
SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@")
_QUERY_CHARS = SEGMENT_CHARS | frozenset("/?%")
_SHOWN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~/")


class PathError(ValueError):
    """A request path that cannot be normalized safely; the message never holds a raw caller byte."""


@dataclass(frozen=True)
class MetadataPath:
    """A normalized request path: ``path`` has no version, no leading or trailing slash ('' is the root).

    ``query`` (the raw query, validated, without its '?') and ``directory`` (the target ended in '/') are what
    the target sent upstream keeps of the client's spelling; the query is never shown (it may carry anything).
    """

    version: Optional[str]
    path: str
    sensitive: Optional[str]  # the sensitive class, or None
    query: Optional[str] = field(default=None, repr=False)
    directory: bool = False

    def canonical_target(self) -> str:
        """The request target to send upstream: the normalized path, the trailing slash and the validated query.

        Built from what normalize() judged, never from the raw spelling, so the policy and the metadata service
        cannot read one request two ways, and strict servers are spared odd spellings ('//latest/...', as the AWS
        SDK for JavaScript sends)."""
        parts = [p for p in (self.version, self.path) if p]
        target = "/" + "/".join(parts)
        if self.directory and parts:
            target += "/"
        return target if self.query is None else f"{target}?{self.query}"

    @property
    def display(self) -> str:
        """The path as logs and reports show it: '/<version>/<path>'."""
        return f"/{self.version or '?'}/{self.path}" if self.path else f"/{self.version or ''}"


def is_version(segment: str) -> bool:
    """Whether ``segment`` is a version the metadata service serves: 'latest', '1.0' or a real YYYY-MM-DD date,
    spelled exactly (the service is case sensitive, and 2021-3-23 or 2021-02-30 are no versions)."""
    if segment in ("latest", "1.0"):
        return True
    match = _DATE.fullmatch(segment)
    if match is None:
        return False
    try:
        datetime.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return False
    return True


def sensitive_class(path: str) -> Optional[str]:
    """The sensitive class ``path`` (normalized, versionless) belongs to, or None."""
    for name, prefix in SENSITIVE_CLASSES.items():
        if path == prefix or path.startswith(prefix + "/"):
            return name
    return None


def shown(text: str, limit: int = 40, quoted: bool = True) -> str:
    """``text`` fit for an error message or a record: every character but letters, digits and -._~/
    percent-encoded (so no caller byte can end a log line or fake a field), cut at ``limit`` characters."""
    out = "".join(c if c in _SHOWN_CHARS else _escaped(c) for c in text)
    out = out if len(out) <= limit else out[:limit] + "..."
    return f"'{out}'" if quoted else out


def _escaped(char: str) -> str:
    # The agent reads request targets as latin-1, so a character below 256 is the byte the caller sent.
    if ord(char) < 0x100:
        return f"%{ord(char):02X}"
    return "".join(f"%{b:02X}" for b in char.encode("utf-8", "backslashreplace"))


def _decode_segment(raw: str) -> str:
    """One raw segment with its escapes decoded; refuse a character that must be escaped, a malformed escape,
    and an escape of anything but an ordinary segment character."""
    out = []
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "%":
            escape = raw[i + 1 : i + 3]
            if len(escape) != 2 or not set(escape) <= _HEX:
                raise PathError("the path has a '%' that does not start a two-digit hex escape")
            char = chr(int(escape, 16))
            if char not in SEGMENT_CHARS:
                raise PathError(
                    f"the path has %{escape.upper()}, an escaped delimiter, control, '%' or non-ASCII byte; only "
                    "letters, digits and -._~!$&'()*+,;=:@ may be escaped"
                )
            i += 3
        elif char in SEGMENT_CHARS:
            i += 1
        else:
            raise PathError(f"the path has {shown(char)}, which a request target must not carry unescaped")
        out.append(char)
    return "".join(out)


def _check_query(query: str) -> None:
    for i, char in enumerate(query):
        if char not in _QUERY_CHARS:
            raise PathError(f"the query has {shown(char)}, which a request target must not carry unescaped")
        if char == "%" and not (len(query) >= i + 3 and set(query[i + 1 : i + 3]) <= _HEX):
            raise PathError("the query has a '%' that does not start a two-digit hex escape")


def _segments(raw_path: str) -> list[str]:
    """The decoded segments of a raw path with empty and dot segments resolved."""
    segments: list[str] = []
    for raw in raw_path.split("/"):
        segment = _decode_segment(raw)
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise PathError("the path climbs above the root")
            segments.pop()
            continue
        segments.append(segment)
    return segments


def _split_version(segments: list[str]) -> tuple[Optional[str], list[str]]:
    if not segments:
        return None, segments
    first = segments[0]
    if not is_version(first):
        if first in RESOURCES:
            return None, segments
        raise PathError(
            f"the first segment {shown(first)} is not a version the metadata service serves (latest, 1.0 or a "
            f"YYYY-MM-DD date, spelled exactly) nor one of {', '.join(RESOURCES)}"
        )
    if len(segments) > 1 and is_version(segments[1].lower()):
        raise PathError("the path names two versions")
    return first, segments[1:]


def normalize(target: str) -> MetadataPath:
    """Normalize a request target (origin form, may carry a query); raise PathError if it cannot be read with
    certainty. Never raises anything else, whatever the target holds."""
    if "#" in target:
        raise PathError("the request target has a fragment ('#'), which HTTP requests never carry")
    raw_path, sep, query = target.partition("?")
    if not raw_path.startswith("/"):
        raise PathError("the path does not start with '/'")
    if sep:
        _check_query(query)
    version, segments = _split_version(_segments(raw_path))
    path = "/".join(segments)
    sensitive = sensitive_class(path)
    folded = sensitive_class(path.lower())
    if folded is not None and folded != sensitive:
        # The service is case sensitive, so this is not the class's resource. Classing it as the class would keep
        # it from the callers denied the class as well; refusing is safer still: the agent then never forwards a
        # path whose meaning hangs on how the service treats letter case, and no client spells one this way.
        raise PathError(f"the path spells the {folded} class in another letter case")
    return MetadataPath(version, path, sensitive, query if sep else None, raw_path.endswith("/"))


def compile_glob(pattern: str, separators: str = "/", directories: bool = True) -> re.Pattern[str]:
    """A path glob as a regex: '*' within one segment, '**' across segments, '?' one character of a segment;
    segments end at any of ``separators``.

    With ``directories``, a trailing '/**' also matches the directory itself ('meta-data/**' covers the
    'meta-data' listing).
    """
    tail = ""
    if directories and pattern.endswith("/**"):
        pattern, tail = pattern[:-3], "(?:/.*)?"
    segment = "[^" + re.escape(separators) + "]"
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(segment + "*")
            i += 1
        elif pattern[i] == "?":
            out.append(segment)
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("^" + "".join(out) + tail + "$")


def normalize_pattern(pattern: str) -> str:
    """A grant pattern in the normalized form (no version, no leading or trailing slash)."""
    segments = [s for s in pattern.split("/") if s not in ("", ".")]
    if segments and is_version(segments[0]):
        segments.pop(0)
    return "/".join(segments)
