"""The identify hook: a Connection becomes a Client with the original destination and the caller, and a failing
lookup makes the caller unidentified instead of raising into the server."""

from __future__ import annotations

from typing import Optional

import pytest

from imds_agent.identity.caller import Caller
from imds_agent.proxy.identify import ConnectionIdentifier
from imds_agent.proxy.server import Connection

CURL = Caller(True, 10, "/usr/bin/curl", 1000)


class FakeIdentifier:
    def __init__(self, result: Optional[Caller] = None) -> None:
        self.result = result
        self.asked: list[tuple[object, ...]] = []
        self.closed = False

    def identify(self, peer: object, local: object, dst: object) -> Caller:
        self.asked.append((peer, local, dst))
        if self.result is None:
            raise RuntimeError("a bug")
        return self.result

    def close(self) -> None:
        self.closed = True


CONN = Connection(None, ("127.0.0.1", 40000), ("127.0.0.1", 8775))  # type: ignore[arg-type]


def test_the_client_carries_the_dialled_address_and_the_caller() -> None:
    ident = FakeIdentifier(CURL)
    hook = ConnectionIdentifier(ident, dst=lambda c: ("169.254.169.254", 80), clock=lambda: 5.0)  # type: ignore[arg-type]
    client = hook(CONN)
    assert (client.peer, client.local, client.original_dst, client.caller, client.identified_at) == (
        ("127.0.0.1", 40000), ("127.0.0.1", 8775), ("169.254.169.254", 80), CURL, 5.0,
    )  # fmt: skip
    assert ident.asked == [(("127.0.0.1", 40000), ("127.0.0.1", 8775), ("169.254.169.254", 80))]
    hook.close()
    assert ident.closed


def test_a_failing_lookup_is_an_unidentified_caller(caplog: pytest.LogCaptureFixture) -> None:
    hook = ConnectionIdentifier(FakeIdentifier(None), dst=lambda c: None)  # type: ignore[arg-type]
    client = hook(CONN)
    assert not client.caller.known and "RuntimeError" in client.caller.reason
    assert "identifying the client of a connection failed" in caplog.text
