"""Reading the inventory back: a report per caller, and a policy that allows exactly what audit saw.

The suggested policy is for review before enforcing: one rule per (executable, uid), granting the path classes
that caller used, naming the sensitive classes it read; for callers in containers whose image is known, one rule
per image (and pod namespace) instead, with `container:` (and `pod:`) and the executables seen inside. Unidentified
callers and invalid paths are left out: the former can never be matched by a rule, the latter should not be
allowed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from ..identity.caller import printable
from ..policy.loader import is_full_reference
from ..policy.paths import SENSITIVE_CLASSES
from .inventory import MAX_ENTRIES, OVERFLOW_EXE, UNKNOWN_EXE, Entry

# How a report names an executable whose path did not lead to the host's file (a container's, a replaced one).
NOT_HOST_FILE = "[not the host's file]"


@dataclass
class CallerRow:
    """One line of `imds-agent report`."""

    exe: str
    uid: Optional[int]
    user: Optional[str]
    requests: int = 0
    imdsv1: int = 0
    would_deny: int = 0
    denied: int = 0
    sensitive: set[str] = field(default_factory=set)
    last_seen: float = 0.0
    exe_verified: bool = True
    image: str = ""
    container: str = ""
    pod_namespace: str = ""
    service_account: str = ""

    @property
    def in_container(self) -> bool:
        """Whether the row is of a caller in a container the agent described."""
        return bool(self.image or self.container or self.pod_namespace)

    def container_text(self) -> str:
        """The container, for the table: image, [name], pod namespace and service account; escaped."""
        text = self.image or "?"
        if self.container:
            text += f" [{self.container}]"
        if self.pod_namespace:
            text += f" ns {self.pod_namespace}"
        if self.service_account:
            text += f" sa {self.service_account}"
        return printable(text, 160)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (sorted sensitive classes, ISO time)."""
        out = dict(vars(self))
        out["sensitive"] = sorted(self.sensitive)
        out["last_seen"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_seen))
        return out


def report(entries: Iterable[Entry], since: Optional[float] = None) -> list[CallerRow]:
    """One row per (exe, uid, container), busiest first; ``since`` keeps entries last seen at or after that time."""
    rows: dict[tuple[str, Optional[int], bool, str, str, str, str], CallerRow] = {}
    for e in entries:
        if since is not None and e.last_seen < since:
            continue
        where = (e.image, e.container, e.pod_namespace, e.service_account)
        row = rows.setdefault((e.exe, e.uid, e.exe_verified, *where),
                              CallerRow(e.exe, e.uid, e.user, exe_verified=e.exe_verified, image=e.image,
                                        container=e.container, pod_namespace=e.pod_namespace,
                                        service_account=e.service_account))  # fmt: skip
        row.requests += e.count
        if e.imds == "v1":
            row.imdsv1 += e.count
        if e.decision == "would-deny":
            row.would_deny += e.count
        elif e.decision == "deny":
            row.denied += e.count
        if e.path_class in SENSITIVE_CLASSES:
            row.sensitive.add(e.path_class)
        row.last_seen = max(row.last_seen, e.last_seen)
    return sorted(rows.values(), key=lambda r: (-r.requests, r.exe, r.uid if r.uid is not None else -1))


def render_table(rows: list[CallerRow]) -> str:
    """The human report; a CONTAINER column when any caller ran in a container (its exe is the path inside)."""
    names = [printable(r.exe if r.exe_verified or r.in_container else f"{r.exe} {NOT_HOST_FILE}", 1024) for r in rows]
    width = max([len("EXECUTABLE")] + [len(n) for n in names])
    sensitive = [",".join(sorted(r.sensitive)) or "-" for r in rows]
    swidth = max([len("SENSITIVE")] + [len(s) for s in sensitive])
    containers = any(r.in_container for r in rows)
    head = f"{'EXECUTABLE':<{width}} {'USER':<12} {'REQUESTS':>8} {'IMDSv1':>7} {'WOULD-DENY':>10} {'DENIED':>7}"
    lines = [
        f"{head}  {'SENSITIVE':<{swidth}}  " + ("LAST SEEN (UTC)   CONTAINER" if containers else "LAST SEEN (UTC)")
    ]
    for r, name, sens in zip(rows, names, sensitive):
        user = r.user or (str(r.uid) if r.uid is not None else "?")
        line = (
            f"{name:<{width}} {user:<12} {r.requests:>8} {r.imdsv1:>7} {r.would_deny:>10} {r.denied:>7}"
            f"  {sens:<{swidth}}  {time.strftime('%Y-%m-%d %H:%M', time.gmtime(r.last_seen))}"
        )
        if containers:
            line += f"  {r.container_text() if r.in_container else '-'}"
        lines.append(line)
    if not rows:
        lines.append("(no requests recorded yet)")
    return "\n".join(lines)


def bound_note(evicted: int, overflowed: int) -> str:
    """What the report says when the inventory reached its bound: it is incomplete, and how."""
    parts = []
    if evicted:
        parts.append(f"{evicted} entries of allowed or refused requests were dropped to make room")
    if overflowed:
        parts.append(f"{overflowed} denials were counted under {OVERFLOW_EXE}")
    return f"note: the inventory reached its bound of {MAX_ENTRIES} entries: {'; '.join(parts)}"


def _grant(g: dict[str, Any], path_class: str) -> None:
    """Add what one path class needs to a rule's paths and sensitive classes."""
    if path_class in SENSITIVE_CLASSES:
        g["sensitive"].add(path_class)
        g["paths"].add(SENSITIVE_CLASSES[path_class] + "/**")
    elif path_class == "/" or "/" not in path_class:
        g["paths"].add(path_class)  # a one-segment class is exactly that path (a listing, or the root)
    else:
        g["paths"].add(path_class + "/**")


def _grants(g: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"paths": sorted(g["paths"])}
    if g["sensitive"]:
        out["sensitive"] = sorted(g["sensitive"])
    return out


def suggest(entries: Iterable[Entry]) -> str:
    """A policy.d file (YAML text) allowing exactly the (exe, uid, path class) combinations audit recorded; for a
    caller in a container whose image is known, the (image, pod namespace, service account, path class) ones, with
    the executables seen inside it.

    A class is the first two path segments ('meta-data/placement' covers placement/region and placement/...),
    so a rule grants what was seen at that granularity; sensitive classes are granted by name.
    """
    hosts: dict[tuple[str, Optional[int], bool], dict[str, Any]] = {}
    images: dict[tuple[str, str, str], dict[str, Any]] = {}
    for e in entries:
        if e.exe in (UNKNOWN_EXE, OVERFLOW_EXE) or e.path_class.startswith("("):
            continue
        if e.image and is_full_reference(e.image):  # not an image id: a rule can name it
            g = images.setdefault((e.image, e.pod_namespace, e.service_account),
                                  {"paths": set(), "sensitive": set(), "exes": set()})  # fmt: skip
            g["exes"].add(e.exe)
        else:
            g = hosts.setdefault((e.exe, e.uid, e.exe_verified), {"paths": set(), "sensitive": set(), "user": e.user})
        _grant(g, e.path_class)
    rules = []

    def order(item: tuple[tuple[str, Optional[int], bool], Any]) -> tuple[str, int, bool]:
        exe, uid, verified = item[0]
        return exe, uid if uid is not None else -1, not verified

    for (exe, uid, verified), g in sorted(hosts.items(), key=order):
        where = "" if verified else f" {NOT_HOST_FILE}"
        rule: dict[str, Any] = {"name": f"seen: {exe} as {g['user'] or uid}{where}", "exe": exe}
        if uid is not None:
            rule["uid"] = uid
        if not verified:
            rule["in_containers"] = True
        rules.append({**rule, **_grants(g)})
    for (image, namespace, account), g in sorted(images.items()):
        rule = {"name": f"seen: image {image}" + (f" in namespace {namespace}" if namespace else ""),
                "container": {"image": image}}  # fmt: skip
        pod = {k: v for k, v in (("namespace", namespace), ("service_account", account)) if v}
        if pod:
            rule["pod"] = pod
        exes = sorted(g["exes"])
        rule["exe"] = exes[0] if len(exes) == 1 else exes  # paths inside the image
        rules.append({**rule, **_grants(g)})
    header = (
        "# Suggested by `imds-agent suggest` from what audit mode recorded.\n"
        "# Review every rule before enforcing: it allows exactly what was seen, no more.\n"
    )
    return header + yaml.safe_dump({"rules": rules}, sort_keys=False, default_flow_style=False)
