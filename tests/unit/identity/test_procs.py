"""Pid search order and process description against a fake /proc tree (no real processes involved)."""

from __future__ import annotations

import os
from pathlib import Path

from imds_agent.identity.procs import ProcessIndex, holds_socket, unit_and_container


def fake_proc(root: Path, pid: int, sockets: list[int]) -> None:
    fd = root / str(pid) / "fd"
    fd.mkdir(parents=True)
    for n, inode in enumerate(sockets):
        os.symlink(f"socket:[{inode}]", fd / str(n))
    os.symlink("/dev/null", fd / "99")


def test_holds_socket(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, [111, 222])
    assert holds_socket(10, "socket:[222]", str(tmp_path))
    assert not holds_socket(10, "socket:[333]", str(tmp_path))
    assert not holds_socket(11, "socket:[111]", str(tmp_path))  # no such pid: not an error


def test_recent_pids_are_tried_first_then_the_uid_then_all(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, [111])
    fake_proc(tmp_path, 20, [222])
    index = ProcessIndex(str(tmp_path))
    uid = os.getuid()
    assert index.find_pid(222, uid) == 20
    assert index.scans["uid"] == 1
    assert index.find_pid(222, uid) == 20
    assert index.scans["recent"] == 1
    assert index.find_pid(111, uid + 1) == 10  # wrong uid: found by the full scan
    assert index.scans["full"] == 1
    assert index.find_pid(999, uid) is None
    assert index.scans["miss"] == 1


def test_unit_and_container_from_cgroup() -> None:
    v2 = "0::/system.slice/amazon-ssm-agent.service\n"
    assert unit_and_container(v2) == ("amazon-ssm-agent.service", None)
    cid = "ab" * 32
    docker = f"0::/system.slice/docker-{cid}.scope\n"
    assert unit_and_container(docker) == (f"docker-{cid}.scope", cid)
    v1 = f"12:pids:/docker/{cid}\n1:name=systemd:/docker/{cid}\n"
    assert unit_and_container(v1) == (None, cid)
    user = "0::/user.slice/user-1000.slice/session-3.scope\n"
    assert unit_and_container(user) == ("session-3.scope", None)
    assert unit_and_container("") == (None, None)


def test_describe_a_vanished_process_is_unknown(tmp_path: Path) -> None:
    caller = ProcessIndex(str(tmp_path)).describe(2**22 + 12345)
    assert not caller.known and "exited" in caller.reason


def test_describe_this_process_and_cache_it() -> None:
    index = ProcessIndex()
    caller = index.describe(os.getpid())
    assert caller.known and caller.pid == os.getpid() and caller.exe and os.path.isabs(caller.exe)
    assert caller.uid == os.getuid() and caller.cmdline
    assert index.describe(os.getpid()) is caller


def test_holders_are_every_other_process_of_the_uid_with_the_socket(tmp_path: Path) -> None:
    """Siblings and strangers too: a lender need not be a parent or a child of the holder found first."""
    for pid, sockets in ((1, [555]), (10, [555]), (20, []), (30, [555]), (41, [777]), (50, [555])):
        fake_proc(tmp_path, pid, sockets)
    index = ProcessIndex(str(tmp_path))
    assert sorted(index.holders(30, 555, os.getuid())) == [10, 50]  # not itself, never pid 1
    assert index.holders(41, 777, os.getuid()) == []
    assert index.holders(30, 555, os.getuid() + 1) == []  # other uids are not searched


def test_loader_variables_in_the_start_environment_are_found(tmp_path: Path) -> None:
    from imds_agent.identity.procs import preload_of

    (tmp_path / "10").mkdir()
    (tmp_path / "10" / "environ").write_bytes(b"PATH=/usr/bin\0LD_PRELOAD=/tmp/evil.so\0LD_AUDIT=\0HOME=/\0")
    assert preload_of(10, str(tmp_path)) == ("LD_PRELOAD",)  # an empty LD_AUDIT loads nothing
    (tmp_path / "11").mkdir()
    (tmp_path / "11" / "environ").write_bytes(b"PATH=/usr/bin\0LD_LIBRARY_PATH=/opt\0")
    assert preload_of(11, str(tmp_path)) == ()
    assert preload_of(12, str(tmp_path)) == ("(environment unreadable)",)  # cannot be shown clean


def test_a_search_past_its_deadline_stops_and_says_so(tmp_path: Path) -> None:
    import time

    import pytest

    from imds_agent.identity.procs import OverBudget

    for pid in range(10, 20):
        fake_proc(tmp_path, pid, [1000 + pid])
    index = ProcessIndex(str(tmp_path))
    assert index.find_pid(1015, None, deadline=time.monotonic() + 5) == 15
    with pytest.raises(OverBudget):
        index.find_pid(999999, None, deadline=time.monotonic() - 1)


def test_recent_callers_of_other_uids_are_not_searched(tmp_path: Path) -> None:
    import os

    fake_proc(tmp_path, 10, [111])
    index = ProcessIndex(str(tmp_path))
    assert index.find_pid(111, None) == 10  # now a recent caller
    index.scans = dict.fromkeys(index.scans, 0)
    assert index.find_pid(111, os.stat(tmp_path / "10").st_uid + 1) == 10  # found, but not through the recent tier
    assert index.scans["recent"] == 0 and index.scans["full"] == 1
