"""Finding a client's socket in another network namespace, against a /proc tree made for the test."""

from __future__ import annotations

import io
import ipaddress
import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from imds_agent.identity.netns import Ambiguous, NetnsSockets, needle, parse_line
from imds_agent.identity.procs import OverBudget

IMDS = ("169.254.169.254", 80)
HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def line(local: tuple[str, int], remote: tuple[str, int], uid: int, inode: int, state: str = "01") -> str:
    cols = needle(local, remote).split()
    rest = f"{state} 00000000:00000000 00:00000000 00000000 {uid:>5} 0 {inode} 1 0 20 4 30 10 -1"
    return f"   0: {cols[0]} {cols[1]} {rest}\n"


class FakeProc:
    """A /proc with processes in namespaces: each namespace is a file whose inode stands for the namespace's."""

    def __init__(self, root: Path):
        self.root = root
        (root / "nsfiles").mkdir()
        self.user_owned: set[str] = set()
        self.add_process("self", "host")

    def ns(self, name: str) -> Path:
        path = self.root / "nsfiles" / name
        path.touch()
        return path

    def add_process(self, pid: str, netns: str, tcp: str = "", tcp6: str = "", addrs: tuple[str, ...] = ()) -> None:
        (self.root / pid / "ns").mkdir(parents=True, exist_ok=True)
        (self.root / pid / "net").mkdir(exist_ok=True)
        link = self.root / pid / "ns" / "net"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(self.ns(netns))
        (self.root / pid / "net" / "tcp").write_text(HEADER + tcp)
        (self.root / pid / "net" / "tcp6").write_text(HEADER + tcp6)
        v4 = [a for a in addrs if ":" not in a]
        # As the kernel prints it: each local address under both the Main and the Local table.
        entries = "".join(f"     |-- {a}\n        /32 host LOCAL\n" for a in v4)
        fib = "Main:\n  +-- 0.0.0.0/0 3 0 5\n" + entries + "Local:\n  +-- 0.0.0.0/0 3 0 5\n" + entries
        (self.root / pid / "net" / "fib_trie").write_text(fib + "     |-- 10.0.0.0\n        /24 link UNICAST\n")
        v6 = [ipaddress.IPv6Address(a).packed.hex() for a in addrs if ":" in a]
        zero = "0" * 32
        routes = "".join(f"{h} 80 {zero} 00 {zero} 00000000 00000001 00000000 80200001 eth0\n" for h in v6)
        routes += f"fd000172000000000000000000000000 40 {zero} 00 {zero} 00000100 00000001 00000000 00000001 eth0\n"
        (self.root / pid / "net" / "ipv6_route").write_text(routes)

    def inode(self, netns: str) -> int:
        return os.stat(self.ns(netns)).st_ino


@pytest.fixture
def proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeProc:
    fake = FakeProc(tmp_path)
    # The ownership check asks the kernel (an ioctl on the namespace file); here a set says which pids are in
    # namespaces an unprivileged user made in a user namespace of its own.
    monkeypatch.setattr(NetnsSockets, "owned_by_host", lambda self, pid: str(pid) not in fake.user_owned)
    return fake


def test_needle_is_how_the_kernel_prints_the_addresses() -> None:
    # /proc/net/tcp prints each 32-bit word of the address in host byte order.
    word = struct.unpack("=I", socket.inet_aton("127.0.0.1"))[0]
    assert needle(("127.0.0.1", 56336), ("127.0.0.1", 5555)) == f" {word:08X}:DC10 {word:08X}:15B3 "
    six = needle(("fd00:ec2::1", 1), ("fd00:ec2::254", 80))
    assert len(six.split()[0]) == 32 + 5 and six.split()[1].endswith(":0050")


def test_the_socket_is_found_in_the_namespace_that_holds_it(proc: FakeProc) -> None:
    proc.add_process("100", "host")
    proc.add_process("200", "web", tcp=line(("172.17.0.2", 40000), IMDS, 1000, 777), addrs=("172.17.0.2",))
    proc.add_process("300", "db", tcp=line(("172.17.0.3", 40000), IMDS, 1001, 888), addrs=("172.17.0.3",))
    found = NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS)
    assert found is not None
    assert (found.netns, found.pid, found.uid, found.inode) == (proc.inode("web"), 200, 1000, 777)


def test_the_agents_own_namespace_is_never_searched(proc: FakeProc) -> None:
    # A host socket with that tuple is the agent's side of some other connection, not a container's client.
    proc.add_process("100", "host", tcp=line(("172.17.0.2", 40000), IMDS, 0, 5), addrs=("172.17.0.2",))
    assert NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS) is None


def test_an_address_alone_identifies_nobody(proc: FakeProc) -> None:
    # Same source address, another port or another destination: not this connection's socket.
    table = line(("172.17.0.2", 40001), IMDS, 1000, 777) + line(
        ("172.17.0.2", 40000), ("169.254.169.253", 80), 1000, 778
    )
    proc.add_process("200", "web", tcp=table, addrs=("172.17.0.2",))
    assert NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS) is None


def test_a_socket_in_two_namespaces_is_ambiguous(proc: FakeProc) -> None:
    # A container with CAP_NET_ADMIN can take another container's address; neither is then trusted.
    proc.add_process("200", "web", tcp=line(("172.17.0.2", 40000), IMDS, 1000, 777), addrs=("172.17.0.2",))
    proc.add_process("300", "evil", tcp=line(("172.17.0.2", 40000), IMDS, 1001, 888), addrs=("172.17.0.2",))
    with pytest.raises(Ambiguous, match="2 network namespaces"):
        NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS)


def test_a_remembered_namespace_is_trusted_only_with_the_exact_socket(proc: FakeProc) -> None:
    proc.add_process("200", "web", tcp=line(("172.17.0.2", 40000), IMDS, 1000, 777), addrs=("172.17.0.2",))
    finder = NetnsSockets(str(proc.root))
    assert finder.find(("172.17.0.2", 40000), IMDS) is not None
    # The address moved to another namespace (pod churn): the remembered one no longer has it; all are looked at.
    proc.add_process("200", "web")
    proc.add_process("400", "new", tcp=line(("172.17.0.2", 40002), IMDS, 1002, 999), addrs=("172.17.0.2",))
    found = finder.find(("172.17.0.2", 40002), IMDS)
    assert found is not None and (found.pid, found.inode) == (400, 999)
    # When the remembered namespace holds the socket, the others are not read: a second namespace with the same
    # address and the same tuple is caught only by a fresh lookup. Only one of them could have completed the
    # handshake (the replies go to one), and the one that did is the one remembered.
    proc.add_process("500", "evil", tcp=line(("172.17.0.2", 40003), IMDS, 1003, 1), addrs=("172.17.0.2",))
    proc.add_process("400", "new", tcp=line(("172.17.0.2", 40003), IMDS, 1002, 2), addrs=("172.17.0.2",))
    found = finder.find(("172.17.0.2", 40003), IMDS)
    assert found is not None and found.pid == 400


def test_only_namespaces_where_the_address_is_local_are_read(proc: FakeProc) -> None:
    # A table line for the tuple in a namespace that does not have the address: no reply could ever reach it.
    proc.add_process("200", "web", tcp=line(("172.17.0.2", 40000), IMDS, 1000, 777), addrs=("172.17.0.9",))
    assert NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS) is None


def test_an_entry_missed_by_one_read_is_found_by_the_second(proc: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel's table can skip an entry while connections churn; one more read is taken before "not there".
    proc.add_process("200", "web", tcp=line(("172.17.0.2", 40000), IMDS, 1000, 777), addrs=("172.17.0.2",))
    real_open, reads = open, []

    def flaky_open(path: str, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("/200/net/tcp"):
            reads.append(path)
            if len(reads) == 1:
                return io.StringIO(HEADER)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", flaky_open)
    found = NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS)
    assert found is not None and found.inode == 777 and len(reads) == 2


def test_a_process_that_left_the_namespace_while_it_was_read_is_not_trusted(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc.add_process("200", "web", tcp=line(("172.17.0.2", 40000), IMDS, 1000, 777), addrs=("172.17.0.2",))
    finder = NetnsSockets(str(proc.root))
    real_open = open

    def moving_open(path: str, *args: Any, **kwargs: Any) -> Any:
        fh = real_open(path, *args, **kwargs)
        if str(path).endswith("/200/net/tcp"):
            proc.add_process("200", "elsewhere")  # the pid exits and is reused in another namespace meanwhile
        return fh

    monkeypatch.setattr("builtins.open", moving_open)
    assert finder.find(("172.17.0.2", 40000), IMDS) is None


def test_ipv6_sockets_are_read_from_tcp6(proc: FakeProc) -> None:
    peer = ("fd00:172::2", 40000)
    proc.add_process("200", "web", tcp6=line(peer, ("fd00:ec2::254", 80), 1000, 321), addrs=("fd00:172::2",))
    found = NetnsSockets(str(proc.root)).find(peer, ("fd00:ec2::254", 80))
    assert found is not None and found.inode == 321


def test_time_wait_has_no_owner() -> None:
    text = HEADER + line(("172.17.0.2", 40000), IMDS, 0, 0, state="06")
    assert parse_line(text, needle(("172.17.0.2", 40000), IMDS)) == (0, 0, "06")
    assert parse_line(text, needle(("172.17.0.9", 40000), IMDS)) is None


def test_the_search_keeps_to_its_deadline(proc: FakeProc) -> None:
    for n in range(300):
        proc.add_process(str(1000 + n), f"ns{n}")
    with pytest.raises(OverBudget):
        NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS, deadline=0.0)


def test_a_namespace_an_unprivileged_user_made_never_stands_for_a_container(proc: FakeProc) -> None:
    # `unshare -Urn` as any user: the victim's address on lo, and the victim's tuple held there. It neither makes
    # the victim's own socket ambiguous nor, with the victim gone, takes its place.
    proc.add_process("200", "web", tcp=line(("172.17.0.2", 40000), IMDS, 1000, 777), addrs=("172.17.0.2",))
    proc.add_process("900", "squat", tcp=line(("172.17.0.2", 40000), IMDS, 1000, 5), addrs=("172.17.0.2",))
    proc.user_owned.add("900")
    found = NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS)
    assert found is not None and found.pid == 200
    proc.add_process("200", "web")  # the victim's socket is gone
    assert NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS) is None


def test_a_socket_that_is_no_longer_a_live_connection_lends_nobody_its_process(proc: FakeProc) -> None:
    # A pooled client's socket the agent closed lingers in CLOSE_WAIT; a new connection on the same tuple (from
    # a container that took the address) must not be attributed to the lingering socket's holder.
    waiting = line(("172.17.0.2", 40000), IMDS, 1000, 777, state="08")
    proc.add_process("200", "web", tcp=waiting, addrs=("172.17.0.2",))
    found = NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS)
    assert found is not None and found.inode == 0


def test_a_local_route_counts_like_an_address(proc: FakeProc) -> None:
    # `ip route add local 172.17.0.2/31 dev lo` makes the namespace take the address as its own without an
    # address: it is a candidate like any other, so a second holder of the tuple is seen.
    proc.add_process("200", "web", tcp=line(("172.17.0.2", 40000), IMDS, 1000, 777), addrs=("172.17.0.2",))
    proc.add_process("300", "evil", tcp=line(("172.17.0.2", 40000), IMDS, 0, 888))
    fib = "Local:\n  +-- 172.17.0.2/31 2 0 2\n     |-- 172.17.0.2\n        /31 host LOCAL\n"
    (proc.root / "300" / "net" / "fib_trie").write_text(fib)
    with pytest.raises(Ambiguous):
        NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS)


def test_an_ipv4_connection_from_an_ipv6_socket_is_found_in_tcp6(proc: FakeProc) -> None:
    # A client that dialled [::ffff:169.254.169.254] holds an AF_INET6 socket: tcp6, addresses IPv4-mapped.
    held = line(("::ffff:172.17.0.2", 40000), ("::ffff:169.254.169.254", 80), 1000, 555)
    proc.add_process("200", "web", tcp6=held, addrs=("172.17.0.2",))
    found = NetnsSockets(str(proc.root)).find(("172.17.0.2", 40000), IMDS)
    assert found is not None and found.inode == 555
