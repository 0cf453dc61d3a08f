"""Pooled HTTP client for the metadata service.

One urllib3 pool for the agent's lifetime: keep-alive connections are reused across client requests, which is
what keeps the latency the agent adds small. Nothing is added to a forwarded request but what the caller asks
for: urllib3's default User-Agent, Accept-Encoding and Host are suppressed unless the client sent its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    MaxRetryError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.util import SKIP_HEADER, Retry, Timeout

from ..config import UpstreamConfig
from ..errors import UpstreamError

log = logging.getLogger(__name__)
# urllib3 logs each request's full URL at DEBUG, query string included, and a client may put anything there:
# the agent never lets it below INFO, whatever the root logger says.
logging.getLogger("urllib3").setLevel(logging.INFO)

Headers = list[tuple[str, str]]

# Headers urllib3 or http.client would add on their own; SKIP_HEADER keeps them out unless the client sent them.
# Host is different: HTTP/1.1 requires it and strict servers (h11-based emulators among them) answer 400 without
# it, so a request that has none (the agent's own token requests, HTTP/1.0 clients) gets the upstream's address.
_SKIPPABLE = ("accept-encoding", "user-agent")


@dataclass(frozen=True)
class UpstreamResponse:
    """A complete answer from the metadata service (bodies are small: the largest, user-data, is 16 KiB)."""

    status: int
    reason: str
    headers: Headers
    body: bytes


class Upstream:
    """Sends requests to the metadata service over a bounded pool of keep-alive connections."""

    def __init__(self, config: UpstreamConfig, host: Optional[str] = None):
        self.host = host or (config.ipv6 if config.via == "ipv6" else config.ipv4)
        self.port = config.port
        self.timeout = Timeout(connect=config.connect_timeout, read=config.read_timeout)
        # No retries here: the handler decides what may be retried (a 401 once, with a fresh token); a silent
        # read retry would double the time a client waits for a 504.
        self._pool = urllib3.HTTPConnectionPool(
            self.host,
            self.port,
            maxsize=config.pool_size,
            block=False,
            timeout=self.timeout,
            retries=Retry(total=0, connect=0, read=0, redirect=0, status=0, other=0, raise_on_status=False),
        )

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
        """Send one request and return the whole response.

        Raises UpstreamError with status 502 (unreachable, connection broken) or 504 (timed out), whose message
        names the cause and never includes header values.
        """
        send: dict[str, str] = {}
        spelled: dict[str, str] = {}
        for name, value in headers:
            key = name.lower()
            # http.client would join duplicates anyway; IMDS requests carry no repeatable headers.
            if key in spelled:
                send[spelled[key]] += ", " + value
            else:
                spelled[key] = name
                send[name] = value
        for name in _SKIPPABLE:
            if name not in spelled:
                send[name] = SKIP_HEADER
        if "host" not in spelled:
            send["Host"] = self.host_header
        try:
            resp = self._pool.urlopen(
                method,
                target,
                headers=send,
                redirect=False,
                assert_same_host=False,
                preload_content=True,
                decode_content=False,
            )
        except MaxRetryError as exc:
            raise self._classify(exc.reason or exc) from None
        except HTTPError as exc:
            raise self._classify(exc) from None
        except OSError as exc:
            raise UpstreamError(f"metadata service at {self.netloc} failed: {exc.strerror or exc}", 502) from None
        return UpstreamResponse(
            status=resp.status,
            reason=resp.reason or "",
            headers=list(resp.headers.items()),
            body=resp.data or b"",
        )

    def _classify(self, exc: BaseException) -> UpstreamError:
        where = f"metadata service at {self.netloc}"
        # urllib3 2 makes NewConnectionError a subclass of ConnectTimeoutError, so a refused connection must be
        # told apart before the timeout test (refused is 502, timed out is 504).
        if isinstance(exc, NewConnectionError):
            cause = _errno_text(exc)
            return UpstreamError(f"{where} is unreachable: {cause}", 502)
        if isinstance(exc, ConnectTimeoutError):
            return UpstreamError(f"{where} did not accept a connection within {self.timeout.connect_timeout}s", 504)
        if isinstance(exc, ReadTimeoutError):
            return UpstreamError(f"{where} did not answer within {self.timeout.read_timeout}s", 504)
        if isinstance(exc, ProtocolError):
            return UpstreamError(f"{where} broke the connection: {_errno_text(exc)}", 502)
        return UpstreamError(f"{where} failed: {type(exc).__name__}", 502)

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.close()


def _errno_text(exc: BaseException) -> str:
    """The most specific OS-level reason inside a urllib3 exception, e.g. 'Connection refused'."""
    seen: Optional[BaseException] = exc
    while seen is not None:
        for arg in getattr(seen, "args", ()):
            if isinstance(arg, OSError) and arg.strerror:
                return arg.strerror
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return text.split(": ", 1)[-1] if ": " in text else text
