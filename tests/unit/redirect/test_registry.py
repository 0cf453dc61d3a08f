"""The backend registry: names, and which backend `auto` picks on which host."""

from __future__ import annotations

import pytest

from imds_agent.errors import UnsupportedError
from imds_agent.redirect import iptables, registry


class Fake:
    def __init__(self, name: str, supported: bool) -> None:
        self.name = name
        self.supported = supported
        self.closed = False

    def is_supported(self) -> bool:
        return self.supported

    def unsupported_reason(self) -> str:
        return f"no {self.name} here"

    def close(self) -> None:
        self.closed = True


def host(monkeypatch: pytest.MonkeyPatch, supported: dict[str, bool], legacy: bool = False) -> list[Fake]:
    made: list[Fake] = []

    def make(name: str, cgroup: str | None = None) -> Fake:
        made.append(Fake(name, supported[name]))
        return made[-1]

    monkeypatch.setattr(registry, "make_backend", make)
    monkeypatch.setattr(iptables, "legacy_rules_in_use", lambda: legacy)
    return made


def test_auto_prefers_the_first_supported_backend_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    host(monkeypatch, {"nftables": True, "iptables": True})
    assert registry.select_backend("auto").name == "nftables"
    made = host(monkeypatch, {"nftables": False, "iptables": True})
    assert registry.select_backend("auto").name == "iptables" and made[0].closed


def test_auto_follows_a_host_that_already_uses_legacy_iptables(monkeypatch: pytest.MonkeyPatch) -> None:
    host(monkeypatch, {"nftables": True, "iptables": True}, legacy=True)
    assert registry.select_backend("auto").name == "iptables"


def test_no_working_backend_names_what_each_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    host(monkeypatch, {"nftables": False, "iptables": False})
    with pytest.raises(UnsupportedError, match="nftables: no nftables here; iptables: no iptables here"):
        registry.select_backend("auto")


def test_a_named_backend_is_used_or_refused_but_never_swapped(monkeypatch: pytest.MonkeyPatch) -> None:
    host(monkeypatch, {"nftables": True, "iptables": False})
    with pytest.raises(UnsupportedError, match="redirect backend iptables: no iptables here"):
        registry.select_backend("iptables")


def test_unknown_names_are_refused_and_the_choices_are_one_list() -> None:
    with pytest.raises(UnsupportedError, match="unknown redirect backend 'pf'"):
        registry.make_backend("pf")
    assert registry.CHOICES == ("auto", *registry.BACKEND_NAMES)
    assert [registry.make_backend(n).name for n in registry.BACKEND_NAMES] == list(registry.BACKEND_NAMES)
