"""A byte-transparent TCP relay that counts what passes: for third-party metadata emulators that keep no counters.

    python -m imds_agent.sandbox.tap --listen 169.254.169.254:80 --upstream 127.0.0.1:4566 --control PATH

Every byte is relayed unchanged in both directions; the tap only reads the request heads going upstream to count
requests with and without an IMDSv2 token (what the real service reports as MetadataNoToken) and token PUTs.
It never answers a request itself, so what the client gets is what the emulator behind it says.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from collections import Counter
from typing import Any, Optional

from .control import ControlServer
from .emulator import parse_listen

COUNTERS = ("requests", "tokenless", "with_token", "token_puts")


class Tap:
    """Relays connections from ``listen`` addresses to ``upstream``, counting request heads."""

    def __init__(self, listen: list[tuple[str, int]], upstream: tuple[str, int]):
        self.listen = listen
        self.upstream = upstream
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._socks: list[socket.socket] = []

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {name: self._counts[name] for name in COUNTERS}

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()

    def set_faults(self, **faults: Any) -> None:
        raise ValueError("the tap has no faults")

    def invalidate_tokens(self) -> None:
        raise ValueError("the tap holds no tokens")

    def start(self) -> None:
        for host, port in self.listen:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            self._socks.append(sock)
            threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=self._copy, args=(upstream, client, False), daemon=True).start()
        self._copy(client, upstream, True)

    def _copy(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        pending = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if count:
                    pending = self._count(pending + data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()

    def _count(self, buf: bytes) -> bytes:
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return buf[-65536:]
            head, buf = buf[:end].decode("latin-1"), buf[end + 4 :]
            lines = head.split("\r\n")
            method = lines[0].split(" ", 1)[0]
            names = {line.split(":", 1)[0].strip().lower() for line in lines[1:]}
            with self._lock:
                if method == "PUT":
                    self._counts["token_puts"] += 1
                elif method in ("GET", "HEAD"):
                    self._counts["requests"] += 1
                    self._counts["with_token" if "x-aws-ec2-metadata-token" in names else "tokenless"] += 1

    def stop(self) -> None:
        for sock in self._socks:
            sock.close()


def main(argv: Optional[list[str]] = None) -> int:
    """Run until SIGTERM; print one JSON ready line like the emulator does."""
    parser = argparse.ArgumentParser(prog="imds-tap")
    parser.add_argument("--listen", action="append", type=parse_listen, required=True, metavar="HOST:PORT")
    parser.add_argument("--upstream", type=parse_listen, required=True, metavar="HOST:PORT")
    parser.add_argument("--control", metavar="PATH")
    args = parser.parse_args(argv)
    tap = Tap(args.listen, args.upstream)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    tap.start()
    control = ControlServer(args.control, tap) if args.control else None
    if control is not None:
        control.start()
    print(json.dumps({"ready": True, "pid": os.getpid(), "listen": args.listen, "control": args.control}), flush=True)
    while not stop.wait(0.5):
        pass
    if control is not None:
        control.stop()
    tap.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
