"""Shared checks for the redirect backends: does a connection from a given uid land on the agent or go direct?"""

from __future__ import annotations

import select
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

from imds_agent.proxy.origdst import original_dst

PATH_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
CLIENT = "import socket, sys\ns = socket.create_connection((sys.argv[1], 80), 3)\ns.sendall(b'x')\ns.recv(1)\n"


class Listeners:
    """The 'agent' on loopback and the 'real service' on the metadata addresses, in the current namespace."""

    def __init__(self) -> None:
        self.agent: list[socket.socket] = []
        self.real: list[socket.socket] = []
        self.port = 0

    def open(self) -> None:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            s = socket.socket(family)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, self.port))
            s.listen(16)
            self.port = s.getsockname()[1]
            self.agent.append(s)
        for family, host in ((socket.AF_INET, "169.254.169.254"), (socket.AF_INET6, "fd00:ec2::254")):
            s = socket.socket(family)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 80))
            s.listen(16)
            self.real.append(s)

    def close(self) -> None:
        for s in self.agent + self.real:
            s.close()

    def connect_as(self, uid: int, address: str) -> tuple[str, Optional[tuple[str, int]]]:
        """Connect to ``address``:80 as ``uid``; return ('agent'|'real', SO_ORIGINAL_DST seen by the acceptor)."""
        argv = [
            "setpriv",
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            CLIENT,
            address,
        ]
        proc = subprocess.Popen(argv, env=PATH_ENV, stderr=subprocess.PIPE, text=True)
        try:
            ready, _, _ = select.select(self.agent + self.real, [], [], 5)
            if not ready:
                proc.kill()
                raise AssertionError(f"no connection arrived from uid {uid}: {proc.communicate()[1]}")
            listener = ready[0]
            conn, _ = listener.accept()
            with conn:
                conn.recv(1)
                dst = original_dst(conn)
                conn.sendall(b"y")
            return ("agent" if listener in self.agent else "real"), dst
        finally:
            proc.wait(5)


@contextmanager
def listeners() -> Iterator[Listeners]:
    ls = Listeners()
    ls.open()
    try:
        yield ls
    finally:
        ls.close()


def run(argv: list[str]) -> str:
    """A command's stdout (fixed PATH); raises on failure."""
    return subprocess.run(argv, env=PATH_ENV, check=True, capture_output=True, text=True, timeout=20).stdout


HELD = """import socket, sys
s = socket.create_connection((sys.argv[1], 80), 3)
print("connected", s.getsockname()[1], flush=True)
sys.stdin.readline()
try:
    s.sendall(b"x")
    s.settimeout(3)
    print("got", s.recv(1).hex() or "eof", flush=True)
except OSError as exc:
    print("error", type(exc).__name__, flush=True)
"""


class HeldClient:
    """A connection to ``address``:80 opened as ``uid`` now and used (one byte each way) only when told to."""

    def __init__(self, uid: int, address: str) -> None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "/usr/bin/python3", "-c", HELD,
                address]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, env=PATH_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "connected":
            raise AssertionError(f"uid {uid} could not connect to {address}: {self.proc.communicate()[1]}")
        self.port = int(line[1])

    def use(self) -> str:
        """Send a byte, wait for one: 'got 79' (answered), 'got eof', or 'error <OSError subclass>'."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        self.proc.wait(5)
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def accept(listener: socket.socket, timeout: float = 5) -> socket.socket:
    """The next connection on ``listener``, or AssertionError."""
    ready, _, _ = select.select([listener], [], [], timeout)
    if not ready:
        raise AssertionError(f"no connection arrived on {listener.getsockname()}")
    return listener.accept()[0]


def received(conn: socket.socket, timeout: float = 1.0) -> bytes:
    """What arrives on ``conn`` within ``timeout`` (b'' for nothing, or the peer closed)."""
    conn.settimeout(timeout)
    try:
        return conn.recv(16)
    except (socket.timeout, ConnectionResetError):
        return b""
