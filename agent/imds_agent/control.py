"""The running agent's control socket: `imds-agent status`, `report` and `rules show` ask it for live answers.

One JSON request per connection ({"command": "status" | "report" | "rules"}), one JSON answer. The socket is a
unix socket (mode 0660, the agent's group), bound while the agent is still privileged and served once threads may
start; a peer other than root, the agent's uid or a member of its group (SO_PEERCRED) is refused even if the file
mode were loosened. When no agent answers, the commands fall back to the saved files and say so.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

SOCKET = "/run/imds-agent/control.sock"
MAX_REQUEST = 4096
Handler = Callable[[str], Any]  # command -> JSON-ready answer; raises KeyError for an unknown command


class ControlServer:
    """Serves the control protocol on ``path`` from a background thread."""

    def __init__(self, path: str, handler: Handler, uid: int, gid: int):
        self.path = path
        self.handler = handler
        self.uid, self.gid = uid, gid
        self._sock: Optional[socket.socket] = None
        self._stop = threading.Event()

    def bind(self) -> bool:
        """Bind the socket (replacing a stale one); False, logged, when its directory is missing or unwritable."""
        try:
            if os.path.exists(self.path):
                os.unlink(self.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.bind(self.path)
            os.chmod(self.path, 0o660)
            if os.geteuid() == 0:
                os.chown(self.path, 0, self.gid)
            sock.listen(16)
        except OSError as exc:
            log.warning("no control socket at %s (%s): status and report read the saved files", self.path,
                        exc.strerror or exc)  # fmt: skip
            return False
        self._sock = sock
        return True

    def start(self) -> None:
        """Serve in a background thread (after privileges were dropped)."""
        if self._sock is not None:
            threading.Thread(target=self._loop, name="imds-control", daemon=True).start()

    def close(self) -> None:
        """Stop serving and remove the socket."""
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _loop(self) -> None:
        while not self._stop.is_set() and self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                try:
                    self._answer(conn)
                except Exception:
                    log.exception("control request failed")

    def _answer(self, conn: socket.socket) -> None:
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid not in (0, self.uid) and gid != self.gid and self.gid not in _groups_of(pid):
            conn.sendall(b'{"error": "not allowed"}\n')
            return
        raw = conn.recv(MAX_REQUEST)
        try:
            command = str(json.loads(raw)["command"])
            answer = {"ok": self.handler(command)}
        except (ValueError, KeyError, TypeError):
            answer = {"error": 'expected {"command": "status" | "report" | "rules"}'}
        conn.sendall(json.dumps(answer, default=str).encode() + b"\n")


def _groups_of(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def ask(command: str, path: str = SOCKET, timeout: float = 2.0) -> Optional[Any]:
    """The running agent's answer to ``command``, or None when no agent answers there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps({"command": command}).encode())
            data = b""
            while chunk := sock.recv(1 << 20):
                data += chunk
    except OSError:
        return None
    try:
        reply = json.loads(data)
    except ValueError:
        return None
    return reply.get("ok") if isinstance(reply, dict) else None
