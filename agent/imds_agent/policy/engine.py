"""Decide one request: which rule is about this caller, does it grant this path, or what does the default say.

Pure apart from hashing executables, which happens only when some rule matches on sha256. A token PUT is always
allowed: a token by itself reveals nothing, and every request made with it passes through here as well.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from ..identity.caller import Caller
from .model import Policy, Rule
from .paths import MetadataPath, PathError, normalize

TOKEN_PATH = "api/token"


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
    """The decision for ``caller`` asking ``method target`` under ``policy``."""
    try:
        path = normalize(target)
    except PathError as exc:
        return Decision(False, "path check", f"refused path: {exc}")
    if method == "PUT" and path.path == TOKEN_PATH:
        return Decision(True, "token request", "token requests are always allowed", path=path)
    if not caller.known:
        return _by_default(policy.unknown, path, "policy for unidentified callers")
    matching: list[Rule] = [r for r in policy.rules if r.matches_caller(caller, exe_sha256)]
    for rule in matching:
        if rule.grants(path):
            return Decision(True, f"{rule.name} ({rule.source})", "granted", rule.inject_token, path)
    if matching:
        first = matching[0]
        what = f"the {path.sensitive} class" if path.sensitive else "this path"
        return Decision(False, f"{first.name} ({first.source})", f"the rule does not grant {what}", path=path)
    return _by_default(policy.default, path, "default")


class ExeHasher:
    """sha256 of executables, cached by file identity (device, inode, size, mtime) so each is read once."""

    def __init__(self, capacity: int = 256):
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
        self.capacity = capacity

    def of_pid(self, pid: int) -> Optional[str]:
        """The hash of the file ``pid`` is running (through /proc, so a replaced file is not mistaken for it)."""
        path = f"/proc/{pid}/exe"
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            with self._lock:
                cached = self._cache.get(key)
            if cached is not None:
                return cached
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError:
            return None
        value = digest.hexdigest()
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return value
