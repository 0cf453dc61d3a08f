"""Shared test configuration: marks privileged tests and skips them when not root."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, kernel rules)")
    for item in items:
        if "privileged" in item.keywords or "/privileged/" in str(item.fspath) or "/e2e/" in str(item.fspath):
            item.add_marker(skip)
