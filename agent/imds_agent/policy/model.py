"""Policy rules as frozen values: who a rule matches (exe, uid/user, cmdline, exe hash, container) and what it
grants.

A rule's ``paths`` select what it grants (default: everything); a path in a sensitive class (role credentials,
identity credentials, user data) is granted only when the rule also names that class in ``sensitive``, so a
wildcard can never hand out credentials by accident.

A rule with a ``workload`` (the `container:` and `pod:` keys) is about processes in containers only: the caller's
container must match every field it gives, and its ``exe`` patterns are paths inside the container's image, so the
host-file check (``exe_verified``) does not apply. A field the runtime did not supply (an empty image, a missing
label) never matches, whatever the pattern: ``team: "*"`` needs a label ``team``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Optional

from ..identity.caller import Caller, ContainerInfo
from .paths import SENSITIVE_CLASSES, MetadataPath, compile_glob, normalize_pattern

#: What `policy.default` (callers no rule matches) and `policy.unknown` (unidentified callers) may say.
DEFAULTS = ("deny", "allow-nonsensitive", "allow")
DEFAULT_SETTING = "allow-nonsensitive"
UNKNOWN_SETTING = "deny"
#: The exe of a container rule that names none: any executable in the container.
ANY_EXE = ("**",)


def value_glob(pattern: str) -> re.Pattern[str]:
    """A glob over a name or label value: '*' any characters but a newline, '?' one; nothing else is special (no
    character classes)."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))


def image_glob(pattern: str) -> re.Pattern[str]:
    """A glob over an image reference: '*' within one component (it stops at '/', ':' and '@', so it never
    spans a registry, a tag or a digest), '?' one character of one, '**' anything."""
    return compile_glob(pattern, separators="/:@", directories=False)


@dataclass(frozen=True)
class WorkloadPattern:
    """What a rule's `container:` and `pod:` keys ask of the caller's container; None (or no labels) asks nothing.

    ``image`` is matched against the image's full reference (docker.io/library/nginx:1.25) with ``image_glob``,
    so that '*' can never stand for another registry, a tag for a digest or the other way round; the other
    fields are globs over the whole value (``value_glob``).
    """

    image: Optional[str] = None
    name: Optional[str] = None
    runtime: Optional[str] = None
    labels: tuple[tuple[str, str], ...] = ()
    pod_namespace: Optional[str] = None
    pod_name: Optional[str] = None
    service_account: Optional[str] = None
    _res: tuple[tuple[str, re.Pattern[str]], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        compiled = [("image", image_glob(self.image))] if self.image is not None else []
        for key in ("name", "runtime", "pod_namespace", "pod_name", "service_account"):
            pattern = getattr(self, key)
            if pattern is not None:
                compiled.append((key, value_glob(pattern)))
        compiled.extend((f"label {k}", value_glob(v)) for k, v in self.labels)
        object.__setattr__(self, "_res", tuple(compiled))

    def describe(self) -> str:
        """The pattern as an operator wrote it, for check-config and explain."""
        parts = [f"{k.replace('_', ' ')} {getattr(self, k)}" for k in ("image", "name", "runtime")
                 if getattr(self, k) is not None]  # fmt: skip
        parts += [f"label {k}={v}" for k, v in self.labels]
        pod = (("namespace", self.pod_namespace), ("name", self.pod_name), ("service account", self.service_account))
        parts += [f"pod {k} {v}" for k, v in pod if v is not None]
        return ", ".join(parts)

    def mismatch(self, info: ContainerInfo) -> Optional[str]:
        """The first field ``info`` does not match (missing counts as not matching), or None when all match."""
        for key, regex in self._res:
            if key.startswith("label "):
                value = info.label(key[6:])
            else:
                value = getattr(info, key) or None
                if key == "runtime" and value == "unknown":
                    value = None
            if value is None or not regex.fullmatch(value):
                return key
        return None


@dataclass(frozen=True)
class Rule:
    """One allowlist entry; ``source`` is 'file:line' for messages and the audit record."""

    name: str
    exe: tuple[str, ...]
    source: str = ""
    uids: tuple[int, ...] = ()
    users: tuple[str, ...] = ()
    cmdline: Optional[str] = None
    sha256: tuple[str, ...] = ()
    paths: tuple[str, ...] = ("**",)
    sensitive: tuple[str, ...] = ()
    inject_token: bool = True
    in_containers: bool = False  # exe paths may be inside containers' images, not the host's files
    refuse_preload: bool = False  # callers started with LD_PRELOAD or LD_AUDIT do not match
    workload: Optional[WorkloadPattern] = None  # container and pod fields: then only callers in such a container
    _exe_res: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)
    _path_res: tuple[re.Pattern[str], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        for cls in self.sensitive:
            if cls not in SENSITIVE_CLASSES:
                raise ValueError(f"unknown sensitive class {cls!r} (choose from {', '.join(SENSITIVE_CLASSES)})")
        object.__setattr__(self, "_exe_res", tuple(compile_glob(p) for p in self.exe))
        object.__setattr__(self, "_path_res", tuple(compile_glob(normalize_pattern(p)) for p in self.paths))

    def matches_caller(self, caller: Caller, exe_sha256: Optional[str] = None) -> bool:
        """Whether this rule is about ``caller`` (never true for an unknown caller)."""
        if not caller.known or caller.exe is None:
            return False
        # fullmatch: '$' alone would also accept the path followed by a newline.
        if not any(r.fullmatch(caller.exe) for r in self._exe_res):
            return False
        if self.workload is not None:
            # The rule is about an image, so the path inside it is what it names; the host's file of that name
            # is beside the point.
            if caller.workload is None or self.workload.mismatch(caller.workload) is not None:
                return False
        elif not caller.exe_verified and not self.in_containers:
            # The name matches but the file is not the host's file of that name: an impostor until a rule
            # says paths inside containers are meant.
            return False
        if self.uids and caller.uid not in self.uids:
            return False
        if self.users and caller.user not in self.users:
            return False
        if self.cmdline is not None and not fnmatch.fnmatchcase(" ".join(caller.cmdline), self.cmdline):
            return False
        if self.refuse_preload and caller.preload:
            return False
        return not self.sha256 or (exe_sha256 is not None and exe_sha256 in self.sha256)

    def unreachable_classes(self) -> tuple[str, ...]:
        """The sensitive classes this rule names that none of its path patterns can ever match (a rule with
        `paths: ["*"]` naming credentials grants nothing of it: '*' stays within one segment)."""
        out = []
        for cls in self.sensitive:
            prefix = SENSITIVE_CLASSES[cls]
            samples = (prefix, f"{prefix}/x", f"{prefix}/x/y")
            if not any(r.match(s) for r in self._path_res for s in samples):
                out.append(cls)
        return tuple(out)

    def refusal(self, path: MetadataPath) -> str:
        """Why this rule does not grant ``path``, in the words an operator needs to fix it."""
        if path.sensitive is not None and path.sensitive not in self.sensitive:
            return f"the rule does not name the {path.sensitive} class in sensitive: (a path pattern never grants it)"
        tried = ", ".join(repr(p) for p in self.paths)
        return (f"none of the rule's paths ({tried}) matches {path.path or '/'} "
                "('*' matches within one segment, '**' across segments)")  # fmt: skip

    def grants(self, path: MetadataPath) -> bool:
        """Whether this rule grants ``path`` (sensitive classes only when named)."""
        if path.sensitive is not None and path.sensitive not in self.sensitive:
            return False
        return any(r.match(path.path) for r in self._path_res)


@dataclass(frozen=True)
class Policy:
    """The rules from every policy file, in order, with what happens to callers no rule matches."""

    rules: tuple[Rule, ...] = ()
    default: str = DEFAULT_SETTING
    unknown: str = UNKNOWN_SETTING
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in ("default", "unknown"):
            if getattr(self, key) not in DEFAULTS:
                raise ValueError(f"{key} must be one of {', '.join(DEFAULTS)}")

    @property
    def needs_hash(self) -> bool:
        """Whether any rule matches on the executable's sha256 (only then is it computed)."""
        return any(r.sha256 for r in self.rules)
