"""What every redirect backend shares: the spec of what to redirect, the state found, the protocol, the chooser.

A backend turns a RedirectSpec into kernel rules. It builds the rule set as data first (a pure function, tested
against golden files), then applies it in one step, and it only ever touches objects it owns (its own nftables
table, its own iptables chain and the single jump to it).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Optional, Protocol

from ..errors import UnsupportedError

log = logging.getLogger(__name__)

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
    """A way of installing the redirect in the kernel."""

    name: str

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


BACKENDS = ("nftables", "iptables")


def make_backend(name: str) -> Backend:
    """Instantiate a backend by name without probing it."""
    if name == "nftables":
        from .nftables import NftablesBackend

        return NftablesBackend()
    if name == "iptables":
        from .iptables import IptablesBackend

        return IptablesBackend()
    raise UnsupportedError(f"unknown redirect backend {name!r} (choose auto, {' or '.join(BACKENDS)})")


def select_backend(name: str) -> Backend:
    """Pick the backend for this host: the configured one, or for ``auto`` nftables unless the host already
    uses legacy iptables nat rules (mixing the two on one host makes rule order impossible to reason about).

    Raises UnsupportedError naming what is missing.
    """
    if name != "auto":
        backend = make_backend(name)
        if not backend.is_supported():
            raise UnsupportedError(f"redirect backend {name}: {backend.unsupported_reason()}")
        return backend
    from .iptables import legacy_rules_in_use

    if legacy_rules_in_use():
        ipt = make_backend("iptables")
        if ipt.is_supported():
            log.info("host uses legacy iptables nat rules; using the iptables backend")
            return ipt
    nft = make_backend("nftables")
    if nft.is_supported():
        return nft
    ipt = make_backend("iptables")
    if ipt.is_supported():
        return ipt
    raise UnsupportedError(
        f"no redirect backend works here: nftables: {nft.unsupported_reason()}; iptables: {ipt.unsupported_reason()}"
    )
