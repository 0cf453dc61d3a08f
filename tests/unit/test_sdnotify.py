"""The systemd notify protocol: one datagram of newline-joined fields, abstract sockets, the watchdog interval."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from imds_agent.sdnotify import notify, watchdog_interval


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, at a path short enough for sockaddr_un (108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn-", dir="/tmp") as directory:
        path = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5.0)
            yield sock, path


def test_fields_go_to_notify_socket_as_one_datagram_joined_by_newlines(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("READY=1", "STATUS=forwarding on 127.0.0.1:8775") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=forwarding on 127.0.0.1:8775"


def test_a_leading_at_names_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"imds-agent-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("WATCHDOG=1") is True
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    def no_socket(*args: object, **kwargs: object) -> None:
        raise AssertionError("a socket was opened outside systemd")

    monkeypatch.setattr(socket, "socket", no_socket)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert notify("READY=1") is False


def test_a_failed_send_is_false_and_logged(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/imds-agent/notify")
    with caplog.at_level(logging.WARNING, logger="imds_agent.sdnotify"):
        assert notify("STOPPING=1") is False
    assert "cannot notify systemd at /nonexistent/imds-agent/notify" in caplog.text


def test_watchdog_interval_is_half_the_timeout_in_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0


def test_no_watchdog_when_it_is_for_another_pid_unset_or_not_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("", "-1", "3e7", "30 s"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert watchdog_interval() is None, bad
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None
