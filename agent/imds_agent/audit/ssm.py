"""The inventory as SSM custom inventory: two files the SSM Agent's inventory gatherer uploads, so that a fleet's
callers and agent states can be queried in one place (Resource Data Sync to S3, then Athena).

The SSM Agent reads every ``*.json`` file in ``/var/lib/amazon/ssm/<instance-id>/inventory/custom/`` when the
``AWS-GatherSoftwareInventory`` association runs with custom inventory enabled. What it accepts is checked by
its custom gatherer (amazon-ssm-agent, agent/plugins/inventory/gatherers/custom/customGatherer.go) and by the
PutInventory API (InventoryItem), and this module keeps to both:

- ``SchemaVersion`` matches ``^([0-9]{1,6})(\\.[0-9]{1,6})$``; ``TypeName`` starts with ``Custom:`` and has at
  most 100 characters; every value is a string (the gatherer refuses numbers, booleans and null).
- An entry has at most 50 attributes, names of 1 to 64 characters, values of at most 4096 bytes.
- A type has at most 10000 entries (the API), and at most 200 KiB (the gatherer's per-type limit before agent
  3.x raised its own to 3 MiB, saying the service is stricter); one PutInventory call carries at most 1 MiB on
  those agents, for every type together, software inventory included.
- More than 20 ``.json`` files in the folder and the gatherer reads none of them: the agent never adds the file
  that would make 21, so it cannot break an operator's own custom inventory.

Callers are bounded well below those limits (MAX_CALLERS entries and MAX_TYPE_BYTES), denials and would-deny
entries first, then IMDSv1 callers, then the rest, most recently seen first within each: the fleet questions
("who would enforce break", "who still speaks IMDSv1") are answered by what is kept, and the status type says
how many entries were left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

from ..atomic import write_atomically
from .inventory import Entry

log = logging.getLogger(__name__)

SSM_ROOT = "/var/lib/amazon/ssm"
SCHEMA_VERSION = "1.0"
CALLERS_TYPE = "Custom:ImdsAgentCallers"
STATUS_TYPE = "Custom:ImdsAgentStatus"
CALLERS_FILE = "ImdsAgentCallers.json"
STATUS_FILE = "ImdsAgentStatus.json"

# The gatherer's and the API's limits (see the module docstring for where each comes from).
MAX_FILES = 20
MAX_ATTRIBUTES = 50
MAX_NAME = 64
MAX_VALUE_BYTES = 4096
MAX_TYPE_NAME = 100
# Ours, well inside them: 500 callers is more than any host we have seen has distinct (exe, uid, class, version,
# decision) combinations worth a fleet query, and 64 KiB leaves room in the 1 MiB call for the software
# inventory of a host with thousands of packages.
MAX_CALLERS = 500
MAX_TYPE_BYTES = 64 * 1024
# An executable's path is cut as in the audit log, so one long path cannot take the whole budget.
MAX_EXE = 1024

# Instance ids as PutInventory accepts them (EC2 instances, and hybrid managed nodes).
_INSTANCE_ID = re.compile(r"^(i-(\w{8}|\w{17})|mi-\w{17})$")
_PRIORITY = {"deny": 0, "would-deny": 1}


@dataclass(frozen=True)
class AgentStatus:
    """What the status type says about the agent on this host."""

    version: str
    mode: str
    backend: str
    policy_hash: str
    would_deny: int = 0
    denied: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("audit", "enforce"):
            raise ValueError(f"mode must be audit or enforce, not {self.mode!r}")
        if self.would_deny < 0 or self.denied < 0:
            raise ValueError("counts cannot be negative")


def policy_hash(files: Sequence[str], default: str = "", unknown: str = "") -> str:
    """sha256 over the policy files' names and bytes, in the order the agent reads them, and the two settings
    for callers no rule matches: equal on two hosts exactly when they enforce the same policy files."""
    digest = hashlib.sha256(f"default={default}\0unknown={unknown}\0".encode())
    for path in files:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            data = f"(unreadable: {exc.strerror})".encode()
        digest.update(f"{os.path.basename(path)}\0{len(data)}\0".encode() + data)
    return digest.hexdigest()


def _text(value: str, limit: int = MAX_VALUE_BYTES) -> str:
    """``value`` as valid UTF-8 (undecodable bytes from a path shown as \\xNN) of at most ``limit`` bytes."""
    raw = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    data = raw.encode("utf-8")
    return raw if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def caller_entry(e: Entry) -> dict[str, str]:
    """One Content entry: strings only, as the gatherer requires (an unknown uid is the empty string)."""
    exe = e.exe if len(e.exe) <= MAX_EXE else e.exe[:MAX_EXE] + "..."
    return {
        "Exe": _text(exe),
        "Uid": "" if e.uid is None else str(e.uid),
        "User": _text(e.user or ""),
        # False: the path did not lead to the host's file of that name (a container's image, a replaced binary).
        "ExeVerified": "true" if e.exe_verified else "false",
        "Imds": e.imds,
        "PathClass": _text(e.path_class),
        "Decision": e.decision,
        "Requests": str(e.count),
        "LastSeen": _iso(e.last_seen),
        # The container a caller ran in, as its runtime described it ('' on the host): fleet queries by image.
        "Image": _text(e.image),
        "Container": _text(e.container),
        "PodNamespace": _text(e.pod_namespace),
    }


def _order(e: Entry) -> tuple[int, float]:
    rank = _PRIORITY.get(e.decision, 2 if e.imds == "v1" else 3)
    return rank, -e.last_seen


def select_callers(
    entries: Iterable[Entry], limit: int = MAX_CALLERS, budget: int = MAX_TYPE_BYTES
) -> list[dict[str, str]]:
    """The Content entries that fit: at most ``limit``, their JSON at most ``budget`` bytes, in priority order."""
    out: list[dict[str, str]] = []
    size = len(_document(CALLERS_TYPE, []))
    for e in sorted(entries, key=_order):
        if len(out) >= limit:
            break
        item = caller_entry(e)
        cost = len(json.dumps(item, separators=(",", ":")).encode()) + 1
        if size + cost > budget:
            break
        out.append(item)
        size += cost
    return out


def status_entry(status: AgentStatus, callers: int, reported: int) -> dict[str, str]:
    """The status type's one entry."""
    return {
        "Version": _text(status.version),
        "Mode": status.mode,
        "Backend": _text(status.backend),
        "PolicyHash": status.policy_hash,
        "WouldDeny": str(status.would_deny),
        "Denied": str(status.denied),
        "Callers": str(callers),
        "CallersReported": str(reported),
    }


def _document(type_name: str, content: list[dict[str, str]]) -> str:
    doc = {"SchemaVersion": SCHEMA_VERSION, "TypeName": type_name, "Content": content}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def find_instance_id(root: str = SSM_ROOT) -> Optional[str]:
    """The instance the SSM Agent keeps inventory for: the one directory under ``root`` named like an instance id
    with an ``inventory`` directory (the most recently changed one, if an image carried another's along)."""
    try:
        names = os.listdir(root)
    except OSError:
        return None
    found = []
    for name in names:
        inventory = os.path.join(root, name, "inventory")
        if _INSTANCE_ID.match(name) and os.path.isdir(inventory):
            found.append((os.stat(inventory).st_mtime, name))
    return max(found)[1] if found else None


def _room(folder: str) -> bool:
    """Whether adding our files keeps the folder within the gatherer's 20 files."""
    try:
        others = {n for n in os.listdir(folder) if n.endswith(".json")} - {CALLERS_FILE, STATUS_FILE}
    except FileNotFoundError:
        return True
    return len(others) + 2 <= MAX_FILES


def _replace(path: str, text: str) -> None:
    """Write ``text`` unless the file already says exactly that (no rewrite, no new mtime for the gatherer)."""
    try:
        with open(path, encoding="utf-8") as fh:
            if fh.read() == text:
                return
    except (OSError, UnicodeDecodeError):
        pass
    write_atomically(path, text, mode=0o644)


def write_custom_inventory(
    entries: Iterable[Entry], status: AgentStatus, root: str = SSM_ROOT, instance_id: Optional[str] = None
) -> Optional[str]:
    """Write the callers and status types into the SSM Agent's custom inventory folder; return the folder, or None
    when there is no SSM Agent inventory for this instance (nothing is written, nothing is said) or when the
    folder already holds so many files that ours would make the gatherer read none (said once per call).

    OSError (an unwritable folder) is raised; each file is replaced atomically, so the gatherer reads the old
    content or the new, never a partial file.
    """
    instance_id = instance_id or find_instance_id(root)
    if instance_id is None or not _INSTANCE_ID.match(instance_id):
        return None
    inventory = os.path.join(root, instance_id, "inventory")
    if not os.path.isdir(inventory):
        return None
    folder = os.path.join(inventory, "custom")
    if not _room(folder):
        log.warning("%s holds %d or more custom inventory files already; not adding imds-agent's", folder,
                    MAX_FILES - 1)  # fmt: skip
        return None
    os.makedirs(folder, mode=0o755, exist_ok=True)
    listed = list(entries)
    callers = select_callers(listed)
    _replace(os.path.join(folder, CALLERS_FILE), _document(CALLERS_TYPE, callers))
    _replace(
        os.path.join(folder, STATUS_FILE), _document(STATUS_TYPE, [status_entry(status, len(listed), len(callers))])
    )
    return folder


def _previous_backend(root: str, instance_id: Optional[str]) -> Optional[str]:
    """The backend the running agent last wrote (the configuration may only say auto)."""
    instance_id = instance_id or find_instance_id(root)
    if instance_id is None:
        return None
    try:
        with open(os.path.join(root, instance_id, "inventory", "custom", STATUS_FILE), encoding="utf-8") as fh:
            backend = json.load(fh)["Content"][0]["Backend"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return backend if isinstance(backend, str) and backend != "auto" else None


def status_from(config_path: str, entries: Sequence[Entry], previous_backend: Optional[str] = None) -> AgentStatus:
    """The status as the configuration on disk and the saved inventory tell it (for the command line)."""
    from .. import __version__
    from .. import config as configmod
    from ..policy.loader import policy_files

    config = configmod.load(config_path)
    backend = config.redirect.backend
    if backend == "auto" and previous_backend:
        backend = previous_backend
    files = policy_files(config.policy.dir)
    return AgentStatus(
        version=__version__,
        mode=config.mode,
        backend=backend if config.redirect.enabled else "disabled",
        policy_hash=policy_hash(files, config.policy.default, config.policy.unknown),
        would_deny=sum(e.count for e in entries if e.decision == "would-deny"),
        denied=sum(e.count for e in entries if e.decision == "deny"),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python3 -m imds_agent.audit.ssm``: write the custom inventory from the saved inventory now."""
    from .. import config as configmod
    from ..errors import AgentError
    from .inventory import Inventory

    parser = argparse.ArgumentParser(prog="python3 -m imds_agent.audit.ssm", description=main.__doc__)
    parser.add_argument("--config", default=configmod.DEFAULT_PATH, help="agent.yaml (default: %(default)s)")
    parser.add_argument("--state-dir", help="where inventory.json is (default: the configuration's audit.state_dir)")
    parser.add_argument("--ssm-root", default=SSM_ROOT, help="the SSM Agent's data directory (default: %(default)s)")
    parser.add_argument("--instance-id", help="default: the instance directory found under --ssm-root")
    args = parser.parse_args(argv)
    try:
        state_dir = args.state_dir or configmod.load(args.config).audit.state_dir
        entries = Inventory(state_dir).load().entries()
        status = status_from(args.config, entries, _previous_backend(args.ssm_root, args.instance_id))
        folder = write_custom_inventory(entries, status, args.ssm_root, args.instance_id)
    except AgentError as exc:
        print(f"imds-agent custom inventory: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"imds-agent custom inventory: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if folder is None:
        print(f"no SSM Agent inventory folder under {args.ssm_root} (or no room in it): nothing written")
        return 0
    print(f"wrote {CALLERS_TYPE} and {STATUS_TYPE} to {folder}: {len(entries)} inventory entries, mode "
          f"{status.mode}, {status.would_deny} would-deny")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
