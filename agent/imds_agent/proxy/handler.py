"""One request, from parsed head to the bytes sent back: pass-through, token injection, refusal.

A request that already carries an IMDSv2 token is forwarded untouched (minus hop-by-hop headers). A tokenless
GET/HEAD (IMDSv1) gets the agent's cached token; if the metadata service rejects it with 401, the token is
discarded, refreshed once and the request retried once. The agent adds nothing else: no X-Forwarded-For,
Forwarded or Via, ever.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Protocol
from urllib.parse import urlsplit

from ..errors import UpstreamError
from ..imds.token import TOKEN_HEADER, TOKEN_PATH, TokenCache
from ..imds.upstream import Headers, Upstream, UpstreamResponse
from ..policy.paths import MetadataPath
from .httpio import HttpError, Request, error_response, render_response

log = logging.getLogger(__name__)

# RFC 9110 7.6.1 hop-by-hop headers, plus Content-Length which we always compute ourselves.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
# Headers that say a proxy relayed the request: the SSRF pattern IMDSv2 exists to stop. Such a request never
# gets the agent's token.
RELAY_HEADERS = ("x-forwarded-for", "forwarded", "via")


@dataclass
class Exchange:
    """What happened to one request: for logs, the audit record and metrics. Holds no header values."""

    method: str
    target: str
    kind: str  # "v1" (no token), "v2" (client token), "token" (token PUT), "invalid"
    status: int = 0
    injected: bool = False
    relayed: bool = False
    retried: bool = False
    cause: Optional[str] = None
    latency: float = 0.0
    user_agent: Optional[str] = None
    decision: str = "allow"  # allow | deny | would-deny (audit mode)
    decided_by: str = ""
    reason: str = ""
    path: Optional[MetadataPath] = None

    @property
    def shown_path(self) -> str:
        """The path as logs and records show it: normalized when it could be, never the query string (a client
        may put anything there, secrets included)."""
        return self.path.display if self.path is not None else self.target.partition("?")[0][:200]


class Gate(Protocol):
    """Decides whether a request may be forwarded (policy, SSRF guard); see proxy/gate.py."""

    def admit(self, context: dict[str, Any], req: Request, target: str, ex: Exchange) -> bool:
        """Return whether to inject the agent's token into a tokenless request; raise HttpError(403) to deny."""
        ...


@dataclass
class Reply:
    """The bytes to send and whether to close the connection afterwards."""

    data: bytes
    close: bool
    exchange: Exchange


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Drop hop-by-hop headers and any header the Connection header names."""
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP and n.lower() not in named]


def origin_form(target: str) -> str:
    """The path and query of a request target; absolute-form (http://host/path) is accepted as RFC 9112 asks."""
    if target.startswith("/"):
        return target
    if target.lower().startswith("http://"):
        parts = urlsplit(target)
        path = parts.path or "/"
        return f"{path}?{parts.query}" if parts.query else path
    raise HttpError(400, "request target must be a path")


class Forwarder:
    """Turns client requests into upstream requests; thread-safe, shared by every connection."""

    def __init__(self, upstream: Upstream, tokens: TokenCache, gate: Optional[Gate] = None):
        self.upstream = upstream
        self.tokens = tokens
        self.gate = gate

    def handle(self, req: Request, context: Optional[dict[str, Any]] = None) -> Reply:
        """Answer one request. Never raises: every failure becomes an HTTP answer naming its cause."""
        started = time.perf_counter()
        has_token = req.has(TOKEN_HEADER)
        ex = Exchange(req.method, req.target, "v2" if has_token else "v1", user_agent=req.get("User-Agent"))
        if req.method == "PUT":
            ex.kind = "token"
        head_only = req.method == "HEAD"
        close = not req.keep_alive
        try:
            target = origin_form(req.target)
            _refuse_body(req)
            inject = True
            if self.gate is not None:
                inject = self.gate.admit(context if context is not None else {}, req, target, ex)
                if ex.path is not None:
                    target = ex.path.canonical_target(target)
            resp = self._dispatch(req, target, ex, inject)
            headers = strip_hop_by_hop(resp.headers)
            length = _content_length(resp) if head_only else None
            data = render_response(
                resp.status, resp.reason, headers, resp.body, head_only=head_only, close=close, content_length=length
            )
            ex.status = resp.status
        except HttpError as exc:
            ex.status, ex.cause = exc.status, exc.message
            close = close or exc.status == 400
            data = error_response(exc.status, exc.message, head_only=head_only, close=close)
        except UpstreamError as exc:
            ex.status, ex.cause = exc.status, str(exc)
            data = error_response(exc.status, str(exc), head_only=head_only, close=close)
        ex.latency = time.perf_counter() - started
        return Reply(data, close, ex)

    def _dispatch(self, req: Request, target: str, ex: Exchange, inject: bool = True) -> UpstreamResponse:
        headers = strip_hop_by_hop(req.headers)
        if req.method == "PUT":
            return self._token_put(target, headers, req)
        if req.method not in ("GET", "HEAD"):
            raise HttpError(405, f"method {req.method} is not allowed")
        if ex.kind == "v2":
            return self.upstream.request(req.method, target, headers)
        if any(req.has(name) for name in RELAY_HEADERS):
            # Relayed by something on this host (a proxy turned SSRF vector): let the metadata service decide.
            ex.relayed = True
            log.warning("tokenless request carrying proxy headers for %s: forwarded without a token", ex.shown_path)
            return self.upstream.request(req.method, target, headers)
        if not inject:
            # The policy says this caller must speak IMDSv2 itself: let the metadata service answer it.
            return self.upstream.request(req.method, target, headers)
        return self._inject(req.method, target, headers, ex)

    def _token_put(self, target: str, headers: Headers, req: Request) -> UpstreamResponse:
        if urlsplit(target).path != TOKEN_PATH:
            raise HttpError(405, f"PUT is only allowed on {TOKEN_PATH}")
        if req.has("X-Forwarded-For"):
            # The metadata service refuses these as well; refusing here keeps the request off the wire.
            raise HttpError(403, "token requests carrying X-Forwarded-For are refused")
        return self.upstream.request("PUT", target, headers)

    def _inject(self, method: str, target: str, headers: Headers, ex: Exchange) -> UpstreamResponse:
        token = self.tokens.get()
        ex.injected = True
        resp = self.upstream.request(method, target, headers + [(TOKEN_HEADER, token)])
        if resp.status != 401:
            return resp
        # The token was revoked or expired early: one refresh, one retry, never a loop.
        self.tokens.invalidate(token)
        token = self.tokens.get()
        ex.retried = True
        return self.upstream.request(method, target, headers + [(TOKEN_HEADER, token)])


def _refuse_body(req: Request) -> None:
    if req.has("Transfer-Encoding"):
        raise HttpError(400, "request bodies are not accepted")
    lengths = {v.strip() for n, v in req.headers if n.lower() == "content-length"}
    if not lengths:
        return
    if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
        raise HttpError(400, "invalid Content-Length")
    if int(lengths.pop()) != 0:
        raise HttpError(400, "request bodies are not accepted")


def _content_length(resp: UpstreamResponse) -> int:
    for name, value in resp.headers:
        if name.lower() == "content-length" and value.strip().isdigit():
            return int(value)
    return len(resp.body)
