"""The redirect over the agent's lifetime: install once the listener is up, keep in place, undo as fail_mode says.

fail_mode open: the metadata service must stay reachable when the agent is gone, even after SIGKILL. Where the
backend can tie its rules to the agent (nftables on a kernel with table ownership), the kernel drops them when
the process dies; elsewhere (iptables, and nftables on kernels before 5.12) a small guardian process (started
while still root) removes the rules when the agent's end of a pipe closes without a goodbye. On SIGTERM the agent
removes the rules itself.

fail_mode closed: the rules persist when the agent stops or dies, so nothing but the agent's own uid reaches the
metadata service while it is down (clients get connection refused instead of unfiltered access).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Any, Callable, Optional

from ..config import RedirectConfig, UpstreamConfig
from ..errors import AgentError, RedirectError
from .base import Backend, RedirectSpec
from .registry import select_backend

log = logging.getLogger(__name__)


def spec_for(
    redirect: RedirectConfig,
    upstream: UpstreamConfig,
    exempt_uid: int,
    listen_port: int,
    container_ifaces: tuple[str, ...] = (),
    container_port: int = 0,
) -> RedirectSpec:
    """The redirect the configuration asks for, towards a listener on ``listen_port`` (and, for connections
    entering on ``container_ifaces``, the container listener on ``container_port``). IPv6 is left out on a
    host that has it switched off: the agent cannot listen on [::1] there, so a rule would only refuse clients."""
    with_ipv6 = redirect.ipv6 and ipv6_loopback_available()
    if redirect.ipv6 and not with_ipv6:
        log.warning("IPv6 is disabled on this host: requests to [%s] are not redirected", upstream.ipv6)
    return RedirectSpec(
        exempt_uid=exempt_uid,
        listen_port=listen_port,
        ipv4=upstream.ipv4,
        ipv6=upstream.ipv6,
        port=upstream.port,
        with_ipv6=with_ipv6,
        container_ifaces=container_ifaces if container_port else (),
        container_port=container_port,
    )


def remove_on_stop(load_redirect: Callable[[], RedirectConfig]) -> tuple[bool, str]:
    """Whether the rules go when the service stops (the unit's ExecStopPost, `rules remove --if-fail-open`), and
    why. Only fail_mode closed keeps them; a configuration that cannot be read counts as open, because the
    metadata service must not stay cut off by accident."""
    try:
        fail_mode = load_redirect().fail_mode
    except AgentError as exc:
        return True, f"cannot read the configuration ({exc}); removing the rules"
    if fail_mode == "closed":
        return False, "fail_mode closed: rules kept"
    return True, "fail_mode open: removing the rules"


def ipv6_loopback_available() -> bool:
    """Whether this network namespace can listen on [::1] (not so with ipv6.disable=1 or disable_ipv6 on lo)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as exc:
        if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            return False
        raise
    return True


class Interception:
    """Owns the backend, the guardian (when needed) and the reconciler for one agent run."""

    def __init__(self, config: RedirectConfig, spec: RedirectSpec, backend: Optional[Backend] = None):
        self.config = config
        self.spec = spec
        self.backend = backend if backend is not None else select_backend(config.backend, config.cgroup or None)
        self.fail_open = config.fail_mode == "open"
        # A backend that can tie its rules to this process needs no guardian for fail-open.
        self.owned = self.fail_open and self.backend.can_own()
        self._guardian: Any = None
        self._reconciler: Any = None

    def install(self) -> float:
        """Apply the rules (and arm the guardian first where one is needed); return the time taken in seconds."""
        if self.spec.container_ifaces and not self.backend.containers:
            raise RedirectError(
                f"containers.enabled needs a netfilter backend; {self.backend.name} does not intercept containers "
                "yet (set redirect.backend: nftables or iptables, or containers.enabled: false)"
            )
        if self.fail_open and not self.owned:
            from .guardian import start_guardian

            self._guardian = start_guardian(self.backend.name)
        started = time.monotonic()
        self.backend.apply(self.spec, owned=self.owned)
        elapsed = time.monotonic() - started
        log.info(
            "redirect installed with %s in %.1f ms (exempt uid %d, to port %d, ipv6 %s, fail_mode %s)",
            self.backend.name,
            elapsed * 1000,
            self.spec.exempt_uid,
            self.spec.listen_port,
            "on" if self.spec.with_ipv6 else "off",
            self.config.fail_mode,
        )
        return elapsed

    def start_reconciler(self) -> None:
        """Check the rules every reconcile_interval seconds and repair them (not started when the interval is 0)."""
        from .reconcile import Reconciler

        self._reconciler = Reconciler(self.backend, self.spec, self.owned, self.config.reconcile_interval)
        self._reconciler.start()

    def problem(self) -> Optional[str]:
        """Why the rules are no longer being held (the reconciler thread ended), or None."""
        if self._reconciler is not None and not self._reconciler.alive():
            return "the reconciler thread has ended"
        return None

    @property
    def repairs(self) -> int:
        """How many times the reconciler had to re-apply the rules."""
        return int(self._reconciler.repairs) if self._reconciler is not None else 0

    def shutdown(self) -> None:
        """Stop reconciling; remove the rules when failing open, keep them when failing closed."""
        steps = [("stop the reconciler", self._stop_reconciler)]
        if self.fail_open:
            steps.append(("remove the redirect rules", self._remove))
        else:
            log.info("fail_mode closed: leaving the redirect rules in place")
        steps.append(("release the guardian", self._stop_guardian))
        steps.append(("close the backend", self.backend.close))
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("cannot %s", what)

    def _stop_reconciler(self) -> None:
        if self._reconciler is not None:
            self._reconciler.stop()

    def _remove(self) -> None:
        if self.backend.remove():
            log.info("redirect rules removed")

    def _stop_guardian(self) -> None:
        if self._guardian is not None:
            self._guardian.stop()
            self._guardian = None
