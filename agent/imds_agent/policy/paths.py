"""Metadata paths as the policy sees them: normalized, version prefix removed, sensitive class named.

Real clients send the same resource many ways: /latest/meta-data/iam/security-credentials/role,
/2021-03-23/meta-data/iam/security-credentials/role (cloud-init pins a version), a missing or doubled slash,
percent-encoding, dot segments. The policy must see one spelling, or a deny on one is an allow on another. What
cannot be normalized safely (a '..' above the root, an encoded slash or NUL, a backslash) is refused outright.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote

# The sensitive classes: never granted by a wildcard, only by naming the class in a rule's `sensitive:` list.
SENSITIVE_CLASSES = {
    "credentials": "meta-data/iam/security-credentials",
    "identity-credentials": "meta-data/identity-credentials",
    "user-data": "user-data",
}
_VERSION = re.compile(r"^(latest|1\.0|\d{4}-\d{2}-\d{2})$")


class PathError(ValueError):
    """A request path that cannot be normalized safely."""


@dataclass(frozen=True)
class MetadataPath:
    """A normalized request path: ``path`` has no version, no leading or trailing slash ('' is the root)."""

    version: Optional[str]
    path: str
    sensitive: Optional[str]  # the sensitive class, or None

    def canonical_target(self, raw: str) -> str:
        """The request target to send upstream: this normalized path, with the raw target's trailing slash and
        query kept. Forwarding what the policy judged (not the raw spelling) leaves no room for the policy and
        the metadata service to read one request two ways, and spares strict servers odd spellings
        ('//latest/...', as the AWS SDK for JavaScript sends)."""
        path_part, sep, query = raw.partition("?")
        parts = [p for p in (self.version, self.path) if p]
        target = "/" + "/".join(parts)
        if path_part.endswith("/") and parts:
            target += "/"
        return target + (sep + query if sep else "")

    @property
    def display(self) -> str:
        """The path as logs and reports show it: '/<version>/<path>'."""
        return f"/{self.version or '?'}/{self.path}" if self.path else f"/{self.version or ''}"


def sensitive_class(path: str) -> Optional[str]:
    """The sensitive class ``path`` (normalized, versionless) belongs to, or None."""
    for name, prefix in SENSITIVE_CLASSES.items():
        if path == prefix or path.startswith(prefix + "/"):
            return name
    return None


def normalize(target: str) -> MetadataPath:
    """Normalize a request target (origin form, may carry a query); raise PathError if it is unsafe."""
    raw = target.split("#", 1)[0].split("?", 1)[0]
    if not raw.startswith("/"):
        raise PathError("the path does not start with '/'")
    lowered = raw.lower()
    if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
        raise PathError("the path contains an encoded slash, backslash or NUL")
    decoded = unquote(raw, errors="strict")
    if "\\" in decoded or "\x00" in decoded or "%" in decoded:
        raise PathError("the path contains a backslash, NUL or double encoding")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                raise PathError("the path climbs above the root")
            segments.pop()
            continue
        segments.append(segment)
    version: Optional[str] = None
    if segments and _VERSION.match(segments[0]):
        version = segments.pop(0)
    path = "/".join(segments)
    return MetadataPath(version, path, sensitive_class(path))


def compile_glob(pattern: str) -> re.Pattern[str]:
    """A path glob as a regex: '*' within one segment, '**' across segments, '?' one character.

    A trailing '/**' also matches the directory itself ('meta-data/**' covers the 'meta-data' listing).
    """
    tail = ""
    if pattern.endswith("/**"):
        pattern, tail = pattern[:-3], "(?:/.*)?"
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("^" + "".join(out) + tail + "$")


def normalize_pattern(pattern: str) -> str:
    """A grant pattern in the normalized form (no version, no leading or trailing slash)."""
    segments = [s for s in pattern.split("/") if s not in ("", ".")]
    if segments and _VERSION.match(segments[0]):
        segments.pop(0)
    return "/".join(segments)
