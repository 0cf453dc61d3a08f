"""Who holds a connection's socket besides the process found first, and what that does to the Caller."""

from __future__ import annotations

from pathlib import Path

from imds_agent.identity.caller import Caller
from imds_agent.identity.procs import OverBudget
from imds_agent.identity.resolver import Identifier

CURL = Caller(True, 30, "/usr/bin/curl", 1000, "app", ("curl",))
PY = Caller(True, 20, "/usr/bin/python3.11", 1000, "app", ("python3",))


class Owner:
    inode, uid = 555, 1000


class FakeLookup:
    def owner(self, peer: object, dialled: object) -> Owner:
        return Owner()

    def close(self) -> None:
        pass


class FakeIndex:
    def __init__(self, proc: Path, described: dict[int, Caller], holders: list[int]):
        self.proc = str(proc)
        self.described = described
        self.holding = holders
        self.slow = False

    def find_pid(self, inode: int, uid: int, deadline: float | None = None) -> int:
        if self.slow:
            raise OverBudget()
        return 30

    def describe(self, pid: int) -> Caller:
        return self.described[pid]

    def holders(self, pid: int, inode: int, uid: int, deadline: float | None = None) -> list[int]:
        return self.holding


def identify(tmp_path: Path, described: dict[int, Caller], holders: list[int]) -> Caller:
    index = FakeIndex(tmp_path, {30: CURL, **described}, holders)
    ident = Identifier(lookup=FakeLookup(), index=index)  # type: ignore[arg-type]
    return ident.identify(("127.0.0.1", 40000), ("127.0.0.1", 8775), ("169.254.169.254", 80))


def test_holders_running_the_same_program_are_not_sharers(tmp_path: Path) -> None:
    twin = Caller(True, 31, "/usr/bin/curl", 1000, "app", ("curl",))
    assert identify(tmp_path, {31: twin}, [31]) == CURL


def test_a_holder_running_another_program_is_recorded(tmp_path: Path) -> None:
    caller = identify(tmp_path, {20: PY}, [20])
    assert caller.exe == "/usr/bin/curl" and caller.sharers == (PY,)


def test_a_holder_that_exited_meanwhile_is_ignored_but_an_unreadable_one_is_not(tmp_path: Path) -> None:
    gone = Caller.unknown("process 20 exited before it could be identified")
    assert identify(tmp_path, {20: gone}, [20]) == CURL  # no /proc/20 in this fake tree
    (tmp_path / "20").mkdir()
    unreadable = Caller.unknown("process 20 cannot be read: AccessDenied")
    caller = identify(tmp_path, {20: unreadable}, [20])
    assert not caller.known and "unidentifiable" in caller.reason and caller.uid == 1000


def test_past_its_budget_a_caller_is_unidentified_and_the_cost_is_counted_for_its_uid(tmp_path: Path) -> None:
    index = FakeIndex(tmp_path, {30: CURL}, [])
    ident = Identifier(lookup=FakeLookup(), index=index, budget=0.05)  # type: ignore[arg-type]
    assert ident.identify(("127.0.0.1", 1), ("127.0.0.1", 2), None) == CURL
    index.slow = True
    caller = ident.identify(("127.0.0.1", 1), ("127.0.0.1", 2), None)
    assert not caller.known and caller.uid == 1000
    assert caller.reason == "identification exceeded its budget of 50 ms"
    cost = ident.costs()[1000]
    assert (cost.lookups, cost.over_budget) == (2, 1) and cost.seconds >= 0


def test_a_socket_its_process_already_closed_is_unidentified_without_a_search(tmp_path: Path) -> None:
    class Closed(FakeLookup):
        def owner(self, peer: object, dialled: object) -> Owner:
            closed = Owner()
            closed.inode = 0  # what sock_diag reports for an orphaned or TIME_WAIT socket
            return closed

    class NoSearch(FakeIndex):
        def find_pid(self, inode: int, uid: int, deadline: float | None = None) -> int:
            raise AssertionError("a search for inode 0 walks every descriptor on the host")

    ident = Identifier(lookup=Closed(), index=NoSearch(tmp_path, {}, []))  # type: ignore[arg-type]
    caller = ident.identify(("127.0.0.1", 1), ("127.0.0.1", 2), None)
    assert not caller.known and "closed its socket" in caller.reason and caller.uid == 1000


def test_an_attested_caller_must_still_hold_the_socket_and_run_what_it_ran(tmp_path: Path, monkeypatch) -> None:
    """The ebpf record names the process that connected; a pid that no longer holds the socket (it exited, its
    number was reused) or that has exec'd since is unidentified, never taken on trust."""
    from imds_agent.identity import resolver

    index = FakeIndex(tmp_path, {30: CURL}, [])
    ident = Identifier(lookup=FakeLookup(), index=index)  # type: ignore[arg-type]
    holders = {30}
    monkeypatch.setattr(resolver, "holds_socket", lambda pid, target, proc, deadline=None: pid in holders)
    monkeypatch.setattr(resolver, "current_comm", lambda pid, proc: "curl")
    assert ident.identify_attested(("127.0.0.1", 1), ("127.0.0.1", 2), 30, "curl") == CURL
    exec_d = ident.identify_attested(("127.0.0.1", 1), ("127.0.0.1", 2), 30, "python3")
    assert not exec_d.known and "has exec'd since" in exec_d.reason
    holders.clear()
    gone = ident.identify_attested(("127.0.0.1", 1), ("127.0.0.1", 2), 30, "curl")
    assert not gone.known and "no longer holds the socket" in gone.reason
