"""The emulator's control channel: one JSON object per line over a Unix stream socket.

Tests and the demo run the emulator as another process (often inside another network namespace), so they read
its counters and set its faults through this socket rather than in-process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Any, Optional, Protocol

log = logging.getLogger(__name__)


class Controllable(Protocol):
    def counters(self) -> dict[str, Any]: ...
    def reset(self) -> None: ...
    def set_faults(self, **faults: Any) -> None: ...
    def invalidate_tokens(self) -> None: ...


class ControlServer:
    """Serves the control protocol for an emulator on ``path``."""

    def __init__(self, path: str, target: Controllable):
        self.path = path
        self.target = target
        self._sock: Optional[socket.socket] = None

    def start(self) -> None:
        """Bind the socket (replacing a stale one) and serve in a background thread."""
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(16)
        threading.Thread(target=self._accept, name="emulator-control", daemon=True).start()

    def stop(self) -> None:
        """Close the socket and remove its path."""
        if self._sock is not None:
            self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                stream.write(json.dumps(self._answer(line)).encode() + b"\n")
                stream.flush()

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            msg = json.loads(line)
            op = msg.pop("op")
            if op == "counters":
                return {"ok": True, "counters": self.target.counters()}
            if op == "reset":
                self.target.reset()
            elif op == "faults":
                self.target.set_faults(**msg)
            elif op == "invalidate_tokens":
                self.target.invalidate_tokens()
            else:
                return {"ok": False, "error": f"unknown op {op!r}"}
            return {"ok": True}
        except (ValueError, KeyError, TypeError) as exc:
            return {"ok": False, "error": str(exc)}


class EmulatorControl:
    """Client side: talk to an emulator's control socket."""

    def __init__(self, path: str, timeout: float = 5.0):
        self.path = path
        self.timeout = timeout

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except OSError as exc:
                raise ConnectionError(f"emulator control socket {self.path}: {exc.strerror or exc}") from None
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            with sock.makefile("rb") as stream:
                reply: dict[str, Any] = json.loads(stream.readline())
        if not reply.get("ok"):
            raise RuntimeError(f"emulator refused {op}: {reply.get('error')}")
        return reply

    def counters(self) -> dict[str, Any]:
        """The emulator's counters (requests, tokenless, with_token, token_puts, unauthorized, ..., by_path)."""
        result: dict[str, Any] = self._call("counters")["counters"]
        return result

    def reset(self) -> None:
        """Counters to zero, faults off."""
        self._call("reset")

    def set_faults(self, **faults: Any) -> None:
        """get_delay, put_delay, put_status, drop."""
        self._call("faults", **faults)

    def invalidate_tokens(self) -> None:
        """Revoke every issued token."""
        self._call("invalidate_tokens")
