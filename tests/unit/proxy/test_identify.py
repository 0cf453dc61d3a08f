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
        self.owners: list[object] = []
        self.closed = False

    def identify(self, peer: object, local: object, dst: object, owner: object = None) -> Caller:
        self.asked.append((peer, local, dst))
        self.owners.append(owner)
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


def test_what_admission_learnt_at_accept_is_not_asked_of_the_kernel_again() -> None:
    class Owner:
        uid, inode = 1000, 555

    class Lookup:
        def __init__(self) -> None:
            self.calls = 0

        def owner(self, peer: object, dialled: object) -> Owner:
            self.calls += 1
            return Owner()

    ident = FakeIdentifier(CURL)
    ident.lookup = Lookup()  # type: ignore[attr-defined]
    dsts: list[object] = []

    def dst(conn: Connection) -> tuple[str, int]:
        dsts.append(conn)
        return ("169.254.169.254", 80)

    hook = ConnectionIdentifier(ident, dst=dst)  # type: ignore[arg-type]
    assert hook.peer_uid(CONN) == 1000
    client = hook(CONN)
    assert client.original_dst == ("169.254.169.254", 80) and isinstance(ident.owners[-1], Owner)
    assert ident.lookup.calls == 1 and len(dsts) == 1  # type: ignore[attr-defined]
    hook(CONN)  # a second connection from the same address pair, not seen at admission: asked afresh
    assert len(dsts) == 2 and ident.owners[-1] is None


def test_an_attesting_backend_is_asked_by_the_cookie_admission_already_has() -> None:
    class Owner:
        uid, inode, cookie = 1000, 555, 0xC00C1E

    class Record:
        tgid, comm, original_dst = 42, "curl", ("169.254.169.254", 80)

    class Lookup:
        calls = 0

        def owner(self, peer: object, dialled: object) -> Owner:
            Lookup.calls += 1
            return Owner()

    class Attesting(FakeIdentifier):
        def identify_attested(self, peer: object, local: object, tgid: int, comm: str, owner: object) -> Caller:
            self.asked.append((tgid, comm, owner))
            return CURL

    ident = Attesting(CURL)
    ident.lookup = Lookup()  # type: ignore[attr-defined]
    asked: list[int] = []

    def attest(cookie: int) -> object:
        asked.append(cookie)
        return Record() if cookie == 0xC00C1E else None

    hook = ConnectionIdentifier(ident, dst=lambda c: None, attest=attest)  # type: ignore[arg-type]
    hook.peer_uid(CONN)
    client = hook(CONN)
    assert client.caller == CURL and client.original_dst == ("169.254.169.254", 80)
    assert asked == [0xC00C1E] and Lookup.calls == 1  # one sock_diag query for admission and attestation
    Owner.cookie = 7  # a socket with no record (connected before the hooks)
    assert hook(CONN).caller.reason.startswith("no connect record")
