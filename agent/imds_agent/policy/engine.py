"""Decide one request: which rule is about this caller, does it grant this path, or what does the default say.

Pure: the executable's hash, when a rule pins one, is computed by the caller (identity/hashes.py). A token PUT is
always allowed: a token by itself reveals nothing, and every request made with it passes through here as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..identity.caller import Caller
from ..imds.protocol import TOKEN_RESOURCE
from .model import Policy, Rule
from .paths import MetadataPath, PathError, normalize

PATH_CHECK = "path check"


@dataclass(frozen=True)
class Decision:
    """The verdict on one request, with what decided it (a rule name and file:line, or the default)."""

    allow: bool
    decided_by: str
    reason: str
    inject: bool = True
    path: Optional[MetadataPath] = None


def _by_default(setting: str, path: MetadataPath, who: str) -> Decision:
    label = f"{who}: {setting}"
    if setting == "allow":
        return Decision(True, label, f"{who} allows everything", path=path)
    if setting == "allow-nonsensitive" and path.sensitive is None:
        return Decision(True, label, f"{who} allows non-sensitive paths", path=path)
    if setting == "allow-nonsensitive":
        return Decision(False, label, f"{path.sensitive} paths need a rule that grants them", path=path)
    return Decision(False, label, f"{who} denies callers no rule matches", path=path)


def decide(policy: Policy, caller: Caller, method: str, target: str, exe_sha256: Optional[str] = None) -> Decision:
    """The decision for ``caller`` asking ``method target`` under ``policy``; a target that cannot be classified
    with certainty is denied by the path check."""
    try:
        path = normalize(target)
    except PathError as exc:
        return Decision(False, PATH_CHECK, f"refused path: {exc}")
    return decide_path(policy, caller, method, path, exe_sha256)


def decide_path(
    policy: Policy, caller: Caller, method: str, path: MetadataPath, exe_sha256: Optional[str] = None
) -> Decision:
    """The decision for ``caller`` asking ``method`` of the classified ``path`` under ``policy``."""
    if method == "PUT" and path.path == TOKEN_RESOURCE:
        return Decision(True, "token request", "token requests are always allowed", path=path)
    if not caller.known:
        return _by_default(policy.unknown, path, "policy for unidentified callers")
    matching: list[Rule] = [r for r in policy.rules if r.matches_caller(caller, exe_sha256)]
    for rule in matching:
        if rule.grants(path):
            return Decision(True, f"{rule.name} ({rule.source})", "granted", rule.inject_token, path)
    if matching:
        first = matching[0]
        return Decision(False, f"{first.name} ({first.source})", first.refusal(path), path=path)
    return _by_default(policy.default, path, "default")
