"""Atomic replacement: old or new content, never a mix; mode kept; nothing left behind on failure."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imds_agent.atomic import write_atomically


def test_a_new_file_gets_the_mode_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "inventory.json"
    write_atomically(str(path), "{}", mode=0o640)
    assert path.read_text() == "{}" and path.stat().st_mode & 0o777 == 0o640


def test_an_existing_file_keeps_its_mode_and_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("mode: audit\n")
    os.chmod(path, 0o600)
    inode = path.stat().st_ino
    write_atomically(str(path), "mode: enforce\n")
    assert path.read_text() == "mode: enforce\n" and path.stat().st_mode & 0o777 == 0o600
    assert path.stat().st_ino != inode  # renamed over, not rewritten in place


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("mode: audit\n")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        write_atomically(str(path), "mode: enforce\n")
    assert path.read_text() == "mode: audit\n" and [p.name for p in tmp_path.iterdir()] == ["agent.yaml"]
