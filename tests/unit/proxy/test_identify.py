"""The identify hook: a Connection becomes a Client with the original destination and the caller, and a failing
lookup makes the caller unidentified instead of raising into the server."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import pytest

from imds_agent.identity.caller import Caller, address_share, share_owner
from imds_agent.identity.containers import ContainerDirectory
from imds_agent.identity.netns import Ambiguous, NetnsSocket
from imds_agent.identity.sockets import SocketOwner
from imds_agent.proxy.identify import ConnectionIdentifier, ContainerSide
from imds_agent.proxy.server import Connection

CURL = Caller(True, 10, "/usr/bin/curl", 1000)


class FakeIdentifier:
    budget = 0.25

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


# --- the container listener -----------------------------------------------------------------------------------------

IMDS = ("169.254.169.254", 80)
FROM_CONTAINER = Connection(None, ("172.17.0.2", 40000), ("172.17.0.1", 969))  # type: ignore[arg-type]


class FakeNetns:
    def __init__(self, found: Optional[NetnsSocket] = None, error: Optional[Exception] = None, holder_ns: int = 7):
        self.found, self.error, self.holder_ns = found, error, holder_ns
        self.asked: list[tuple[object, object]] = []

    def find(self, peer: object, dialled: object, deadline: object = None) -> Optional[NetnsSocket]:
        self.asked.append((peer, dialled))
        if self.error is not None:
            raise self.error
        return self.found

    def netns_of_pid(self, pid: int) -> int:
        return self.holder_ns


def container_hook(netns_: FakeNetns, result: Optional[Caller] = CURL, dst: object = IMDS) -> ConnectionIdentifier:
    hook = ConnectionIdentifier(FakeIdentifier(result), dst=lambda c: dst)  # type: ignore[arg-type,return-value]
    hook.containers = ContainerSide(969, frozenset({IMDS}), netns_)  # type: ignore[arg-type]
    return hook


def test_a_container_connection_is_identified_from_the_socket_in_its_namespace() -> None:
    found = NetnsSocket(netns=7, pid=55, uid=1000, inode=4242)
    hook = container_hook(FakeNetns(found))
    client = hook(FROM_CONTAINER)
    assert client.caller == dataclasses.replace(CURL, netns=7) and client.refused == ""
    # Its share of the per-user limits is its namespace's, never its uid's (root in a container is uid 0).
    assert client.caller.budget_key == -7
    ident = hook.identifier
    assert ident.owners == [SocketOwner(1000, 4242)]  # type: ignore[attr-defined]


def test_a_connection_no_local_namespace_holds_is_refused_in_every_mode() -> None:
    client = container_hook(FakeNetns(None))(FROM_CONTAINER)
    assert not client.caller.known and "no local container holds" in client.refused


def test_a_connection_that_did_not_dial_the_metadata_service_is_refused_without_a_search() -> None:
    finder = FakeNetns(NetnsSocket(7, 55, 1000, 4242))
    client = container_hook(finder, dst=("172.17.0.1", 969))(FROM_CONTAINER)
    assert "not a redirected container connection (it dialled 172.17.0.1:969)" in client.refused
    assert finder.asked == []


def test_an_ambiguous_socket_is_unidentified_but_not_refused() -> None:
    # It came from a local container, only which one is unknown: policy.unknown decides, as for any such caller.
    client = container_hook(FakeNetns(error=Ambiguous("in 2 network namespaces")))(FROM_CONTAINER)
    assert not client.caller.known and "2 network namespaces" in client.caller.reason and client.refused == ""


def test_a_holder_outside_the_sockets_namespace_is_not_trusted() -> None:
    client = container_hook(FakeNetns(NetnsSocket(7, 55, 1000, 4242), holder_ns=8))(FROM_CONTAINER)
    assert not client.caller.known and "left the container's network namespace" in client.caller.reason


def test_the_host_listener_is_not_searched_in_containers() -> None:
    finder = FakeNetns(NetnsSocket(7, 55, 1000, 4242))
    hook = container_hook(finder)
    assert hook(CONN).caller == CURL and finder.asked == []


def test_a_container_id_from_a_cgroup_no_runtime_made_is_not_recorded(tmp_path: Path) -> None:
    # A user names a cgroup of its own delegated tree after a real container: procs.py finds an id there, but no
    # runtime's layout puts that path in a container, so the caller carries neither that id nor a workload.
    cid = "a" * 64
    (tmp_path / "10").mkdir()
    (tmp_path / "10" / "cgroup").write_text(
        f"0::/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{cid}.scope\n"
    )
    (tmp_path / "10" / "uid_map").write_text("         0          0 4294967295\n")
    ident = FakeIdentifier(CURL)
    ident.index = type("Index", (), {"proc": str(tmp_path)})()  # type: ignore[attr-defined]
    hook = ConnectionIdentifier(ident)  # type: ignore[arg-type]
    hook.directory = ContainerDirectory(str(tmp_path / "docker"), str(tmp_path / "containerd"))
    caller = hook.workload(Caller(True, 10, "/usr/bin/curl", 1000, container=cid))
    assert caller.container is None and caller.workload is None


def test_a_docker_container_is_described_with_its_uid_inside(tmp_path: Path) -> None:
    cid = "b" * 64
    (tmp_path / "10").mkdir()
    (tmp_path / "10" / "cgroup").write_text(f"0::/system.slice/docker-{cid}.scope\n")
    (tmp_path / "10" / "uid_map").write_text("         0     100000      65536\n")
    state = tmp_path / "docker" / "containers" / cid
    state.mkdir(parents=True)
    (state / "config.v2.json").write_text(
        json.dumps(
            {"ID": cid, "Name": "/web", "Config": {"Image": "registry.example/app:1", "Labels": {"team": "billing"}}}
        )
    )
    ident = FakeIdentifier(CURL)
    ident.index = type("Index", (), {"proc": str(tmp_path)})()  # type: ignore[attr-defined]
    hook = ConnectionIdentifier(ident)  # type: ignore[arg-type]
    hook.directory = ContainerDirectory(str(tmp_path / "docker"), str(tmp_path / "containerd"))
    caller = hook.workload(Caller(True, 10, "/usr/bin/curl", 101000, container=cid), netns=77)
    assert caller.workload is not None and caller.container == cid
    assert (caller.workload.name, caller.workload.image, caller.workload.netns) == ("web", "registry.example/app:1", 77)
    assert caller.workload.label("team") == "billing" and caller.uid_inside == 1000


def test_admission_takes_a_container_connections_address_without_searching_on_the_accept_thread() -> None:
    finder = FakeNetns(NetnsSocket(netns=9, pid=55, uid=0, inode=4242))
    hook = container_hook(finder)
    key = hook.peer_uid(FROM_CONTAINER)
    # Not 0 (container root gets none of root's reserve), and no namespace was searched at accept.
    assert key == address_share("172.17.0.2") and key is not None and key < 0 and finder.asked == []
    assert share_owner(key) == "container address 172.17.0.2"
    assert share_owner(-9) == "the container network namespace 9" and share_owner(0) == "uid 0"


def test_an_entry_left_by_an_earlier_connection_on_the_same_tuple_is_never_reused() -> None:
    hook = container_hook(FakeNetns(None))
    hook._seen[(FROM_CONTAINER.peer, FROM_CONTAINER.local)] = (IMDS, SocketOwner(1000, 4242))
    hook.peer_uid(FROM_CONTAINER)  # the new connection on that tuple
    client = hook(FROM_CONTAINER)
    assert not client.caller.known and "no local container holds" in client.refused


def test_every_container_answer_carries_its_namespace_even_unidentified() -> None:
    closed = container_hook(FakeNetns(NetnsSocket(netns=7, pid=55, uid=0, inode=0)))(FROM_CONTAINER)
    assert not closed.caller.known and closed.caller.netns == 7 and closed.caller.budget_key == -7
    assert "ended before it could be identified" in closed.caller.reason
    moved = container_hook(FakeNetns(NetnsSocket(7, 55, 0, 4242), holder_ns=8))(FROM_CONTAINER)
    assert moved.caller.netns == 7 and moved.caller.budget_key == -7
