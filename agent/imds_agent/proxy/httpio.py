"""Reading HTTP/1.1 requests from a client socket and writing responses, with hard limits.

The agent runs as a privileged neighbour of every process on the host, so the parser is strict and small: a
deadline for the whole request head (slow clients get 408), 16 KiB and 100 lines of headers (431), no bodies
(there is nothing to upload to the metadata service), no obsolete line folding or whitespace before a colon
(both are request-smuggling vectors).
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADER_LINES = 100
MAX_REQUEST_LINE = 8 * 1024

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# What the start of a request can look like before its line is complete: optional empty lines, then a method
# token of at most 16 characters and, once it has arrived, the space after it.
_START = re.compile(rb"^(?:\r?\n)*[!#$%&'*+\-.^_`|~0-9A-Za-z]{0,16}(?: |$)")
_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """A request the agent answers itself with ``status`` and closes the connection after."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(f"{status} {message}")


@dataclass
class Request:
    """One parsed request head. Header names keep the client's spelling and order."""

    method: str
    target: str
    version: tuple[int, int]
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> Optional[str]:
        """The first value of header ``name`` (case-insensitive), or None."""
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def has(self, name: str) -> bool:
        """Whether header ``name`` is present at all, even empty."""
        return self.get(name) is not None

    @property
    def keep_alive(self) -> bool:
        """HTTP/1.1 defaults to persistent connections, HTTP/1.0 to closing, unless Connection says otherwise."""
        tokens = {t.strip().lower() for t in (self.get("Connection") or "").split(",")}
        if self.version >= (1, 1):
            return "close" not in tokens
        return "keep-alive" in tokens


class RequestReader:
    """Reads successive requests from one connection, keeping bytes that belong to the next (pipelining)."""

    def __init__(self, sock: socket.socket, idle_timeout: float, request_timeout: float):
        self._sock = sock
        self._idle = idle_timeout
        self._request = request_timeout
        self._buf = bytearray()

    @property
    def pending(self) -> bool:
        """Whether bytes of a next request have arrived already (pipelining)."""
        return bool(self._buf)

    def read(self, started: Optional[Callable[[], None]] = None) -> Optional[Request]:
        """Return the next request, or None when the client closed (or idled out) between requests.
        ``started`` is called once the first bytes of a request that was waited for have arrived."""
        if not self._buf:
            self._sock.settimeout(self._idle)
            try:
                chunk = self._sock.recv(65536)
            except (socket.timeout, ConnectionError):
                return None
            if not chunk:
                return None
            self._buf += chunk
            if started is not None:
                started()
        deadline = time.monotonic() + self._request
        while True:
            end, sep = _find_head_end(self._buf)
            if end > MAX_HEAD_BYTES:
                raise HttpError(431, f"request head exceeds {MAX_HEAD_BYTES} bytes")
            if end >= 0:
                head = bytes(self._buf[:end])
                del self._buf[: end + sep]
                return parse_head(head)
            if not _START.match(self._buf[:64]):
                # TLS, HTTP/2 frames or noise: answer now rather than when the head timeout runs out.
                raise HttpError(400, "not an HTTP/1.x request")
            if len(self._buf) > MAX_HEAD_BYTES:
                if self._buf.find(b"\n") < 0 and len(self._buf) > MAX_REQUEST_LINE:
                    raise HttpError(414, "request line too long")
                raise HttpError(431, f"request head exceeds {MAX_HEAD_BYTES} bytes")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HttpError(408, f"request head not received within {self._request:g}s")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise HttpError(408, f"request head not received within {self._request:g}s") from None
            if not chunk:
                raise HttpError(400, "connection closed in the middle of a request")
            self._buf += chunk


def _find_head_end(buf: bytearray) -> tuple[int, int]:
    """Index of the blank line ending the head and its length; bare LF line ends are accepted (RFC 9112 2.2)."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, 2
    return crlf, 4 if crlf >= 0 else 0


def parse_head(head: bytes) -> Request:
    """Parse a request line and headers; raise HttpError for anything malformed."""
    lines = head.split(b"\n")
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise HttpError(431, f"more than {MAX_HEADER_LINES} header lines")
    line = lines[0].rstrip(b"\r")
    if len(line) > MAX_REQUEST_LINE:
        raise HttpError(414, "request line too long")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1]:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise HttpError(400, "malformed method")
    match = _VERSION.match(version)
    if match is None:
        raise HttpError(400, "malformed HTTP version")
    major, minor = int(match.group(1)), int(match.group(2))
    if major != 1:
        raise HttpError(505, f"HTTP/{major}.{minor} is not supported")
    if any(b < 0x21 or b == 0x7F for b in target):
        raise HttpError(400, "control characters or spaces in the request target")
    headers = [_parse_header(raw.rstrip(b"\r")) for raw in lines[1:]]
    return Request(method.decode("ascii"), target.decode("latin-1"), (major, minor), headers)


def _parse_header(raw: bytes) -> tuple[str, str]:
    if raw[:1] in (b" ", b"\t"):
        raise HttpError(400, "obsolete header line folding")
    name, colon, value = raw.partition(b":")
    if not colon or not _TOKEN.match(name):
        raise HttpError(400, "malformed header line")
    if any((b < 0x20 and b != 0x09) or b == 0x7F for b in value):
        raise HttpError(400, "control characters in a header value")
    return name.decode("ascii"), value.strip(b" \t").decode("latin-1")


def render_response(
    status: int,
    reason: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    head_only: bool = False,
    close: bool = False,
    content_length: Optional[int] = None,
) -> bytes:
    """Serialize a response; Content-Length is always set by us, Connection: close when we will close."""
    out = [f"HTTP/1.1 {status} {reason or REASONS.get(status, '')}".rstrip()]
    out.extend(f"{name}: {value}" for name, value in headers)
    out.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    if close:
        out.append("Connection: close")
    data = ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")
    return data if head_only else data + body


def error_response(status: int, message: str, *, head_only: bool = False, close: bool = False) -> bytes:
    """A plain-text answer from the agent itself; the body names the cause for the operator reading it."""
    body = f"imds-agent: {message}\n".encode("utf-8", "replace")
    headers = [("Content-Type", "text/plain; charset=utf-8")]
    if status == 405:
        headers.append(("Allow", "GET, HEAD, PUT"))
    return render_response(status, REASONS.get(status, ""), headers, body, head_only=head_only, close=close)
