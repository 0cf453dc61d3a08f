"""Every real client against both upstreams (IMDSv1 disabled), in enforce and audit mode, as allowed and denied
uid: see tests/e2e/matrix.py for what a cell checks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.e2e.clients import CLIENTS
from tests.e2e.matrix import CONTAINER, CONTAINER_CLIENTS, MODES, UPSTREAMS, Cell, run

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def cells() -> Iterator[dict[tuple[str, str, str], Cell]]:
    yield {(c.client, c.upstream, c.mode): c for c in run()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("upstream", UPSTREAMS)
@pytest.mark.parametrize("client", [c.name for c in CLIENTS])
def test_cell(cells: dict[tuple[str, str, str], Cell], client: str, upstream: str, mode: str) -> None:
    cell = cells[(client, upstream, mode)]
    assert cell.ok, "\n".join(cell.problems)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("client", CONTAINER_CLIENTS)
def test_container_cell(cells: dict[tuple[str, str, str], Cell], client: str, mode: str) -> None:
    cell = cells[(client, CONTAINER, mode)]
    assert cell.ok, "\n".join(cell.problems)
