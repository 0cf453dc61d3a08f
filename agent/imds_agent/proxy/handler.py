"""One request, from parsed head to the bytes sent back: the agent's own checks, the gate's Verdict, the forward.

The agent's own protocol checks come first and answer by themselves (a body, a target that is not a path, a PUT
anywhere but the token resource, a token PUT carrying X-Forwarded-For, a method other than GET/HEAD/PUT): such a
request is REFUSED and never reaches the policy. Then the gate decides once, and this module acts on its Verdict
without judging again: a denial gets the 403 the Verdict carries; otherwise the request goes upstream by the
path the policy judged. A request with the client's own IMDSv2 token is forwarded untouched (minus hop-by-hop
headers); a tokenless GET/HEAD gets the agent's cached token when the Verdict says so, and if the metadata
service rejects it with 401 the token is refreshed once and the request retried once. The agent adds nothing
else: no X-Forwarded-For, Forwarded or Via, ever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol
from urllib.parse import urlsplit

from ..errors import UpstreamError
from ..imds.cache import ResponseCache
from ..imds.protocol import TOKEN_HEADER, TOKEN_PATH
from ..imds.token import TokenCache
from ..imds.upstream import Headers, Upstream, UpstreamResponse
from ..policy.paths import MetadataPath, PathError, normalize
from .httpio import HttpError, Request, error_response, render_response
from .types import Answer, Client, Kind, Outcome, Verdict

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


class Gate(Protocol):
    """Decides each request once (policy, SSRF guard); see proxy/gate.py."""

    @property
    def mode(self) -> str:
        """The mode in force."""
        ...

    def judge(self, client: Client, req: Request, path: MetadataPath, kind: Kind) -> Verdict:
        """The one Verdict for ``req`` from ``client``."""
        ...


@dataclass(frozen=True)
class Reply:
    """The bytes to send, whether to close the connection afterwards, and the record of what they say."""

    data: bytes
    close: bool
    answer: Answer


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


def kind_of(req: Request) -> Kind:
    """The protocol a request speaks: a token PUT, the client's own token, or none."""
    if req.method == "PUT":
        return Kind.TOKEN
    return Kind.V2 if req.has(TOKEN_HEADER) else Kind.V1


def check_request(req: Request, target: str) -> None:
    """The agent's own checks, before any policy: raise HttpError for what it never forwards."""
    _refuse_body(req)
    if req.method == "PUT":
        if urlsplit(target).path != TOKEN_PATH:
            raise HttpError(405, f"PUT is only allowed on {TOKEN_PATH}")
        if req.has("X-Forwarded-For"):
            # The metadata service refuses these as well; refusing here keeps the request off the wire.
            raise HttpError(403, "token requests carrying X-Forwarded-For are refused")
    elif req.method not in ("GET", "HEAD"):
        raise HttpError(405, f"method {req.method} is not allowed")


def classify(target: str) -> MetadataPath:
    """The classified path of an origin-form target; what cannot be classified with certainty is refused (400)
    in every mode and never forwarded, so no spelling can be judged one way and served another."""
    try:
        return normalize(target)
    except PathError as exc:
        raise HttpError(400, f"refused path: {exc}") from None


class Forwarder:
    """Turns client requests into upstream requests and Answers; thread-safe, shared by every connection."""

    def __init__(self, upstream: Upstream, tokens: TokenCache, gate: Gate, clock: Callable[[], float] = time.time,
                 cache: Optional[ResponseCache] = None):  # fmt: skip
        self.upstream = upstream
        self.tokens = tokens
        self.gate = gate
        self.clock = clock
        self.cache = cache

    def refusal(self, client: Client, error: HttpError, kind: Kind = Kind.INVALID, req: Optional[Request] = None,
                latency: float = 0.0) -> Answer:  # fmt: skip
        """The Answer for a request the agent answered itself (before or instead of the policy)."""
        return Answer(
            self.clock(), self.gate.mode, client, req.method if req else "", req.target if req else "", kind,
            error.status, Outcome.REFUSED, decided_by="agent", reason=error.message, cause=error.message,
            latency=latency, user_agent=req.get("User-Agent") if req else None,
        )  # fmt: skip

    def handle(self, req: Request, client: Client) -> Reply:
        """Answer one request. Never raises: every failure becomes an HTTP answer naming its cause."""
        started = time.perf_counter()
        kind = kind_of(req)
        head_only = req.method == "HEAD"
        close = not req.keep_alive
        try:
            if client.refused:
                raise HttpError(403, client.refused)
            target = origin_form(req.target)
            check_request(req, target)
            path = classify(target)
        except HttpError as exc:
            close = close or exc.status == 400
            data = error_response(exc.status, exc.message, head_only=head_only, close=close)
            return Reply(data, close, self.refusal(client, exc, kind, req, time.perf_counter() - started))
        verdict = self.gate.judge(client, req, path, kind)
        # Upstream gets exactly the path the policy judged, rebuilt from its classified parts.
        target = path.canonical_target()
        injected = retried = cached = False
        cause: Optional[str] = None
        if not verdict.forwards:
            status = 403
            data = error_response(403, verdict.message, head_only=head_only, close=close)
        else:
            try:
                resp, injected, retried, cached = self._forward(req, target, kind, verdict)
                length = _content_length(resp) if head_only else None
                data = render_response(resp.status, resp.reason, strip_hop_by_hop(resp.headers), resp.body,
                                       head_only=head_only, close=close, content_length=length)  # fmt: skip
                status = resp.status
            except UpstreamError as exc:
                status, cause = exc.status, str(exc)
                data = error_response(exc.status, cause, head_only=head_only, close=close)
        answer = Answer(
            self.clock(), verdict.mode, client, req.method, req.target, kind, status, verdict.outcome,
            verdict.decided_by, verdict.reason, verdict.path, injected, verdict.relayed, retried, cause,
            time.perf_counter() - started, req.get("User-Agent"), cached=cached,
        )  # fmt: skip
        return Reply(data, close, answer)

    def _forward(self, req: Request, target: str, kind: Kind, verdict: Verdict) -> tuple[
            UpstreamResponse, bool, bool, bool]:  # fmt: skip
        """Send upstream as the Verdict says; return the response, whether a token was injected, whether the
        request was retried with a fresh one, and whether the answer came from the cache."""
        headers = strip_hop_by_hop(req.headers)
        if kind is not Kind.V1 or not verdict.inject:
            # The client's own token or token request, a relayed request, or a caller that must speak IMDSv2
            # itself: the metadata service answers it as sent.
            return self.upstream.request(req.method, target, headers), False, False, False
        path = verdict.path
        if self.cache is not None and req.method == "GET" and self.cache.cacheable(path):
            retried = [False]

            def forward() -> UpstreamResponse:
                resp, _, retried[0] = self._inject(req.method, target, headers)
                return resp

            resp, hit = self.cache.fetch(target, path, forward)
            return resp, True, retried[0], hit
        resp, injected, again = self._inject(req.method, target, headers)
        return resp, injected, again, False

    def _inject(self, method: str, target: str, headers: Headers) -> tuple[UpstreamResponse, bool, bool]:
        """A tokenless request sent with the agent's token: (response, injected, retried with a fresh token)."""
        token = self.tokens.get()
        resp = self.upstream.request(method, target, headers + [(TOKEN_HEADER, token)])
        if resp.status != 401:
            return resp, True, False
        # The token was revoked or expired early: one refresh, one retry, never a loop.
        self.tokens.invalidate(token)
        token = self.tokens.get()
        return self.upstream.request(method, target, headers + [(TOKEN_HEADER, token)]), True, True


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
