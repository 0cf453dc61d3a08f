"""Admission: the per-uid cap, the reserve for root and the uids the policy names, idle connections first out."""

from __future__ import annotations

import socket

from imds_agent.proxy.admission import Admission


class FakeSock:
    def __init__(self) -> None:
        self.shut = False

    def shutdown(self, how: int) -> None:
        assert how == socket.SHUT_RDWR
        self.shut = True


def admission(total: int = 4, per_uid: int = 2, reserved: int = 1, named: frozenset[int] = frozenset({998})):
    clock = iter(range(1000))
    return Admission(total, per_uid, reserved, lambda: named, lambda: float(next(clock)))


def test_one_uid_cannot_hold_more_than_its_cap_while_others_still_get_in() -> None:
    adm = admission()
    a = [adm.admit(1001, FakeSock())[0] for _ in range(2)]
    slot, why = adm.admit(1001, FakeSock())
    assert slot is None and "uid 1001 already holds 2 connections" in why
    assert adm.admit(1000, FakeSock())[0] is not None
    assert all(a) and adm.count(1001) == 2


def test_the_last_slots_are_kept_for_root_and_the_uids_the_policy_names() -> None:
    adm = admission(total=4, per_uid=4, reserved=2)
    for _ in range(2):
        assert adm.admit(1001, FakeSock())[0] is not None
    slot, why = adm.admit(1001, FakeSock())
    assert slot is None and "reserved for root and the uids the policy names" in why
    assert adm.admit(998, FakeSock())[0] is not None and adm.admit(0, FakeSock())[0] is not None
    assert adm.admit(0, FakeSock())[0] is None  # the total is the total


def test_an_idle_connection_makes_room_the_longest_idle_of_the_capped_uid_first() -> None:
    adm = admission(total=10, per_uid=2)
    socks = [FakeSock(), FakeSock(), FakeSock()]
    first, second = (adm.admit(1001, s)[0] for s in socks[:2])
    assert first is not None and second is not None
    adm.idle(second, True)
    adm.idle(first, True)  # idle since later than second
    slot, _ = adm.admit(1001, socks[2])
    assert slot is not None and socks[1].shut and not socks[0].shut and adm.evictions == 1
    adm.release(second)  # its worker ends later: releasing twice changes nothing
    assert adm.count(1001) == 2


def test_a_busy_connection_is_never_evicted_and_the_busiest_uid_goes_first() -> None:
    adm = admission(total=3, per_uid=3, reserved=0)
    mine, theirs, busy = FakeSock(), FakeSock(), FakeSock()
    a = adm.admit(1000, mine)[0]
    b = adm.admit(1001, theirs)[0]
    c = adm.admit(1001, busy)[0]
    assert a and b and c
    adm.idle(a, True)
    adm.idle(b, True)  # 1001 holds most: its idle one goes, although 1000's has been idle longer
    assert adm.admit(1002, FakeSock())[0] is not None
    assert theirs.shut and not mine.shut and not busy.shut
    adm.idle(a, False)
    assert adm.admit(1002, FakeSock())[0] is None  # nothing idle left: refused


def test_an_ordinary_uid_never_closes_the_idle_connections_of_root_or_a_named_uid() -> None:
    adm = admission(total=3, per_uid=3, reserved=0, named=frozenset({998}))
    root, named, busy = FakeSock(), FakeSock(), FakeSock()
    a, b = adm.admit(0, root)[0], adm.admit(998, named)[0]
    assert a and b and adm.admit(1001, busy)[0]
    adm.idle(a, True)
    adm.idle(b, True)
    slot, why = adm.admit(1002, FakeSock())
    assert slot is None and not root.shut and not named.shut
    assert adm.admit(0, FakeSock())[0] is not None and (root.shut or named.shut)  # root may, among its own kind


def test_an_idle_connection_whose_next_request_has_arrived_is_not_closed() -> None:
    adm = admission(total=1, per_uid=1, reserved=0)
    ours, theirs = socket.socketpair()
    try:
        slot = adm.admit(1001, ours)[0]
        assert slot is not None
        adm.idle(slot, True)
        theirs.sendall(b"GET / HTTP/1.1\r\n\r\n")  # arrived, not yet read by the worker
        assert adm.admit(1001, FakeSock())[0] is None
    finally:
        ours.close()
        theirs.close()
