"""Interception: ownership follows fail_mode and what the backend can do; shutdown removes only when failing open;
the stop-time decision of `rules remove --if-fail-open`."""

from __future__ import annotations

from typing import Optional

import pytest

from imds_agent.config import RedirectConfig, UpstreamConfig
from imds_agent.errors import ConfigError, RedirectError
from imds_agent.redirect import guardian
from imds_agent.redirect.base import CheckResult, RedirectSpec, State
from imds_agent.redirect.lifecycle import Interception, remove_on_stop, spec_for


class FakeBackend:
    capabilities = (12,)

    def __init__(self, name: str, owns: bool = True, containers: bool = True):
        self.name = name
        self.owns = owns
        self.containers = containers
        self.calls: list[str] = []

    def can_own(self) -> bool:
        return self.owns

    def apply(self, spec: RedirectSpec, owned: bool = False) -> None:
        self.calls.append(f"apply owned={owned}")

    def remove(self) -> bool:
        self.calls.append("remove")
        return True

    def check(self, spec: Optional[RedirectSpec] = None) -> CheckResult:
        return CheckResult(self.name, State.PRESENT)

    def close(self) -> None:
        self.calls.append("close")


def test_spec_follows_the_configuration() -> None:
    spec = spec_for(RedirectConfig(ipv6=False), UpstreamConfig(port=8080), exempt_uid=990, listen_port=9000)
    assert (spec.exempt_uid, spec.listen_port, spec.port, spec.with_ipv6) == (990, 9000, 8080, False)
    assert spec.ipv4 == "169.254.169.254" and spec.ipv6 == "fd00:ec2::254"


def test_container_interfaces_reach_the_spec_only_with_a_container_listener() -> None:
    up = UpstreamConfig()
    spec = spec_for(RedirectConfig(), up, 990, 968, ("docker*",), 969)
    assert (spec.container_ifaces, spec.container_port) == (("docker*",), 969)
    assert spec_for(RedirectConfig(), up, 990, 968, ("docker*",), 0).container_ifaces == ()


def test_a_backend_that_cannot_intercept_containers_refuses_a_container_spec_before_any_rule() -> None:
    # Containers would silently bypass the agent: refusing to start says so instead.
    backend = FakeBackend("ebpf", containers=False)
    spec = RedirectSpec(exempt_uid=990, listen_port=968, container_ifaces=("docker*",), container_port=969)
    icpt = Interception(RedirectConfig(fail_mode="closed", reconcile_interval=0), spec, backend)  # type: ignore[arg-type]
    with pytest.raises(RedirectError, match="containers.enabled needs a netfilter backend; ebpf"):
        icpt.install()
    assert backend.calls == []


@pytest.mark.parametrize(
    ("fail_mode", "expected"),
    [("open", ["apply owned=True", "remove", "close"]), ("closed", ["apply owned=False", "close"])],
)
def test_a_backend_that_can_own_its_rules_owns_them_only_when_failing_open(fail_mode: str, expected: list[str]) -> None:
    backend = FakeBackend("nftables")
    spec = RedirectSpec(exempt_uid=990, listen_port=8775)
    icpt = Interception(RedirectConfig(fail_mode=fail_mode, reconcile_interval=0), spec, backend)  # type: ignore[arg-type]
    icpt.install()
    icpt.start_reconciler()
    icpt.shutdown()
    assert backend.calls == expected


def test_a_failing_shutdown_step_does_not_skip_the_rest() -> None:
    backend = FakeBackend("nftables")

    def broken() -> bool:
        raise RuntimeError("netlink gone")

    backend.remove = broken  # type: ignore[method-assign]
    spec = RedirectSpec(exempt_uid=990, listen_port=8775)
    icpt = Interception(RedirectConfig(reconcile_interval=0), spec, backend)  # type: ignore[arg-type]
    icpt.install()
    icpt.shutdown()
    assert backend.calls[-1] == "close"


class FakeGuardian:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def stop(self) -> None:
        self.calls.append("guardian stop")


def test_a_backend_that_cannot_own_its_rules_fails_open_through_the_guardian(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = FakeBackend("nftables", owns=False)  # e.g. nftables on a kernel before 5.12
    started: list[str] = []

    def start(name: str) -> FakeGuardian:
        started.append(name)
        backend.calls.append("guardian start")
        return FakeGuardian(backend.calls)

    monkeypatch.setattr(guardian, "start_guardian", start)
    spec = RedirectSpec(exempt_uid=990, listen_port=8775)
    icpt = Interception(RedirectConfig(fail_mode="open", reconcile_interval=0), spec, backend)  # type: ignore[arg-type]
    assert not icpt.owned
    icpt.install()
    icpt.shutdown()
    assert started == ["nftables"]
    assert backend.calls == ["guardian start", "apply owned=False", "remove", "guardian stop", "close"]


def test_failing_closed_never_needs_the_guardian(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guardian, "start_guardian", lambda name: pytest.fail("no guardian when failing closed"))
    backend = FakeBackend("iptables", owns=False)
    spec = RedirectSpec(exempt_uid=990, listen_port=8775)
    Interception(RedirectConfig(fail_mode="closed", reconcile_interval=0), spec, backend).install()  # type: ignore[arg-type]


def test_rules_go_at_stop_unless_fail_mode_is_closed() -> None:
    remove, why = remove_on_stop(lambda: RedirectConfig(fail_mode="open"))
    assert remove and "fail_mode open" in why
    remove, why = remove_on_stop(lambda: RedirectConfig(fail_mode="closed"))
    assert not remove and why == "fail_mode closed: rules kept"


def test_an_unreadable_configuration_counts_as_open_at_stop() -> None:
    def broken() -> RedirectConfig:
        raise ConfigError("mapping values are not allowed here", path="/etc/imds-agent/agent.yaml", line=3)

    remove, why = remove_on_stop(broken)
    assert remove and "cannot read the configuration" in why and "agent.yaml" in why
