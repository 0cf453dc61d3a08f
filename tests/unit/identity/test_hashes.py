"""Executable hashes: of the file the process runs, read once per file identity."""

from __future__ import annotations

import hashlib
import os

from imds_agent.identity.hashes import ExeHasher


def test_the_hash_is_of_the_running_executable_and_is_cached(monkeypatch) -> None:
    expected = hashlib.sha256(open(f"/proc/{os.getpid()}/exe", "rb").read()).hexdigest()
    hasher = ExeHasher()
    assert hasher.of_pid(os.getpid()) == expected
    opened: list[str] = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert hasher.of_pid(os.getpid()) == expected and opened == []  # same file identity: not read again


def test_a_vanished_process_has_no_hash() -> None:
    assert ExeHasher().of_pid(2**22 + 12345) is None


def test_the_cache_is_bounded_and_drops_the_oldest() -> None:
    hasher = ExeHasher(capacity=1)
    hasher._cache[(0, 0, 0, 0)] = "an older file's hash"
    digest = hasher.of_pid(os.getpid())
    assert list(hasher._cache.values()) == [digest]
