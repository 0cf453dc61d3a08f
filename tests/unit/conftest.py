"""Unit tests never spawn processes: any attempt fails loudly instead of quietly touching the host."""

from __future__ import annotations

import subprocess
from typing import Any, NoReturn

import pytest


@pytest.fixture(autouse=True)
def _no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise AssertionError(f"unit tests must not spawn processes: {args!r}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr("os.system", refuse)
    monkeypatch.setattr("os.fork", refuse)
