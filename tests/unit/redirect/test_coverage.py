"""Which network namespaces the container redirect does not cover, against a made-up /proc and link table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imds_agent.config import ContainersConfig
from imds_agent.redirect import coverage


def process(root: Path, pid: str, netns: str, devices: tuple[str, ...], comm: str = "sleep") -> None:
    (root / "ns").mkdir(exist_ok=True)
    (root / "ns" / netns).touch()
    (root / pid / "ns").mkdir(parents=True)
    (root / pid / "ns" / "net").symlink_to(root / "ns" / netns)
    (root / pid / "net").mkdir()
    rows = "".join(f"  {d}: 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n" for d in devices)
    (root / pid / "net" / "dev").write_text("Inter-|   Receive\n face |bytes\n" + rows)
    (root / pid / "comm").write_text(comm + "\n")
    (root / pid / "cgroup").write_text("0::/\n")


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    process(tmp_path, "self", "host", ("eth0",))
    process(tmp_path, "10", "web", ("eth0",))  # behind docker0
    process(tmp_path, "20", "side", ("eth0",))  # a veth under another name
    process(tmp_path, "30", "macvlan", ("mv0",))  # no link into the host's namespace
    process(tmp_path, "40", "lonely", ())  # loopback only
    nsids = {"10": 1, "20": 2}
    monkeypatch.setattr(coverage, "links_by_nsid", lambda: {1: ["docker0"], 2: ["tap-side"]})
    monkeypatch.setattr(coverage, "nsid_of", lambda pid, proc: nsids.get(str(pid)))
    return tmp_path


def inode(proc: Path, netns: str) -> int:
    return os.stat(proc / "ns" / netns).st_ino


def test_only_namespaces_that_bypass_the_redirect_are_named(proc: Path) -> None:
    found = {u.netns: u for u in coverage.uncovered(("docker*", "veth*"), True, proc=str(proc))}
    assert set(found) == {inode(proc, "side"), inode(proc, "macvlan")}
    assert found[inode(proc, "side")].reason == "enters on tap-side, which containers.interfaces does not name"
    assert "without passing this host's namespace (mv0)" in found[inode(proc, "macvlan")].reason
    assert found[inode(proc, "side")].describe().startswith(f"netns {inode(proc, 'side')}, pid 20 (sleep): ")


def test_with_containers_off_every_linked_namespace_is_named(proc: Path) -> None:
    found = {u.netns: u.reason for u in coverage.uncovered(("docker*",), False, proc=str(proc))}
    assert found[inode(proc, "web")] == "enters on docker0; containers.enabled is false"


def test_an_unprivileged_caller_is_told_it_cannot_see_rather_than_that_all_is_covered(
    proc: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    lines = coverage.coverage_lines(ContainersConfig(), proc=str(proc))
    assert lines == ["cannot see other users' network namespaces: run as root to list what the redirect does not cover"]


def test_shared_tcp_hash_tables_are_pointed_out_only_with_containers_on(tmp_path: Path) -> None:
    (tmp_path / "sys/net/ipv4").mkdir(parents=True)
    (tmp_path / "sys/net/ipv4/tcp_child_ehash_entries").write_text("0\n")
    assert "tcp_child_ehash_entries is 0" in coverage.ehash_advice(ContainersConfig(), str(tmp_path))[0]
    assert coverage.ehash_advice(ContainersConfig(enabled=False), str(tmp_path)) == []
    (tmp_path / "sys/net/ipv4/tcp_child_ehash_entries").write_text("1024\n")
    assert coverage.ehash_advice(ContainersConfig(), str(tmp_path)) == []
