"""Interception: ownership follows fail_mode and backend; shutdown removes only when failing open."""

from __future__ import annotations

from typing import Optional

import pytest

from imds_agent.config import RedirectConfig, UpstreamConfig
from imds_agent.redirect.base import CheckResult, RedirectSpec, State
from imds_agent.redirect.lifecycle import Interception, spec_for


class Recorder:
    def __init__(self, name: str):
        self.name = name
        self.calls: list[str] = []

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


@pytest.mark.parametrize(
    ("fail_mode", "expected"),
    [("open", ["apply owned=True", "remove", "close"]), ("closed", ["apply owned=False", "close"])],
)
def test_nftables_owns_the_table_only_when_failing_open(fail_mode: str, expected: list[str]) -> None:
    backend = Recorder("nftables")
    spec = RedirectSpec(exempt_uid=990, listen_port=8775)
    icpt = Interception(RedirectConfig(fail_mode=fail_mode, reconcile_interval=0), spec, backend)  # type: ignore[arg-type]
    icpt.install()
    icpt.start_reconciler()
    icpt.shutdown()
    assert backend.calls == expected


def test_a_failing_shutdown_step_does_not_skip_the_rest() -> None:
    backend = Recorder("nftables")

    def broken() -> bool:
        raise RuntimeError("netlink gone")

    backend.remove = broken  # type: ignore[method-assign]
    spec = RedirectSpec(exempt_uid=990, listen_port=8775)
    icpt = Interception(RedirectConfig(reconcile_interval=0), spec, backend)  # type: ignore[arg-type]
    icpt.install()
    icpt.shutdown()
    assert backend.calls[-1] == "close"
