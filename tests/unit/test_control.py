"""The control socket: one JSON request, one JSON answer; unknown commands and junk get an error, not a crash."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from imds_agent.control import ControlServer, ask


def answers(command: str) -> object:
    if command == "status":
        return {"mode": "enforce"}
    raise KeyError(command)


def test_a_request_gets_its_answer_and_junk_gets_an_error(tmp_path: Path) -> None:
    path = str(tmp_path / "control.sock")
    server = ControlServer(path, answers, os.getuid(), os.getgid())
    assert server.bind()
    server.start()
    try:
        assert ask("status", path) == {"mode": "enforce"}
        assert ask("frobnicate", path) is None
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
            sock.sendall(b"not json")
            assert b"expected" in sock.recv(4096)
        assert os.stat(path).st_mode & 0o777 == 0o660
    finally:
        server.close()
    assert not os.path.exists(path) and ask("status", path) is None  # no agent: None, quickly


def test_a_missing_directory_means_no_control_socket_not_a_failed_start(tmp_path: Path, caplog) -> None:
    server = ControlServer(str(tmp_path / "missing" / "control.sock"), answers, os.getuid(), os.getgid())
    assert not server.bind() and "status and report read the saved files" in caplog.text
    server.start()
    server.close()
