"""Who called what, aggregated and persisted, so it survives restarts and log rotation.

One entry per (exe, uid, user, path class, v1/v2, decision) with a count and first/last seen. Path classes keep
the inventory small and the suggestions reviewable: the sensitive class name, or the first two segments of the
path ('meta-data/placement'). Saved atomically (write, fsync, rename) every few seconds and at stop.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from ..atomic import write_atomically
from ..errors import ConfigError
from ..policy.paths import MetadataPath

log = logging.getLogger(__name__)

FILENAME = "inventory.json"
VERSION = 1
# A host that runs throw-away executables (random temp paths) must not grow the inventory without end: past this
# many entries the least recently seen is dropped (and counted, so a report can say it is incomplete).
MAX_ENTRIES = 20000
UNKNOWN_EXE = "(unidentified)"


def path_class(path: Optional[MetadataPath]) -> str:
    """The class a path is counted under: its sensitive class, or its first two segments."""
    if path is None:
        return "(invalid path)"
    if path.sensitive is not None:
        return path.sensitive
    return "/".join(path.path.split("/")[:2]) or "/"


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


Key = tuple[str, Optional[int], Optional[str], str, str, str, bool]


class Inventory:
    """Thread-safe aggregate of audit records, loaded from and saved to ``state_dir``."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, FILENAME)
        self._lock = threading.Lock()
        # Least recently seen first, so that eviction at the bound is O(1) rather than a scan of every entry.
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._dirty = False
        self.evicted = 0

    def load(self) -> Inventory:
        """Read the saved inventory; a missing file is an empty one, a corrupt one is an error naming it."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except FileNotFoundError:
            return self
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the inventory: {exc}", path=self.path) from None
        with self._lock:
            for entry in sorted((Entry(**item) for item in doc.get("entries", [])), key=lambda e: e.last_seen):
                self._entries[self._key(entry)] = entry
        return self

    @staticmethod
    def _key(e: Entry) -> Key:
        return (e.exe, e.uid, e.user, e.path_class, e.imds, e.decision, e.exe_verified)

    def add(self, exe: Optional[str], uid: Optional[int], user: Optional[str], cls: str, imds: str,
            decision: str, when: float, exe_verified: bool = True) -> bool:  # fmt: skip
        """Count one request; True when it opened a new entry (a combination not seen before)."""
        key: Key = (exe or UNKNOWN_EXE, uid, user, cls, imds, decision, exe_verified)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                if len(self._entries) >= MAX_ENTRIES:
                    self._entries.popitem(last=False)
                    self.evicted += 1
                self._entries[key] = Entry(key[0], uid, user, cls, imds, decision, 1, when, when, exe_verified)
            else:
                entry.count += 1
                entry.last_seen = max(entry.last_seen, when)
                self._entries.move_to_end(key)
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
            doc = {"version": VERSION, "entries": [vars(e) for e in self._entries.values()]}
            self._dirty = False
        try:
            os.makedirs(self.state_dir, mode=0o750, exist_ok=True)
            write_atomically(self.path, json.dumps(doc, separators=(",", ":")), mode=0o640)
        except OSError as exc:
            log.error("cannot save the inventory to %s: %s", self.path, exc)
            with self._lock:
                self._dirty = True
