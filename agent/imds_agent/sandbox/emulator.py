"""An EC2 metadata service emulator: a real HTTP server with the real service's token rules, for demo and tests.

    python -m imds_agent.sandbox.emulator --listen 169.254.169.254:80 --listen [fd00:ec2::254]:80 \\
        --tokens required --control /run/emu.sock

Behaves as the service does where clients can tell: HttpTokens required or optional, token PUT with a TTL of
1..21600 seconds (else 400), X-Forwarded-For on the PUT refused with 403, a missing, invalid or expired token
answered with 401 when tokens are required, GET/HEAD only (405 otherwise), the tree under /latest/ and under
versioned prefixes. It counts what it saw (requests with and without a token: CloudWatch's MetadataNoToken) and
can be told to misbehave (delays, failing PUTs, dropped connections, revoked tokens) to test the agent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from ..imds.protocol import TOKEN_HEADER, TTL_HEADER
from .control import ControlServer
from .metadata import VERSIONS, build_tree, lookup

log = logging.getLogger(__name__)

MAX_TTL = 21600
MAX_PATHS = 1000
FAULTS = {"get_delay": 0.0, "put_delay": 0.0, "put_status": 0, "drop": False}
COUNTERS = ("requests", "tokenless", "with_token", "token_puts", "unauthorized", "forbidden", "not_found")
ERROR_PAGE = (
    '<?xml version="1.0" encoding="iso-8859-1"?>\n<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
    '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n<html xmlns="http://www.w3.org/1999/xhtml" '
    'xml:lang="en" lang="en">\n <head>\n  <title>{code} - {reason}</title>\n </head>\n <body>\n  <h1>{code} - '
    "{reason}</h1>\n </body>\n</html>\n"
)


class Emulator:
    """The emulated service: token store, metadata tree, counters and faults, served on one or more addresses."""

    def __init__(
        self,
        tokens: str = "required",
        addresses: Optional[list[tuple[str, int]]] = None,
        role: str = "imds-agent-demo-role",
        user_data: Optional[str] = None,
        hop_limit: int = 1,
    ):
        if tokens not in ("required", "optional"):
            raise ValueError(f"tokens must be required or optional, not {tokens!r}")
        if not 1 <= hop_limit <= 64:
            raise ValueError(f"hop_limit must be 1..64, not {hop_limit}")
        # HttpPutResponseHopLimit: the token PUT's answer leaves with this IP TTL (IPv6 hop limit), so a client
        # more routed hops away than this (a container behind the host's bridge, at the default 1) never gets it.
        self.hop_limit = hop_limit
        self.tokens_required = tokens == "required"
        self.bind = addresses or [("127.0.0.1", 0)]
        self.role = role
        self.tree = build_tree(role, user_data)
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}
        self._counters: Counter[str] = Counter()
        self._paths: Counter[str] = Counter()
        self._faults: dict[str, Any] = dict(FAULTS)
        self._servers: list[ThreadingHTTPServer] = []

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind every address and serve each in a background thread."""
        for host, port in self.bind:
            server = _server_class(host)((host, port), _Handler)
            server.emulator = self  # type: ignore[attr-defined]
            self._servers.append(server)
            threading.Thread(target=server.serve_forever, args=(0.05,), name="emulator", daemon=True).start()

    def stop(self) -> None:
        """Stop serving and close the listening sockets."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) pairs actually bound."""
        return [(s.server_address[0], int(s.server_address[1])) for s in self._servers]  # type: ignore[misc]

    # --- what tests read and set -------------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        """A snapshot of the counters, with ``by_path``."""
        with self._lock:
            snap: dict[str, Any] = {name: self._counters[name] for name in COUNTERS}
            snap["by_path"] = dict(self._paths)
        return snap

    def reset(self) -> None:
        """Counters to zero and faults off (issued tokens stay valid)."""
        with self._lock:
            self._counters.clear()
            self._paths.clear()
            self._faults = dict(FAULTS)

    def set_faults(self, **faults: Any) -> None:
        """Set any of get_delay, put_delay (seconds), put_status (0 = normal), drop (close without answering)."""
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults: {', '.join(sorted(unknown))}")
        with self._lock:
            self._faults.update(faults)

    def invalidate_tokens(self) -> None:
        """Revoke every issued token: the next request with one of them gets 401."""
        with self._lock:
            self._tokens.clear()

    # --- used by the handler -----------------------------------------------------------------------------------
    def fault(self, name: str) -> Any:
        with self._lock:
            return self._faults[name]

    def count(self, name: str, path: Optional[str] = None) -> None:
        with self._lock:
            self._counters[name] += 1
            if path is not None and (path in self._paths or len(self._paths) < MAX_PATHS):
                self._paths[path] += 1

    def issue(self, ttl: int) -> str:
        token = secrets.token_urlsafe(42)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + ttl
        return token

    def remaining(self, token: str) -> Optional[int]:
        """Seconds left on ``token``, or None when it is unknown or expired."""
        with self._lock:
            expiry = self._tokens.get(token)
        left = None if expiry is None else expiry - time.monotonic()
        return int(left) if left is not None and left > 0 else None


def _server_class(host: str) -> type[ThreadingHTTPServer]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 256

    return Server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "EC2ws"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without NODELAY, Nagle and delayed ACKs add ~40 ms to every
        # answer on a keep-alive connection (the real service answers in well under a millisecond).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @property
    def emu(self) -> Emulator:
        return self.server.emulator  # type: ignore[attr-defined, no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)

    def version_string(self) -> str:
        return self.server_version

    def _send(self, status: int, body: str = "", headers: Optional[dict[str, str]] = None, head: bool = False) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html" if status >= 400 else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _error(self, status: int, head: bool = False) -> None:
        reason = self.responses[status][0]
        self._send(status, ERROR_PAGE.format(code=status, reason=reason), head=head)

    def _discard_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit():
            self.rfile.read(int(length))

    def _dropped(self) -> bool:
        if self.emu.fault("drop"):
            self.close_connection = True
            return True
        return False

    def do_PUT(self) -> None:
        self._discard_body()
        if self._dropped():
            return
        path = self.path.split("?", 1)[0]
        if path != "/latest/api/token":
            self._error(405)
            return
        self.emu.count("token_puts", path)
        delay = self.emu.fault("put_delay")
        if delay:
            time.sleep(delay)
        forced = self.emu.fault("put_status")
        if forced:
            self._error(forced)
            return
        if self.headers.get("X-Forwarded-For") is not None:
            self.emu.count("forbidden")
            self._error(403)
            return
        ttl = self.headers.get(TTL_HEADER, "")
        if not ttl.strip().isdigit() or not 1 <= int(ttl) <= MAX_TTL:
            self._error(400)
            return
        token = self.emu.issue(int(ttl))
        self._limit_hops()
        self._send(200, token, {TTL_HEADER: str(int(ttl))})

    def _limit_hops(self) -> None:
        """Send the rest of this connection, the PUT's answer first, with the hop limit as TTL. It stays so:
        a retransmission with a larger TTL would deliver what the limit is there to stop."""
        sock = self.connection
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, self.emu.hop_limit)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, self.emu.hop_limit)

    def do_GET(self, head: bool = False) -> None:
        if self._dropped():
            return
        path = self.path.split("?", 1)[0]
        token = self.headers.get(TOKEN_HEADER)
        self.emu.count("requests", path)
        self.emu.count("tokenless" if token is None else "with_token")
        delay = self.emu.fault("get_delay")
        if delay:
            time.sleep(delay)
        extra: dict[str, str] = {}
        if token is not None:
            left = self.emu.remaining(token.strip())
            if left is None:
                self.emu.count("unauthorized")
                self._error(401, head)
                return
            extra[TTL_HEADER] = str(left)
        elif self.emu.tokens_required:
            self.emu.count("unauthorized")
            self._error(401, head)
            return
        body = self._resolve(path)
        if body is None:
            self.emu.count("not_found")
            self._error(404, head)
            return
        self._send(200, body, extra, head)

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def _resolve(self, path: str) -> Optional[str]:
        if path == "/":
            return "\n".join(VERSIONS)
        version, _, rest = path.lstrip("/").partition("/")
        if version not in VERSIONS:
            return None
        return lookup(self.emu.tree, rest)

    def _not_allowed(self) -> None:
        self._discard_body()
        self._error(405)

    do_POST = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT or [V6]:PORT."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT or [IPV6]:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the emulator until SIGTERM/SIGINT; print one JSON ready line on stdout once listening."""
    parser = argparse.ArgumentParser(prog="imds-emulator", description="EC2 instance metadata service emulator")
    parser.add_argument("--listen", action="append", type=parse_listen, metavar="HOST:PORT", required=True)
    parser.add_argument("--tokens", choices=("required", "optional"), default="required")
    parser.add_argument("--control", metavar="PATH", help="Unix socket for counters, reset and faults")
    parser.add_argument("--role", default="imds-agent-demo-role")
    parser.add_argument("--user-data", default=None)
    parser.add_argument("--hop-limit", type=int, default=1, help="HttpPutResponseHopLimit (IP TTL of PUT answers)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr)
    emu = Emulator(args.tokens, args.listen, args.role, args.user_data, args.hop_limit)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        emu.start()
    except OSError as exc:
        print(f"imds-emulator: cannot listen: {exc}", file=sys.stderr)
        return 1
    control = ControlServer(args.control, emu) if args.control else None
    if control is not None:
        control.start()
    ready = {"ready": True, "pid": os.getpid(), "listen": emu.addresses, "control": args.control}
    print(json.dumps(ready), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        if control is not None:
            control.stop()
        emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
