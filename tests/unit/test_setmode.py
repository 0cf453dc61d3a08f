"""set-mode edits one line, keeps comments and layout, refuses to write an invalid file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imds_agent import setmode
from imds_agent.errors import ConfigError
from imds_agent.setmode import edit_mode, set_mode

TEXT = "# operator's notes\nmode: audit   # switched by the rollout\nuser: imds-agent\n"


def test_mode_line_is_edited_in_place() -> None:
    assert edit_mode(TEXT, "enforce", "a.yaml") == TEXT.replace("mode: audit ", "mode: enforce ")


def test_missing_mode_is_appended_and_empty_file_gets_one() -> None:
    assert edit_mode("user: x", "enforce", "a.yaml") == "user: x\nmode: enforce\n"
    assert edit_mode("", "audit", "a.yaml") == "mode: audit\n"


def test_an_invalid_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("mode: audit\nredirect: {backend: bogus}\n")
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError, match="redirect.backend"):
        set_mode(str(path), "enforce", pid=None)
    assert path.read_text() == "mode: audit\nredirect: {backend: bogus}\n"


def test_set_mode_keeps_permissions_and_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(setmode, "reload_agent", lambda pid: f"reloaded {pid}")
    path = tmp_path / "agent.yaml"
    path.write_text(TEXT)
    os.chmod(path, 0o640)
    summary = set_mode(str(path), "enforce", pid=4242)
    assert summary.endswith("mode enforce; reloaded 4242")
    assert path.read_text().splitlines()[1].startswith("mode: enforce")
    assert oct(path.stat().st_mode & 0o777) == "0o640"
