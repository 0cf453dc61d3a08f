"""What every redirect backend shares: the spec of what to redirect, the state found, and the Backend protocol.

A backend turns a RedirectSpec into kernel rules. It builds the rule set as data first (a pure function, tested
against golden files), then applies it in one step, and it only ever touches objects it owns (its own nftables
table, its own iptables chain and the single jump to it).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Protocol

#: Name of the nftables table and the iptables chain; also the comment on every rule we own.
OWNER_NAME = "imds_agent"
IPTABLES_CHAIN = "IMDS_AGENT"


@dataclass(frozen=True)
class RedirectSpec:
    """What to redirect: TCP to the metadata addresses, from every uid but ``exempt_uid``, to the listener."""

    exempt_uid: int
    listen_port: int
    ipv4: str = "169.254.169.254"
    ipv6: str = "fd00:ec2::254"
    port: int = 80
    to_ipv4: str = "127.0.0.1"
    to_ipv6: str = "::1"
    with_ipv6: bool = True
    # Containers with network namespaces of their own: their connections enter the host on these interfaces
    # (names, or prefixes ending in '*') and are redirected, on arrival, to the container listener's port.
    container_ifaces: tuple[str, ...] = ()
    container_port: int = 0


class State(enum.Enum):
    """How much of the spec the kernel holds."""

    ABSENT = "absent"
    PARTIAL = "partial"
    PRESENT = "present"


@dataclass(frozen=True)
class RuleView:
    """One installed rule as an operator sees it, with its packet counters when the kernel reports them."""

    family: str  # "ipv4" or "ipv6"
    text: str  # human form, e.g. nft or iptables-save syntax
    packets: Optional[int] = None
    bytes: Optional[int] = None


@dataclass(frozen=True)
class CheckResult:
    """The state of our rules against a spec, with what differs (``details``) and what is installed (``rules``)."""

    backend: str
    state: State
    details: tuple[str, ...] = ()
    rules: tuple[RuleView, ...] = field(default_factory=tuple)
    owned: Optional[bool] = None  # nftables: the table vanishes with the agent's netlink socket


class Backend(Protocol):
    """A way of installing the redirect in the kernel, and what it needs of the host to keep it there."""

    name: str
    #: Capabilities (privileges.CAP_*) the running agent keeps to repair and inspect these rules.
    capabilities: tuple[int, ...]
    #: Whether it carries ``container_ifaces`` (the prerouting redirect for containers' own namespaces).
    containers: bool

    def can_own(self) -> bool:
        """Whether the rules can belong to this process, so that the kernel removes them when it dies (fail_mode
        open without a guardian). Probed once, on first use."""
        ...

    def is_supported(self) -> bool:
        """Whether this host's kernel and userland can carry this backend."""
        ...

    def unsupported_reason(self) -> str:
        """When not supported: what is missing, named so that an operator can fix it ('' when supported)."""
        ...

    def apply(self, spec: RedirectSpec, owned: bool = False) -> None:
        """Install the rules for ``spec`` in one step, replacing any earlier version of ours; idempotent.

        ``owned`` ties the rules to this process where the backend can (fail-open on SIGKILL).
        Raises RedirectError on failure, leaving the previous state in place.
        """
        ...

    def remove(self) -> bool:
        """Remove everything this backend owns; idempotent. Returns whether anything was removed."""
        ...

    def check(self, spec: Optional[RedirectSpec] = None) -> CheckResult:
        """Compare the kernel against ``spec`` (or just report what is installed when None)."""
        ...

    def close(self) -> None:
        """Release resources (netlink sockets); for an owned nftables table this removes the rules."""
        ...
