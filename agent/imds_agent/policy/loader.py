"""policy.d/*.yaml -> Policy. Files are read in sorted order; every error names the file, the line and the key.

A policy file:

    rules:
      - name: amazon-ssm-agent
        exe: [/usr/bin/amazon-ssm-agent, /snap/amazon-ssm-agent/*/amazon-ssm-agent]
        uid: 0                       # optional: int or list; or `user:` name or list
        cmdline: "*--flag*"          # optional glob over the space-joined command line
        sha256: <hex>                # optional: one or a list
        paths: ["meta-data/**"]      # what it may read (default: everything but the sensitive classes)
        sensitive: [credentials]     # credentials | identity-credentials | user-data | all
        inject_token: true           # false: the caller must speak IMDSv2 itself
        in_containers: false         # true: exe paths are inside containers' images (not the host's files)
      - name: billing-web
        container: {image: "registry.example.com/billing/*:*", name: "web-*", labels: {team: billing}}
        pod: {namespace: payments, name: "exporter-*"}   # either or both; exe is then optional (any executable)

Loading never half-succeeds: the whole directory parses or nothing changes (the caller keeps the old policy).
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from .. import yamlsrc
from ..errors import ConfigError
from ..identity.containers import RUNTIMES
from .model import ANY_EXE, DEFAULT_SETTING, UNKNOWN_SETTING, Policy, Rule, WorkloadPattern
from .paths import SENSITIVE_CLASSES

RULE_KEYS = {"name", "exe", "uid", "user", "cmdline", "sha256", "paths", "sensitive", "inject_token", "in_containers",
             "refuse_preload", "container", "pod"}  # fmt: skip
CONTAINER_KEYS = ("image", "name", "labels", "runtime")
POD_KEYS = ("namespace", "name", "service_account")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_GLOB = re.compile(r"[*?]")


def policy_files(directory: str) -> list[str]:
    """The policy files in ``directory``, sorted; a missing directory has none."""
    if not os.path.isdir(directory):
        return []
    found = glob.glob(os.path.join(glob.escape(directory), "*.yaml")) + glob.glob(
        os.path.join(glob.escape(directory), "*.yml")
    )
    return sorted(found, key=os.path.basename)


def load_policy(directory: str, default: str = DEFAULT_SETTING, unknown: str = UNKNOWN_SETTING) -> Policy:
    """Load every policy file in ``directory``; raise ConfigError naming file, line and key on the first error."""
    rules: list[Rule] = []
    files = policy_files(directory)
    for path in files:
        rules.extend(load_file(path))
    return Policy(tuple(rules), default, unknown, tuple(files))


def load_file(path: str) -> list[Rule]:
    """The rules of one policy file."""
    doc = yamlsrc.load(path)
    if doc.data is None:
        return []
    if not isinstance(doc.data, dict):
        raise doc.error((), "a policy file must be a mapping with a 'rules' list")
    for key in doc.data:
        if key != "rules":
            raise doc.error((key,), "unknown key (a policy file has only 'rules')")
    items = doc.data.get("rules") or []
    if not isinstance(items, list):
        raise doc.error(("rules",), "must be a list of rules")
    return [_rule(doc, i, item) for i, item in enumerate(items)]


def _strings(doc: yamlsrc.Document, kp: yamlsrc.KeyPath, value: Any) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        hint = (
            " (YAML read a bare value as a number: quote it)"
            if any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            else ""
        )
        raise doc.error(kp, f"must be a non-empty string or a list of them{hint}")
    return tuple(values)


def _rule(doc: yamlsrc.Document, i: int, item: Any) -> Rule:
    kp: yamlsrc.KeyPath = ("rules", i)
    if not isinstance(item, dict):
        raise doc.error(kp, "a rule must be a mapping")
    for key in item:
        if key not in RULE_KEYS:
            raise doc.error(kp + (key,), f"unknown key (allowed: {', '.join(sorted(RULE_KEYS))})")
    workload = _workload(doc, kp, item)
    if "exe" not in item and workload is None:
        raise doc.error(kp, "a rule needs 'exe' (the executable path or glob it is about), or 'container' or 'pod'")
    exe = _strings(doc, kp + ("exe",), item["exe"]) if "exe" in item else ANY_EXE
    for pattern in exe if "exe" in item else ():
        if not pattern.startswith("/"):
            raise doc.error(kp + ("exe",), f"must be an absolute path or glob: {pattern!r}")
    uids: tuple[int, ...] = ()
    if "uid" in item:
        raw = item["uid"] if isinstance(item["uid"], list) else [item["uid"]]
        if not raw or not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in raw):
            raise doc.error(kp + ("uid",), "must be a uid (integer >= 0) or a list of them")
        uids = tuple(raw)
    users = _strings(doc, kp + ("user",), item["user"]) if "user" in item else ()
    cmdline = item.get("cmdline")
    if cmdline is not None and not isinstance(cmdline, str):
        raise doc.error(kp + ("cmdline",), "must be a string (a glob over the command line)")
    sha256: tuple[str, ...] = ()
    if "sha256" in item:
        sha256 = tuple(s.lower() for s in _strings(doc, kp + ("sha256",), item["sha256"]))
        if not all(_HEX64.match(s) for s in sha256):
            raise doc.error(kp + ("sha256",), "must be 64 hexadecimal characters")
    paths = _strings(doc, kp + ("paths",), item["paths"]) if "paths" in item else ("**",)
    sensitive: tuple[str, ...] = ()
    if "sensitive" in item:
        sensitive = _strings(doc, kp + ("sensitive",), item["sensitive"])
        if sensitive == ("all",):
            sensitive = tuple(SENSITIVE_CLASSES)
        bad = [s for s in sensitive if s not in SENSITIVE_CLASSES]
        if bad:
            choices = ", ".join([*SENSITIVE_CLASSES, "all"])
            raise doc.error(kp + ("sensitive",), f"unknown class {bad[0]!r} (choose from {choices})")
    inject = item.get("inject_token", True)
    if not isinstance(inject, bool):
        raise doc.error(kp + ("inject_token",), "must be true or false")
    in_containers = item.get("in_containers", False)
    if not isinstance(in_containers, bool):
        raise doc.error(kp + ("in_containers",), "must be true or false")
    if workload is not None and "in_containers" in item:
        raise doc.error(kp + ("in_containers",), "a container or pod rule's exe is always the path inside the "
                        "container: drop in_containers")  # fmt: skip
    refuse_preload = item.get("refuse_preload", False)
    if not isinstance(refuse_preload, bool):
        raise doc.error(kp + ("refuse_preload",), "must be true or false")
    name = item.get("name", f"{os.path.basename(doc.path)}#{i + 1}")
    if not isinstance(name, str) or not name:
        raise doc.error(kp + ("name",), "must be a non-empty string")
    source = f"{doc.path}:{doc.line_of(kp) or '?'}"
    try:
        return Rule(name, exe, source, uids, users, cmdline, sha256, paths, sensitive, inject, in_containers,
                    refuse_preload, workload)  # fmt: skip
    except (ValueError, re.error) as exc:
        raise ConfigError(str(exc), path=doc.path, line=doc.line_of(kp), key=yamlsrc.dotted(kp)) from None


def _glob(doc: yamlsrc.Document, kp: yamlsrc.KeyPath, value: Any) -> str:
    if not isinstance(value, str) or not value:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        hint = " (YAML read a bare value as a number: quote it)" if number else ""
        raise doc.error(kp, f"must be a non-empty string (a glob){hint}")
    return value


def _section(doc: yamlsrc.Document, kp: yamlsrc.KeyPath, value: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict) or not value:
        raise doc.error(kp, f"must be a mapping with at least one of: {', '.join(keys)}")
    for key in value:
        if key not in keys:
            raise doc.error(kp + (key,), f"unknown key (allowed: {', '.join(keys)})")
    return value


def is_full_reference(image: str) -> bool:
    """Whether an image pattern can match a full reference: any image, or a registry (a name with '.' or ':',
    localhost, or a glob) and then a path. 'nginx:*' would silently match nothing."""
    if _GLOB.fullmatch(image.replace("**", "*")):
        return True
    registry, slash, _ = image.partition("/")
    return bool(slash) and (
        "." in registry or ":" in registry or registry == "localhost" or bool(_GLOB.search(registry))
    )


def _container(doc: yamlsrc.Document, ck: yamlsrc.KeyPath, value: Any) -> dict[str, Any]:
    """The WorkloadPattern fields of a rule's `container:` mapping."""
    section = _section(doc, ck, value, CONTAINER_KEYS)
    fields: dict[str, Any] = {key: _glob(doc, ck + (key,), section[key]) for key in ("image", "name", "runtime")
                              if key in section}  # fmt: skip
    image = fields.get("image")
    if image is not None and not is_full_reference(image):
        raise doc.error(ck + ("image",), "must be the image's full reference, registry first "
                        f"(docker.io/library/nginx:*, not nginx:*): {image!r} never matches")  # fmt: skip
    runtime = fields.get("runtime")
    if runtime is not None and not _GLOB.search(runtime) and runtime not in RUNTIMES:
        raise doc.error(ck + ("runtime",), f"unknown runtime {runtime!r} (choose from {', '.join(RUNTIMES)})")
    if "labels" in section:
        labels = section["labels"]
        if not isinstance(labels, dict) or not labels or not all(isinstance(k, str) and k for k in labels):
            raise doc.error(ck + ("labels",), "must be a mapping of label names to globs")
        fields["labels"] = tuple(sorted((k, _glob(doc, ck + ("labels", k), v)) for k, v in labels.items()))
    return fields


def _workload(doc: yamlsrc.Document, kp: yamlsrc.KeyPath, item: dict[str, Any]) -> WorkloadPattern | None:
    """The `container:` and `pod:` keys of a rule as one pattern, or None when the rule has neither."""
    if "container" not in item and "pod" not in item:
        return None
    fields = _container(doc, kp + ("container",), item["container"]) if "container" in item else {}
    if "pod" in item:
        pk = kp + ("pod",)
        section = _section(doc, pk, item["pod"], POD_KEYS)
        for key, attr in (("namespace", "pod_namespace"), ("name", "pod_name"), ("service_account", "service_account")):
            if key in section:
                fields[attr] = _glob(doc, pk + (key,), section[key])
    return WorkloadPattern(**fields)
