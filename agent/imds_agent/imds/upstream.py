"""The agent's HTTP/1.1 client for the metadata service: pooled keep-alive sockets and a small strict parser.

A request is written as one head with exactly the headers the caller gives (plus Host when it has none: HTTP/1.1
requires it), never a User-Agent, Accept-Encoding or X-Forwarded-For of the client library's own. The answer is
read whole (bodies are small: the largest, user-data, is 16 KiB) by Content-Length, or chunked, or to the close.
A connection the service marks `Connection: close` (the real service does so on 401 and 404) is not reused.

Why not urllib3 on this path: it cost about 340 us of the agent's CPU per request (a quarter of it parsing headers
through the email package), more than everything else the agent does for a request together.

Errors name their cause: refused or unreachable, a broken connection and a malformed answer are 502; a timeout
is 504. A pooled connection that the service had closed while idle is retried once on a new one, and only when
nothing of the answer had arrived.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

from ..config import UpstreamConfig
from ..errors import UpstreamError

Headers = list[tuple[str, str]]
MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024  # far above any metadata answer; a bound so a broken upstream cannot fill the memory
SO_MARK = getattr(socket, "SO_MARK", 36)


@dataclass(frozen=True)
class UpstreamResponse:
    """A complete answer from the metadata service."""

    status: int
    reason: str
    headers: Headers
    body: bytes


class _Broken(Exception):
    """The connection failed; ``fresh`` is False when it was a pooled one and nothing of the answer came back."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


class _Conn:
    """One keep-alive connection: its socket and the bytes read past the last answer."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.used = False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Upstream:
    """Sends requests to the metadata service over a bounded pool of keep-alive connections; thread-safe."""

    def __init__(self, config: UpstreamConfig, host: Optional[str] = None):
        self.host = host or (config.ipv6 if config.via == "ipv6" else config.ipv4)
        self.port = config.port
        self.connect_timeout = config.connect_timeout
        self.read_timeout = config.read_timeout
        self.mark = config.mark
        self.pool_size = config.pool_size
        self._idle: deque[_Conn] = deque()
        self._lock = threading.Lock()
        self._family = socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def host_header(self) -> str:
        """The Host header for requests that carry none: the address, with the port unless it is 80."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 else f"{host}:{self.port}"

    @property
    def netloc(self) -> str:
        """host:port as written in messages, with IPv6 literals bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def request(self, method: str, target: str, headers: Headers) -> UpstreamResponse:
        """Send one request and return the whole response; raise UpstreamError (502/504) naming the cause and
        never a header value."""
        head = self._head(method, target, headers)
        deadline = time.monotonic() + self.connect_timeout + self.read_timeout
        for attempt in range(2):
            conn = self._take() if attempt == 0 else None
            if conn is None:
                conn = self._connect()
            try:
                resp, reusable = self._exchange(conn, head, method == "HEAD", deadline)
            except _Broken as exc:
                conn.close()
                if exc.retryable and attempt == 0:
                    continue  # a pooled connection the service had closed while it sat idle
                raise UpstreamError(f"metadata service at {self.netloc} {exc}", 502) from None
            except socket.timeout:
                conn.close()
                raise UpstreamError(f"metadata service at {self.netloc} did not answer within "
                                    f"{self.read_timeout}s", 504) from None  # fmt: skip
            self._give_back(conn, reusable)
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            conns, self._idle = list(self._idle), deque()
        for conn in conns:
            conn.close()

    # --- connections ---------------------------------------------------------------------------------------
    def _connect(self) -> _Conn:
        sock = socket.socket(self._family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if self.mark:
                # Hosts whose policy routing lets only marked sockets reach 169.254.169.254 (systemd-imdsd).
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.connect_timeout)
            sock.connect((self.host, self.port))
        except socket.timeout:
            sock.close()
            raise UpstreamError(f"metadata service at {self.netloc} did not accept a connection within "
                                f"{self.connect_timeout}s", 504) from None  # fmt: skip
        except OSError as exc:
            sock.close()
            cause = exc.strerror or str(exc)
            raise UpstreamError(f"metadata service at {self.netloc} is unreachable: {cause}", 502) from None
        return _Conn(sock)

    def _take(self) -> Optional[_Conn]:
        with self._lock:
            return self._idle.pop() if self._idle else None

    def _give_back(self, conn: _Conn, reusable: bool) -> None:
        if reusable and not conn.buf:
            with self._lock:
                if len(self._idle) < self.pool_size:
                    self._idle.append(conn)
                    return
        conn.close()

    # --- one exchange --------------------------------------------------------------------------------------
    def _head(self, method: str, target: str, headers: Headers) -> bytes:
        lines = [f"{method} {target} HTTP/1.1"]
        seen: dict[str, int] = {}
        for name, value in headers:
            key = name.lower()
            if key in seen:  # a repeated header is joined, as http.client would
                lines[seen[key]] += ", " + value
                continue
            seen[key] = len(lines)
            lines.append(f"{name}: {value}")
        if "host" not in seen:
            lines.insert(1, f"Host: {self.host_header}")
        if method == "PUT" and "content-length" not in seen:
            lines.append("Content-Length: 0")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _exchange(self, conn: _Conn, head: bytes, head_only: bool, deadline: float) -> tuple[UpstreamResponse, bool]:
        pooled = conn.used
        conn.used = True
        try:
            conn.sock.settimeout(max(0.001, min(self.read_timeout, deadline - time.monotonic())))
            conn.sock.sendall(head)
            status_line, fields = self._read_head(conn, pooled)
        except (ConnectionError, BrokenPipeError) as exc:
            raise _Broken(f"broke the connection: {exc.strerror or exc}", pooled) from None
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise _Broken("sent a malformed status line", False)
        status, reason = int(parts[1]), parts[2] if len(parts) == 3 else ""
        values = {n.lower(): v for n, v in fields}
        closing = "close" in values.get("connection", "").lower() or parts[0] == "HTTP/1.0"
        try:
            if head_only or status in (204, 304) or 100 <= status < 200:
                body = b""
            elif "chunked" in values.get("transfer-encoding", "").lower():
                body = self._read_chunked(conn)
            elif "content-length" in values:
                length = values["content-length"].strip()
                if not length.isdigit() or int(length) > MAX_BODY:
                    raise _Broken("sent an invalid Content-Length", False)
                body = self._read_exactly(conn, int(length))
            else:
                body, closing = self._read_to_close(conn), True
        except ConnectionError as exc:
            raise _Broken(f"broke the connection: {exc.strerror or exc}", False) from None
        return UpstreamResponse(status, reason, fields, body), not closing

    def _recv(self, conn: _Conn) -> bytes:
        data = conn.sock.recv(65536)
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "closed by the metadata service")
        return data

    def _read_head(self, conn: _Conn, pooled: bool) -> tuple[str, Headers]:
        first = True
        while b"\r\n\r\n" not in conn.buf:
            if len(conn.buf) > MAX_HEAD:
                raise _Broken("sent a response head over 64 KiB", False)
            try:
                conn.buf += self._recv(conn)
            except ConnectionError:
                if first and not conn.buf:
                    raise _Broken("closed the connection before answering", pooled) from None
                raise
            first = False
        raw, conn.buf = conn.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        fields: Headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _Broken("sent a malformed header", False)
            fields.append((name, value.strip()))
        return lines[0], fields

    def _read_exactly(self, conn: _Conn, length: int) -> bytes:
        while len(conn.buf) < length:
            conn.buf += self._recv(conn)
        body, conn.buf = conn.buf[:length], conn.buf[length:]
        return body

    def _read_chunked(self, conn: _Conn) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in conn.buf:
                conn.buf += self._recv(conn)
            size_line, conn.buf = conn.buf.split(b"\r\n", 1)
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _Broken("sent a malformed chunk", False) from None
            if size == 0:
                while b"\r\n\r\n" not in b"\r\n" + conn.buf:  # trailers end with an empty line
                    conn.buf += self._recv(conn)
                conn.buf = (b"\r\n" + conn.buf).split(b"\r\n\r\n", 1)[1]
                return body
            if len(body) + size > MAX_BODY:
                raise _Broken("sent a body over 1 MiB", False)
            body += self._read_exactly(conn, size)
            self._read_exactly(conn, 2)  # the CRLF after the chunk

    def _read_to_close(self, conn: _Conn) -> bytes:
        chunks = [conn.buf]
        conn.buf = b""
        while True:
            data = conn.sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
            if sum(map(len, chunks)) > MAX_BODY:
                raise _Broken("sent a body over 1 MiB", False)
