"""Which capabilities the agent keeps, and giving up the rest without ever failing the start."""

from __future__ import annotations

import io
import logging

import pytest

from imds_agent import privileges
from imds_agent.errors import PrivilegeError
from imds_agent.redirect.iptables import IptablesBackend
from imds_agent.redirect.nftables import NftablesBackend

ALL4 = (1 << 2) | (1 << 12) | (1 << 13) | (1 << 19)  # DAC_READ_SEARCH, NET_ADMIN, NET_RAW, SYS_PTRACE


def test_the_kept_capabilities_are_identitys_plus_what_the_backend_asks_for() -> None:
    iptables = privileges.caps_for(IptablesBackend.capabilities)
    assert privileges.CAP_NET_RAW in iptables and privileges.CAP_NET_ADMIN in iptables
    for backend_caps in (NftablesBackend.capabilities, None):
        kept = privileges.caps_for(backend_caps)
        assert privileges.CAP_NET_RAW not in kept
        assert {privileges.CAP_NET_ADMIN, privileges.CAP_SYS_PTRACE, privileges.CAP_DAC_READ_SEARCH} == set(kept)
    # Decided by what the backend declares, not by its name.
    assert privileges.CAP_NET_RAW in privileges.caps_for((privileges.CAP_NET_RAW,))


def test_settle_as_root_drops_to_the_account_and_keeps_only_what_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr(privileges, "drop_to", lambda account, keep: calls.append(("drop", account.uid, keep)))
    monkeypatch.setattr(privileges, "limit_to", lambda keep: calls.append(("limit", keep)))
    privileges.settle(privileges.Account(998, 998, "imds-agent"), (12,))
    assert calls == [("drop", 998, (12,))]
    calls.clear()
    monkeypatch.setattr("os.geteuid", lambda: 998)
    monkeypatch.setattr(privileges, "missing_caps", lambda keep: [])
    privileges.settle(privileges.Account(998, 998, "imds-agent"), (12,))
    assert calls == [("limit", (12,))]


def fake_status(monkeypatch: pytest.MonkeyPatch, prm: int) -> list[tuple[int, int, int]]:
    text = f"Name:\tpython3\nCapInh:\t{prm:016x}\nCapPrm:\t{prm:016x}\nCapEff:\t{prm:016x}\nCapBnd:\t{prm:016x}\n"
    real_open = open

    def fake_open(path: str, *args: object, **kwargs: object) -> object:
        if path == "/proc/thread-self/status":
            return io.StringIO(text)
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(privileges, "_capset", lambda p, e, i: calls.append((p, e, i)))
    return calls


def test_limit_to_lowers_every_set_to_what_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_status(monkeypatch, ALL4)
    privileges.limit_to(privileges.caps_for(NftablesBackend.capabilities))
    want = (1 << 2) | (1 << 12) | (1 << 19)
    assert calls == [(want, want, want)]


def test_limit_to_does_nothing_when_nothing_is_surplus(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_status(monkeypatch, (1 << 12) | (1 << 19))
    privileges.limit_to(privileges.caps_for(NftablesBackend.capabilities))
    assert calls == []


def test_a_forbidden_capset_is_a_warning_not_a_failed_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_status(monkeypatch, ALL4)

    def refused(p: int, e: int, i: int) -> None:
        raise PrivilegeError("capset failed: Operation not permitted")

    monkeypatch.setattr(privileges, "_capset", refused)
    with caplog.at_level(logging.WARNING):
        privileges.limit_to(privileges.caps_for(NftablesBackend.capabilities))
    assert "could not give up CAP_NET_RAW" in caplog.text
