"""The redirect backends by name, and the one place that decides which one `auto` picks on this host."""

from __future__ import annotations

import logging
from typing import Optional

from ..errors import UnsupportedError
from .base import Backend

log = logging.getLogger(__name__)

AUTO = "auto"
#: Every backend, in the order `auto` prefers them.
BACKEND_NAMES = ("nftables", "iptables")
#: Backends that can be named but that `auto` never picks (ebpf: connect hooks, off until it is complete).
EXPERIMENTAL = ("ebpf",)
#: What `redirect.backend` may say.
CHOICES = (AUTO, *BACKEND_NAMES)


def make_backend(name: str, cgroup: Optional[str] = None) -> Backend:
    """Instantiate a backend by name without probing it."""
    if name == "nftables":
        from .nftables import NftablesBackend

        return NftablesBackend()
    if name == "iptables":
        from .iptables import IptablesBackend

        return IptablesBackend()
    if name == "ebpf":
        from .ebpf import EbpfBackend

        return EbpfBackend(cgroup=cgroup)
    raise UnsupportedError(f"unknown redirect backend {name!r} (choose {', '.join(CHOICES)})")


def select_backend(name: str, cgroup: Optional[str] = None) -> Backend:
    """Pick the backend for this host: the configured one, or for ``auto`` the first supported in BACKEND_NAMES,
    except that a host already using legacy iptables nat rules gets iptables (mixing the two on one host makes
    rule order impossible to reason about).

    Raises UnsupportedError naming what is missing.
    """
    if name != AUTO:
        backend = make_backend(name, cgroup)
        if not backend.is_supported():
            raise UnsupportedError(f"redirect backend {name}: {backend.unsupported_reason()}")
        return backend
    from .iptables import legacy_rules_in_use

    order = list(BACKEND_NAMES)
    if legacy_rules_in_use():
        log.info("host uses legacy iptables nat rules; preferring the iptables backend")
        order.remove("iptables")
        order.insert(0, "iptables")
    reasons = []
    for candidate in order:
        backend = make_backend(candidate)
        if backend.is_supported():
            return backend
        reasons.append(f"{candidate}: {backend.unsupported_reason()}")
        backend.close()
    raise UnsupportedError(f"no redirect backend works here: {'; '.join(reasons)}")
