"""agent.yaml -> frozen, validated dataclasses.

Every key has a default, so an absent or empty file gives a working agent. A wrong value is an error naming the
file, line and key; it never falls back to a default, because for a security control a silent default is a hole.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from . import yamlsrc
from .errors import ConfigError
from .policy.model import DEFAULT_SETTING, DEFAULTS, UNKNOWN_SETTING
from .redirect.registry import CHOICES as BACKENDS
from .redirect.registry import EXPERIMENTAL as EXPERIMENTAL_BACKENDS

log = logging.getLogger(__name__)

DEFAULT_PATH = "/etc/imds-agent/agent.yaml"
MODES = ("audit", "enforce")
DEFAULT_PORT = 968
FAIL_MODES = ("open", "closed")
MAX_TOKEN_TTL = 21600


def _check(ok: bool, key: str | tuple[str, ...], message: str) -> None:
    if not ok:
        raise _FieldError(key, message)


class _FieldError(ValueError):
    """A bad value; ``key`` is the field, or a path below the dataclass for checks that span sections."""

    def __init__(self, key: str | tuple[str, ...], message: str):
        self.key = key if isinstance(key, tuple) else (key,)
        super().__init__(message)


def _ip(value: str, version: int, key: str) -> None:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise _FieldError(key, f"not an IP address: {value!r}") from None
    _check(addr.version == version, key, f"not an IPv{version} address: {value!r}")


def _port(value: int, key: str) -> None:
    _check(1 <= value <= 65535, key, f"port must be 1..65535, got {value}")


def _timeout(value: float, key: str) -> None:
    _check(0 < value <= 300, key, f"must be > 0 and <= 300 seconds, got {value}")


@dataclass(frozen=True)
class ListenConfig:
    """Where the forwarder listens and how it treats its clients."""

    # Below 1024, so that only root (or CAP_NET_BIND_SERVICE) can bind it: an ordinary user who took the port
    # while the agent restarts would answer every redirected client. 0 picks a free port at start (tests).
    port: int = DEFAULT_PORT
    addresses: tuple[str, ...] = ("127.0.0.1", "::1")
    allow_unprivileged_port: bool = False  # the operator accepts that a local user could take a port >= 1024
    max_connections: int = 512
    max_connections_per_uid: int = 64  # one user cannot hold every slot
    reserved_connections: int = 32  # of max_connections, only for root and the uids the policy names
    idle_timeout: float = 30.0  # a keep-alive connection with no new request is closed after this
    request_timeout: float = 5.0  # a request's line and headers must arrive within this (slow clients -> 408)

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, "port", f"port must be 0..65535, got {self.port}")
        _check(
            self.port < 1024 or self.allow_unprivileged_port,
            "port",
            f"port {self.port} can be bound by any local user, who could answer the redirected clients while the "
            "agent restarts; choose a port below 1024 or set listen.allow_unprivileged_port: true",
        )
        _check(len(self.addresses) > 0, "addresses", "needs at least one address")
        for addr in self.addresses:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise _FieldError("addresses", f"not an IP address: {addr!r}") from None
        _check(1 <= self.max_connections <= 65536, "max_connections", "must be 1..65536")
        _check(1 <= self.max_connections_per_uid <= 65536, "max_connections_per_uid", "must be 1..65536")
        _check(
            0 <= self.reserved_connections < self.max_connections,
            "reserved_connections",
            "must be 0 or more and fewer than max_connections",
        )
        _timeout(self.idle_timeout, "idle_timeout")
        _timeout(self.request_timeout, "request_timeout")


@dataclass(frozen=True)
class UpstreamConfig:
    """The metadata service the agent forwards to."""

    ipv4: str = "169.254.169.254"
    ipv6: str = "fd00:ec2::254"
    port: int = 80
    # Together under the SDKs' 1 s timeout: the agent answers 504 before the client gives up and retries, which
    # would multiply the load on a metadata service exactly when it is slow (throttled at 1024 packets/s).
    connect_timeout: float = 0.25
    read_timeout: float = 0.7
    pool_size: int = 16
    via: str = "ipv4"  # which address the agent itself uses: ipv6 on IPv6-only instances
    mark: int = 0  # SO_MARK on the agent's own upstream sockets, for hosts whose policy routing needs one; 0: none

    def __post_init__(self) -> None:
        _check(self.via in ("ipv4", "ipv6"), "via", f"must be ipv4 or ipv6; got {self.via!r}")
        _ip(self.ipv4, 4, "ipv4")
        _ip(self.ipv6, 6, "ipv6")
        _port(self.port, "port")
        _timeout(self.connect_timeout, "connect_timeout")
        _timeout(self.read_timeout, "read_timeout")
        _check(1 <= self.pool_size <= 1024, "pool_size", "must be 1..1024")
        _check(0 <= self.mark <= 0xFFFFFFFF, "mark", "must be 0..4294967295")


@dataclass(frozen=True)
class TokenConfig:
    """Lifetime of the agent's own IMDSv2 session token."""

    ttl: int = MAX_TOKEN_TTL
    refresh_margin: int = 300

    def __post_init__(self) -> None:
        _check(1 <= self.ttl <= MAX_TOKEN_TTL, "ttl", f"must be 1..{MAX_TOKEN_TTL} seconds, got {self.ttl}")
        _check(0 <= self.refresh_margin < self.ttl, "refresh_margin", "must be >= 0 and less than ttl")


@dataclass(frozen=True)
class RedirectConfig:
    """The kernel rules that send local metadata traffic to the agent."""

    enabled: bool = True
    backend: str = "auto"
    ipv6: bool = True
    fail_mode: str = "open"
    reconcile_interval: float = 5.0  # 0 turns the reconciler off
    cgroup: str = ""  # ebpf: the cgroup v2 directory the hooks attach to ("" : the hierarchy's root, every process)

    def __post_init__(self) -> None:
        known = (*BACKENDS, *EXPERIMENTAL_BACKENDS)
        _check(self.backend in known, "backend", f"must be one of {', '.join(known)}; got {self.backend!r}")
        _check(self.fail_mode in FAIL_MODES, "fail_mode", f"must be open or closed; got {self.fail_mode!r}")
        _check(
            self.fail_mode == "open" or self.backend not in EXPERIMENTAL_BACKENDS,
            "fail_mode",
            f"the {self.backend} backend (experimental) cannot keep its hooks without the agent yet: use open",
        )
        _check(0 <= self.reconcile_interval <= 3600, "reconcile_interval", "must be 0..3600 seconds")
        _check(not self.cgroup or os.path.isabs(self.cgroup), "cgroup", "must be an absolute path")


@dataclass(frozen=True)
class PolicyConfig:
    """Where the allowlist lives and what happens to callers no rule matches."""

    dir: str = "/etc/imds-agent/policy.d"
    default: str = DEFAULT_SETTING  # callers no rule matches
    unknown: str = UNKNOWN_SETTING  # callers that cannot be identified (enforce mode)

    def __post_init__(self) -> None:
        for key in ("default", "unknown"):
            value = getattr(self, key)
            _check(value in DEFAULTS, key, f"must be one of {', '.join(DEFAULTS)}; got {value!r}")
        _check(os.path.isabs(self.dir), "dir", "must be an absolute path")


@dataclass(frozen=True)
class AuditConfig:
    """The audit log and the persistent inventory."""

    log: str = "/var/log/imds-agent/audit.jsonl"
    state_dir: str = "/var/lib/imds-agent"
    max_bytes: int = 50 * 1024 * 1024
    backups: int = 5
    # Audit lines a second (after a burst) that one uid other than root may write; 0: unbounded.
    rate_per_uid: float = 50.0
    burst_per_uid: int = 500
    require_persistence: bool = False  # true: refuse to start when the log or state directory cannot be written

    def __post_init__(self) -> None:
        _check(os.path.isabs(self.log), "log", "must be an absolute path")
        _check(0 <= self.rate_per_uid <= 100000, "rate_per_uid", "must be 0..100000 lines a second (0: unbounded)")
        _check(1 <= self.burst_per_uid <= 1000000, "burst_per_uid", "must be 1..1000000")
        _check(os.path.isabs(self.state_dir), "state_dir", "must be an absolute path")
        _check(self.max_bytes >= 4096, "max_bytes", "must be at least 4096")
        _check(0 <= self.backups <= 100, "backups", "must be 0..100")


@dataclass(frozen=True)
class CacheConfig:
    """The cache of metadata answers for IMDSv1 requests (imds/cache.py)."""

    enabled: bool = True
    static_ttl: float = 300.0  # seconds for answers that do not change while the instance runs
    credentials_ttl: float = 10.0  # at most, for role credentials (and never past Expiration minus 5 minutes)

    def __post_init__(self) -> None:
        _check(0 < self.static_ttl <= 86400, "static_ttl", "must be 0..86400 seconds (use enabled: false to stop)")
        _check(0 <= self.credentials_ttl <= 300, "credentials_ttl", "must be 0..300 seconds (0: never cached)")


@dataclass(frozen=True)
class IdentityConfig:
    """How the agent finds who is calling."""

    budget: float = 0.25  # seconds one connection's identification may take; past it the caller is unidentified

    def __post_init__(self) -> None:
        _check(0.001 <= self.budget <= 5.0, "budget", "must be 0.001..5 seconds")


_IFACE = re.compile(r"[A-Za-z0-9_.@-]{1,15}\*?")
# Where containers' connections enter the host: Docker's bridges (docker0, br-<id> for user networks), podman's
# (podman0, netavark) and LXD's, CNI bridges and pod veths (cni0, cbr0, Calico's cali*, Cilium's lxc*, the AWS VPC
# CNI's eni*, Weave's, Antrea's gateway) and plain veths.
CONTAINER_IFACES = ("docker*", "br-*", "podman*", "lxdbr*", "cni*", "cbr0", "cali*", "lxc*", "eni*", "weave",
                    "antrea-gw*", "veth*")  # fmt: skip


@dataclass(frozen=True)
class ContainersConfig:
    """Containers with network namespaces of their own: intercepted where their connections enter the host."""

    enabled: bool = True  # the ebpf backend cannot carry it yet: set false there
    interfaces: tuple[str, ...] = CONTAINER_IFACES  # names, or prefixes ending in '*'
    port: int = 969  # the container listener, on every address; serves only what the redirect sent it
    docker_root: str = "/var/lib/docker"  # Docker's data root: containers/<id>/config.v2.json
    containerd_state: str = "/run/containerd"  # containerd's state: io.containerd.runtime.v2.task/<ns>/<id>
    containerd_namespaces: tuple[str, ...] = ("default",)  # where `ctr run` containers are (k8s.io is always)

    def __post_init__(self) -> None:
        _check(len(self.interfaces) > 0, "interfaces", "needs at least one interface (or enabled: false)")
        for name in self.interfaces:
            _check(
                bool(_IFACE.fullmatch(name)) and name.rstrip("*") not in ("", "lo"),
                "interfaces",
                f"not an interface name or prefix*: {name!r} (up to 15 characters; never lo or a bare '*')",
            )
        _check(0 <= self.port <= 65535, "port", f"port must be 0..65535, got {self.port}")
        _check(os.path.isabs(self.docker_root), "docker_root", "must be an absolute path")
        _check(os.path.isabs(self.containerd_state), "containerd_state", "must be an absolute path")


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics: off unless one of these is set."""

    listen: str = ""  # unix:/run/imds-agent/metrics.sock, or 127.0.0.1:PORT / [::1]:PORT (never the listener's)
    textfile_dir: str = ""  # node_exporter's textfile collector directory: imds_agent.prom, replaced atomically

    def __post_init__(self) -> None:
        if self.listen.startswith("unix:"):
            _check(os.path.isabs(self.listen[5:]), "listen", "a unix socket needs an absolute path: unix:/path")
        elif self.listen:
            host, _, port = self.listen.rpartition(":")
            try:
                loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
            except ValueError:
                loopback = False
            _check(loopback, "listen", "must be unix:/path or a loopback address:port (metrics are not for others)")
            _check(port.isdigit() and 0 < int(port) < 65536, "listen", "needs a port 1..65535")
        _check(not self.textfile_dir or os.path.isabs(self.textfile_dir), "textfile_dir", "must be an absolute path")


@dataclass(frozen=True)
class Config:
    """The whole agent configuration; ``source`` is the file it came from (None: built-in defaults)."""

    mode: str = "audit"
    user: str = "imds-agent"
    listen: ListenConfig = field(default_factory=ListenConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    token: TokenConfig = field(default_factory=TokenConfig)
    redirect: RedirectConfig = field(default_factory=RedirectConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    containers: ContainersConfig = field(default_factory=ContainersConfig)
    control_socket: str = "/run/imds-agent/control.sock"  # status/report/rules show ask the running agent here
    source: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.mode in MODES, "mode", f"must be audit or enforce; got {self.mode!r}")
        _check(bool(self.user), "user", "must not be empty")
        _check(os.path.isabs(self.control_socket), "control_socket", "must be an absolute path")
        port = self.metrics.listen.rpartition(":")[2]
        _check(
            self.metrics.listen.startswith("unix:") or not port.isdigit() or int(port) != self.listen.port,
            ("metrics", "listen"),
            "must not be the listener's port, where the redirect sends clients",
        )
        _check(
            not self.containers.enabled or self.containers.port == 0 or self.containers.port != self.listen.port,
            ("containers", "port"),
            "must not be the host listener's port",
        )
        if self.redirect.enabled:
            # The redirect sends clients to loopback on the listen port; nothing else would receive them.
            listening = {ipaddress.ip_address(a) for a in self.listen.addresses}
            _check(
                ipaddress.ip_address("127.0.0.1") in listening,
                ("listen", "addresses"),
                "must include 127.0.0.1, where the redirect sends IPv4 clients",
            )
            _check(
                not self.redirect.ipv6 or ipaddress.ip_address("::1") in listening,
                ("listen", "addresses"),
                "must include ::1, where the redirect sends IPv6 clients (or set redirect.ipv6: false)",
            )

    def with_mode(self, mode: str) -> Config:
        """Return a copy in ``mode`` (the CLI's audit/enforce subcommand overrides the file)."""
        return dataclasses.replace(self, mode=mode)


def _convert(value: Any, default: Any, doc: yamlsrc.Document, keypath: yamlsrc.KeyPath) -> Any:
    """Check ``value`` against the type of the field's default and convert lists to tuples."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise doc.error(keypath, f"must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise doc.error(keypath, f"must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise doc.error(keypath, f"must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str) or default is None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise doc.error(keypath, f"must be a string, got the number {value!r} (quote it: '{value}')")
        if not isinstance(value, str):
            raise doc.error(keypath, f"must be a string, got {value!r}")
        return value
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise doc.error(keypath, "must be a list of strings")
        return tuple(value)
    raise doc.error(keypath, "unsupported value")  # pragma: no cover - every field has one of the above types


def _build(cls: type[Any], data: Any, doc: yamlsrc.Document, keypath: yamlsrc.KeyPath) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise doc.error(keypath, "must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = keypath + (str(key),)
        if key not in fields:
            raise doc.error(sub, f"unknown key (known: {', '.join(sorted(fields))})")
        f = fields[key]
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            kwargs[key] = _build(type(default), value, doc, sub)
        else:
            kwargs[key] = _convert(value, default, doc, sub)
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        raise doc.error(keypath + exc.key, str(exc)) from None


def from_document(doc: yamlsrc.Document) -> Config:
    """Validate a parsed agent.yaml document into a Config."""
    config: Config = _build(Config, doc.data, doc, ())
    return dataclasses.replace(config, source=doc.path)


# Parts a reload cannot change in a running agent (sockets, rules, files, threads were made from them).
RESTART_ONLY = ("listen", "upstream", "redirect", "user", "audit", "token", "identity", "cache", "metrics",
                "containers", "control_socket")  # fmt: skip


def reread(running: Config) -> Config:
    """The configuration from ``running``'s file again (SIGHUP), warning about parts that need a restart."""
    config = load(running.source, required=True) if running.source else Config()
    for part in RESTART_ONLY:
        if getattr(config, part) != getattr(running, part):
            log.warning("reload: %s settings changed; they take effect at the next restart", part)
    return config


def load(path: str = DEFAULT_PATH, required: bool = False) -> Config:
    """Load agent.yaml from ``path``.

    A missing file at the default path means built-in defaults; with ``required`` (an explicit ``--config``)
    it is an error, since the operator named a file that is not there.
    """
    if not os.path.exists(path):
        if required:
            raise ConfigError("no such file", path=path)
        return Config()
    return from_document(yamlsrc.load(path))
