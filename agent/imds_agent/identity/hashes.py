"""The sha256 of the file a process runs, for rules that pin an executable's hash (read once per file)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from typing import Optional


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
