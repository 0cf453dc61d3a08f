"""Replacing a file so that a reader (or a crash) sees the old content or the new, never a mix or a truncation."""

from __future__ import annotations

import os
import tempfile
from typing import Optional


def write_atomically(path: str, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text``: written to a temporary file beside it, flushed to disk, renamed over it.

    An existing file's permissions and (when we are root) owner are kept; a new file gets ``mode``. The temporary
    file is removed on any failure, and the error is raised.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st: Optional[os.stat_result] = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, st.st_mode & 0o7777 if st else mode)
        if st is not None and os.geteuid() == 0:
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
