"""Who called what, aggregated and persisted, so it survives restarts and log rotation.

One entry per (exe, uid, user, path class, v1/v2, decision, and for a caller in a container its image, name, pod
namespace and service account) with a count and first/last seen. Path classes keep the inventory small and the
suggestions reviewable, and they come from a closed set, never from a raw path (a caller could otherwise mint one
entry per request): the sensitive class name, or the category of the metadata tree the path is in
('meta-data/placement'), or '(other)'. Saved atomically every few seconds and at stop.

The inventory is bounded. At the bound the least recently seen entry of an allowed or refused request makes room;
an entry that records a denial or a would-deny is never dropped, because `report` and the SetMode document trust
those figures before enforce is switched on. When only such entries are left, a new one is counted under
OVERFLOW_EXE for its uid, class and decision, so its denials still show.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from ..atomic import write_atomically
from ..errors import ConfigError
from ..identity.caller import ContainerInfo
from ..policy.paths import MetadataPath

log = logging.getLogger(__name__)

FILENAME = "inventory.json"
VERSION = 1
# A host that runs throw-away executables (random temp paths) must not grow the inventory without end: past this
# many entries the least recently seen is dropped (and counted, so a report can say it is incomplete).
MAX_ENTRIES = 20000
UNKNOWN_EXE = "(unidentified)"
OVERFLOW_EXE = "(inventory full)"
KEPT_DECISIONS = frozenset({"deny", "would-deny"})
OTHER_CLASS = "(other)"
# The categories of the metadata tree (the instance metadata categories AWS documents), as path classes.
META_DATA = frozenset(
    "ami-id ami-launch-index ami-manifest-path ancestor-ami-ids autoscaling block-device-mapping events hostname "
    "iam instance-action instance-id instance-life-cycle instance-type ipv6 kernel-id local-hostname local-ipv4 "
    "mac metrics network placement product-codes public-hostname public-ipv4 public-keys ramdisk-id "
    "reservation-id security-groups services spot system tags".split()
)
DYNAMIC = frozenset({"instance-identity", "fws"})


def path_class(path: Optional[MetadataPath]) -> str:
    """The class a path is counted under, from a closed set: its sensitive class, the metadata category it is in,
    a top-level listing, or '(other)'."""
    if path is None:
        return "(invalid path)"
    if path.sensitive is not None:
        return path.sensitive
    segments = path.path.split("/") if path.path else []
    if not segments:
        return "/"
    top = segments[0]
    if len(segments) == 1 and top in ("meta-data", "dynamic", "api"):
        return top
    if top == "meta-data" and segments[1] in META_DATA:
        return f"meta-data/{segments[1]}"
    if top == "dynamic" and segments[1] in DYNAMIC:
        return f"dynamic/{segments[1]}"
    if top == "api" and segments[1] == "token":
        return "api/token"
    return OTHER_CLASS


@dataclass
class Entry:
    """One aggregated line of the inventory."""

    exe: str
    uid: Optional[int]
    user: Optional[str]
    path_class: str
    imds: str
    decision: str
    count: int
    first_seen: float
    last_seen: float
    exe_verified: bool = True  # False: the path named a file other than the host's (a container's, a replaced one)
    # The container the caller ran in ('' on the host, or where the runtime did not say): ``exe`` is then the path
    # inside its image. The pod's name is left out: pods are named anew each time they are replaced.
    image: str = ""
    container: str = ""
    pod_namespace: str = ""
    service_account: str = ""

    @property
    def in_container(self) -> bool:
        """Whether the entry is of a caller in a container the agent described."""
        return bool(self.image or self.container or self.pod_namespace)


Key = tuple[str, Optional[int], Optional[str], str, str, str, bool, str, str, str, str]
NO_WORKLOAD = ("", "", "", "")


def _entries(doc: Any) -> list[Entry]:
    """The entries of a saved inventory document; ValueError or TypeError when it has the wrong shape."""
    if not isinstance(doc, dict) or not isinstance(doc.get("entries", []), list):
        raise ValueError("not an inventory document")
    for key in ("evicted", "overflowed"):
        if not isinstance(doc.get(key, 0), int):
            raise ValueError(f"{key} is not a number")
    out = []
    for item in doc.get("entries", []):
        entry = Entry(**item)  # TypeError on a missing or unknown field
        numbers = (entry.count, entry.first_seen, entry.last_seen)
        strings = (entry.exe, entry.path_class, entry.imds, entry.decision, entry.image, entry.container,
                   entry.pod_namespace, entry.service_account)  # fmt: skip
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            raise ValueError("an entry's count or times are not numbers")
        if not all(isinstance(v, str) for v in strings) or not isinstance(entry.exe_verified, bool):
            raise ValueError("an entry's fields have the wrong types")
        if entry.uid is not None and not isinstance(entry.uid, int):
            raise ValueError("an entry's uid is not a number")
        out.append(entry)
    return out


class Inventory:
    """Thread-safe aggregate of audit records, loaded from and saved to ``state_dir``."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILENAME)
        self._lock = threading.Lock()
        self._entries: dict[Key, Entry] = {}
        # The entries that may make room, least recently seen first, so that eviction is O(1).
        self._evictable: OrderedDict[Key, None] = OrderedDict()
        self._dirty = False
        self.evicted = 0  # allowed or refused entries dropped to make room, since the file was started
        self.overflowed = 0  # denials counted under OVERFLOW_EXE because only denial entries were left

    def load(self, repair: bool = False) -> Inventory:
        """Read the saved inventory; a missing file is an empty one. A corrupt one (not JSON, truncated, empty,
        or the wrong shape) is an error naming it, or with ``repair`` (the agent at start) is moved aside as
        inventory.json.corrupt-<time>, said once, and a fresh inventory begins: counts are worth less than a
        host whose agent cannot start."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                doc = json.load(fh)
            entries = _entries(doc)
        except FileNotFoundError:
            return self
        except (OSError, ValueError, TypeError) as exc:
            if not repair:
                raise ConfigError(f"cannot read the inventory: {exc}", path=self.path) from None
            self._set_aside(exc)
            return self
        with self._lock:
            for entry in sorted(entries, key=lambda e: e.last_seen):
                key = self._key(entry)
                self._entries[key] = entry
                if entry.decision not in KEPT_DECISIONS:
                    self._evictable[key] = None
            self.evicted = int(doc.get("evicted", 0))
            self.overflowed = int(doc.get("overflowed", 0))
        return self

    def _set_aside(self, exc: Exception) -> None:
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        try:
            os.replace(self.path, aside)
        except OSError as move:
            log.error("the inventory %s is corrupt (%s) and cannot be moved aside (%s): starting a fresh one, "
                      "which will replace it at the next save", self.path, exc, move.strerror)  # fmt: skip
            return
        log.error("the inventory %s was corrupt (%s): moved it to %s and started a fresh one", self.path, exc, aside)

    @staticmethod
    def _key(e: Entry) -> Key:
        return (e.exe, e.uid, e.user, e.path_class, e.imds, e.decision, e.exe_verified, e.image, e.container,
                e.pod_namespace, e.service_account)  # fmt: skip

    def add(self, exe: Optional[str], uid: Optional[int], user: Optional[str], cls: str, imds: str,
            decision: str, when: float, exe_verified: bool = True,
            workload: Optional[ContainerInfo] = None) -> bool:  # fmt: skip
        """Count one request; True when it opened a new entry (a combination not seen before)."""
        w = (
            (workload.image, workload.name, workload.pod_namespace, workload.service_account)
            if workload
            else NO_WORKLOAD
        )
        key: Key = (exe or UNKNOWN_EXE, uid, user, cls, imds, decision, exe_verified, *w)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None and len(self._entries) >= MAX_ENTRIES:
                if self._evictable:
                    old, _ = self._evictable.popitem(last=False)
                    del self._entries[old]
                    self.evicted += 1
                elif decision in KEPT_DECISIONS:
                    self.overflowed += 1
                    key = (OVERFLOW_EXE, uid, None, cls, imds, decision, True, *NO_WORKLOAD)
                    entry = self._entries.get(key)
                else:
                    self.evicted += 1  # an allowed request with no room left: counted, not kept
                    self._dirty = True
                    return False
            if entry is None:
                self._entries[key] = Entry(key[0], uid, key[2], cls, imds, decision, 1, when, when, *key[6:])
            else:
                entry.count += 1
                entry.last_seen = max(entry.last_seen, when)
            if key in self._evictable:
                self._evictable.move_to_end(key)
            elif decision not in KEPT_DECISIONS and key[0] != OVERFLOW_EXE:
                self._evictable[key] = None
            self._dirty = True
            return entry is None

    def entries(self) -> list[Entry]:
        """A snapshot of every entry."""
        with self._lock:
            return [Entry(**vars(e)) for e in self._entries.values()]

    def save(self, force: bool = False) -> None:
        """Write atomically if anything changed; errors are logged, never raised into the agent."""
        with self._lock:
            if not self._dirty and not force:
                return
            doc = {
                "version": VERSION,
                "evicted": self.evicted,
                "overflowed": self.overflowed,
                "entries": [vars(e) for e in self._entries.values()],
            }
            self._dirty = False
        try:
            os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
            write_atomically(self.path, json.dumps(doc, separators=(",", ":")), mode=0o640)
        except OSError as exc:
            log.error("cannot save the inventory to %s: %s", self.path, exc)
            with self._lock:
                self._dirty = True
