"""Prometheus metrics from the per-answer records, served on a unix socket or a loopback port, or written in the
node_exporter textfile form. Off unless `metrics:` is configured.

Every sample comes from the one Answer per request the recorder sees, plus a few gauges read from the agent when
scraped. Labels are bounded sets only (never an executable or a raw path): the IMDS protocol, the outcome and the
path's sensitive class. prometheus_client is imported here only, and only when metrics are on, so a host without
it runs the agent all the same.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Optional

from ..config import MetricsConfig
from ..errors import UnsupportedError
from ..proxy.types import Answer, Kind, Outcome

log = logging.getLogger(__name__)

MAX_SCRAPES = 4
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class AgentState:
    """What the gauges show, read from the running agent at each scrape."""

    version: str
    mode: str
    backend: str
    fail_mode: str
    token_expires_at: Optional[float]  # wall-clock time, None without a token
    redirect: dict[str, bool]  # family -> installed
    rule_repairs: int
    audit_dropped: int
    audit_suppressed: int


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise UnsupportedError(
            "metrics are configured but prometheus_client is not installed (Debian/Ubuntu: python3-prometheus-client;"
            " elsewhere: pip install prometheus_client)"
        ) from None
    return prometheus_client


class Metrics:
    """The agent's registry: counters and histograms fed one Answer at a time, gauges read when collected."""

    def __init__(self, state: Callable[[], AgentState]):
        prom = _client()
        self._prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("imds_agent_requests", "Requests answered, by IMDS protocol, decision and "
                                     "sensitive class", ["imds", "decision", "class"], registry=r)  # fmt: skip
        self.injections = prom.Counter("imds_agent_token_injections", "Requests sent upstream with the agent's "
                                       "token", registry=r)  # fmt: skip
        self.upstream_errors = prom.Counter("imds_agent_upstream_errors", "Upstream failures answered 502/504, by "
                                            "kind", ["kind"], registry=r)  # fmt: skip
        self.cache_hits = prom.Counter("imds_agent_cache_hits", "Requests answered from the agent's cache of "
                                       "metadata answers", registry=r)  # fmt: skip
        self.unidentified = prom.Counter("imds_agent_unidentified_callers", "Requests from callers that could not "
                                         "be identified", registry=r)  # fmt: skip
        self.latency = prom.Histogram("imds_agent_request_duration_seconds", "Time from a request's head to its "
                                      "answer", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.identify = prom.Histogram("imds_agent_identification_duration_seconds", "Time to find a connection's "
                                       "caller", buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        r.register(_StateCollector(state))

    def observe(self, answer: Answer) -> None:
        """Count one Answer."""
        cls = answer.path.sensitive if answer.path is not None and answer.path.sensitive else "none"
        self.requests.labels(answer.kind.value, answer.outcome.value, cls).inc()
        if answer.injected:
            self.injections.inc()
        if answer.cached:
            self.cache_hits.inc()
        if answer.cause is not None and answer.outcome is not Outcome.REFUSED:
            self.upstream_errors.labels("timeout" if answer.status == 504 else "unreachable").inc()
        if not answer.caller.known:
            self.unidentified.inc()
        if answer.kind is not Kind.INVALID:
            self.latency.observe(answer.latency)
        if answer.client.identify_seconds:
            self.identify.observe(answer.client.identify_seconds)

    def text(self) -> bytes:
        """The exposition text of every metric."""
        data: bytes = self._prom.generate_latest(self.registry)
        return data

    def write_textfile(self, directory: str) -> None:
        """node_exporter's textfile form: imds_agent.prom in ``directory``, replaced atomically."""
        self._prom.write_to_textfile(os.path.join(directory, "imds_agent.prom"), self.registry)


class _StateCollector:
    """Gauges read from the agent at collection time."""

    def __init__(self, state: Callable[[], AgentState]):
        from prometheus_client import core

        self._core = core
        self._state = state

    def collect(self) -> Iterator[Any]:
        core, s = self._core, self._state()
        info = core.InfoMetricFamily("imds_agent", "The running agent", value={
            "version": s.version, "mode": s.mode, "backend": s.backend, "fail_mode": s.fail_mode})  # fmt: skip
        yield info
        expiry = core.GaugeMetricFamily("imds_agent_token_expiry_timestamp_seconds", "When the agent's cached "
                                        "IMDSv2 token expires (0: no token)")  # fmt: skip
        expiry.add_metric([], s.token_expires_at or 0.0)
        yield expiry
        redirect = core.GaugeMetricFamily("imds_agent_redirect_installed", "Whether the redirect is in place, by "
                                          "address family (1 yes, 0 no)", labels=["family"])  # fmt: skip
        for family, installed in sorted(s.redirect.items()):
            redirect.add_metric([family], 1.0 if installed else 0.0)
        yield redirect
        for name, doc, value in (
            ("imds_agent_rule_repairs", "Times the reconciler re-applied the redirect", s.rule_repairs),
            ("imds_agent_audit_records_dropped", "Audit records that could not be written", s.audit_dropped),
            ("imds_agent_audit_records_suppressed", "Audit records over a uid's budget", s.audit_suppressed),
        ):
            counter = core.CounterMetricFamily(name, doc)
            counter.add_metric([], float(value))
            yield counter


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsHTTPServer
    timeout = 5  # a scraper that sends nothing is dropped instead of holding a thread and a descriptor

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = self.server.metrics.text()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""

    def address_string(self) -> str:
        return "metrics client"


class _MetricsHTTPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Any, family: int, metrics: Metrics):
        self.address_family = family
        self.metrics = metrics
        self._scrapes = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """At most MAX_SCRAPES at once: a local user opening connections to a loopback port gets no thread each."""
        if not self._scrapes.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._scrapes.release()


class MetricsService:
    """The metrics of one agent run: bound while privileged, served once threads may start, saved with the rest."""

    def __init__(self, metrics: Metrics, listen: str, textfile_dir: str, gid: Optional[int] = None):
        self.metrics = metrics
        self.listen = listen
        self.textfile_dir = textfile_dir
        self._server: Optional[_MetricsHTTPServer] = bind(metrics, listen, gid) if listen else None

    def start(self) -> None:
        """Start serving (after privileges were dropped: capabilities are per thread)."""
        if self._server is not None:
            threading.Thread(target=self._server.serve_forever, name="imds-metrics", daemon=True).start()
            log.info("metrics served on %s", self.listen)

    def save(self) -> None:
        """Write the textfile form, when configured; a failure is logged, never raised."""
        if self.textfile_dir:
            try:
                self.metrics.write_textfile(self.textfile_dir)
            except OSError as exc:
                log.error("cannot write the metrics textfile in %s: %s", self.textfile_dir, exc.strerror)

    def close(self) -> None:
        """Stop serving, and write the textfile a last time."""
        self.save()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def bind(metrics: Metrics, listen: str, gid: Optional[int] = None) -> _MetricsHTTPServer:
    """Bind /metrics on ``listen``: ``unix:/path`` (mode 0660) or ``127.0.0.1:PORT`` / ``[::1]:PORT``."""
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        server = _MetricsHTTPServer(path, socket.AF_UNIX, metrics)
        os.chmod(path, 0o660)
        if gid is not None and os.geteuid() == 0:
            os.chown(path, 0, gid)
    else:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = _MetricsHTTPServer((host, int(port)), family, metrics)
    return server


def service(config: MetricsConfig, state: Callable[[], AgentState], gid: Optional[int]) -> Optional[MetricsService]:
    """The metrics service the configuration asks for, bound now; None when metrics are off."""
    if not config.listen and not config.textfile_dir:
        return None
    return MetricsService(Metrics(state), config.listen, config.textfile_dir, gid)
