"""subproc.run: fixed PATH, timeouts and failures become ProcessError with the command and stderr."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from imds_agent import subproc


def test_path_is_fixed_and_failures_carry_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen.update(kw, argv=argv)
        return subprocess.CompletedProcess(argv, 3, "", "warning\nnft: no such table\n")

    monkeypatch.setattr(subprocess, "run", fake)
    with pytest.raises(subproc.ProcessError) as info:
        subproc.run(["nft", "list", "table", "inet", "x"], env={"X": "1"})
    assert seen["env"] == {"PATH": subproc.PATH, "LANG": "C", "X": "1"} and seen["argv"][0] == "nft"
    assert info.value.code == 3 and "no such table" in str(info.value) and "exited with 3" in str(info.value)
    assert subproc.run(["nft"], check=False).returncode == 3


def test_timeout_and_missing_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(argv: list[str], **kw: Any) -> Any:
        raise subprocess.TimeoutExpired(argv, kw["timeout"], stderr=b"partial")

    monkeypatch.setattr(subprocess, "run", slow)
    with pytest.raises(subproc.ProcessError, match="timed out after 2s"):
        subproc.run(["sleep", "9"], timeout=2)

    def missing(argv: list[str], **kw: Any) -> Any:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(subproc.ProcessError, match="could not be started: No such file"):
        subproc.run(["nope"])
