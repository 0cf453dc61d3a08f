"""Rules flushed by someone else are repaired on the kernel's change notification, not at the next poll: with a
poll every 30 s, the redirect used to stay gone (and requests went straight to the metadata service) until then."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from imds_agent.sandbox.agentproc import AgentProcess
from imds_agent.sandbox.netns import Sandbox

pytestmark = pytest.mark.privileged


@pytest.fixture
def sbx() -> Iterator[Sandbox]:
    with Sandbox() as sandbox:
        yield sandbox


def present(sbx: Sandbox) -> bool:
    out = sbx.run(["nft", "list", "table", "inet", "imds_agent"])
    return out.returncode == 0 and "dnat" in out.stdout


def test_a_flushed_ruleset_is_repaired_within_a_second_on_nftables(sbx: Sandbox) -> None:
    # fail_mode closed: an ordinary table, which `nft flush ruleset` removes (an owned one it cannot touch).
    agent = AgentProcess(sbx, backend="nftables", fail_mode="closed", reconcile_interval=30).start()
    try:
        assert present(sbx)
        sbx.run(["nft", "flush", "ruleset"], check=True)
        flushed = time.monotonic()
        while not present(sbx) and time.monotonic() - flushed < 10:
            time.sleep(0.01)
        gap = time.monotonic() - flushed
    finally:
        agent.stop()
    print(f"redirect back {gap * 1000:.0f} ms after the flush (poll interval 30 s)")
    assert gap < 1.0, gap
    assert "redirect rules repaired" in agent.log()
