"""The ebpf backend's pure parts: the programs' structure, the record layout, cgroup and capability detection."""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path

import pytest

from imds_agent.errors import RedirectError
from imds_agent.redirect import ebpf
from imds_agent.redirect.base import RedirectSpec, State
from imds_agent.redirect.bpfasm import ALU, ALU64, JMP, JMP32, LD, STX, Insn

SPEC = RedirectSpec(exempt_uid=990, listen_port=968)
COOKIE = 0x1122334455667788


def insns(family: str, spec: RedirectSpec = SPEC) -> list[Insn]:
    return ebpf.build_program(family, spec, COOKIE).instructions({ebpf.MAP_NAME: 5})


def calls(program: list[Insn]) -> list[int]:
    return [i.imm for i in program if i.code == JMP | 0x80]


def stores_to_ctx(program: list[Insn]) -> list[tuple[int, int]]:
    """(offset, value) for each ``mov32 r2, value; *(u32 *)(r6 + offset) = r2``."""
    out = []
    for prev, insn in zip(program, program[1:]):
        if insn.code == STX | 0x60 and insn.dst == 6:
            assert prev.code == ALU | 0xB0 and prev.dst == 2, "the context is written from r2"
            out.append((insn.off, prev.imm & 0xFFFFFFFF))
    return out


def test_words_are_what_a_u32_load_of_network_order_bytes_gives() -> None:
    assert ebpf.word(socket.inet_aton("169.254.169.254")) == int.from_bytes(b"\xa9\xfe\xa9\xfe", sys.byteorder)
    assert ebpf.port_word(80).to_bytes(4, sys.byteorder) == b"\x00\x50\x00\x00"


def test_the_v4_program_matches_then_checks_netns_and_uid_then_records_then_rewrites() -> None:
    program = insns("ipv4")
    assert calls(program) == [ebpf.GET_NETNS_COOKIE, ebpf.GET_CURRENT_UID_GID, ebpf.GET_CURRENT_PID_TGID,
                              ebpf.GET_CURRENT_CGROUP_ID, ebpf.GET_CURRENT_COMM, ebpf.GET_SOCKET_COOKIE,
                              ebpf.MAP_UPDATE_ELEM]  # fmt: skip
    compared = [i.imm & 0xFFFFFFFF for i in program if i.code & 0x07 == JMP32]  # 32-bit compares only
    assert compared == [socket.IPPROTO_TCP, ebpf.IPPROTO_MPTCP, ebpf.port_word(80),
                        ebpf.word(socket.inet_aton("169.254.169.254")), 990]  # fmt: skip
    cookie = [(a.imm & 0xFFFFFFFF, b.imm & 0xFFFFFFFF) for a, b in zip(program, program[1:]) if a.code == LD | 0x18]
    assert cookie == [(0x55667788, 0x11223344), (5, 0)], "the netns cookie, then the map fd"
    assert program[-2:] == [Insn(ALU64 | 0xB0, 0, 0, 0, 1), Insn(JMP | 0x90)], "connect always proceeds"
    assert stores_to_ctx(program) == [
        (ebpf.USER_IP4, ebpf.word(socket.inet_aton("127.0.0.1"))),
        (ebpf.USER_PORT, ebpf.port_word(968)),
    ]


def test_the_v6_program_sends_v6_to_the_v6_loopback_and_v4_mapped_to_the_v4_mapped_loopback() -> None:
    def words(address: str) -> list[tuple[int, int]]:
        raw = socket.inet_pton(socket.AF_INET6, address)
        return [(ebpf.USER_IP6 + i, ebpf.word(raw[i : i + 4])) for i in range(0, 16, 4)]

    assert stores_to_ctx(insns("ipv6")) == [*words("::ffff:127.0.0.1"), *words("::1"), (ebpf.USER_PORT, 0x0000C803)]
    without = RedirectSpec(exempt_uid=990, listen_port=968, with_ipv6=False)
    assert stores_to_ctx(insns("ipv6", without)) == [*words("::ffff:127.0.0.1"), (ebpf.USER_PORT, 0x0000C803)]


def test_the_record_stays_inside_the_stack_the_program_zeroes() -> None:
    program = insns("ipv6")
    stack = [i.off for i in program if i.code & 0x07 in (0x02, 0x03) and i.dst == 10]
    assert min(stack) == ebpf.KEY and max(stack) < 0
    assert ebpf.RECORD.size == 64 and ebpf.REC - ebpf.KEY == 8


def test_a_record_decodes_to_the_caller_and_the_original_destination() -> None:
    addr = socket.inet_pton(socket.AF_INET6, "::ffff:169.254.169.254")
    raw = ebpf.RECORD.pack(1234, 1240, 65534, 65533, 6618, b"python3\0junk\0\0\0\0", addr, b"\x00\x50",
                           socket.AF_INET6, 0)  # fmt: skip
    assert ebpf.ConnectRecord.decode(raw) == ebpf.ConnectRecord(
        1234, 1240, 65534, 65533, 6618, "python3", ("::ffff:169.254.169.254", 80)
    )
    v4 = ebpf.RECORD.pack(1, 1, 0, 0, 1, b"\xffx", socket.inet_aton("169.254.169.254").ljust(16, b"\0"),
                          b"\x00\x50", socket.AF_INET, 0)  # fmt: skip
    assert ebpf.ConnectRecord.decode(v4).original_dst == ("169.254.169.254", 80)
    assert ebpf.ConnectRecord.decode(v4).comm == "\\xffx"


MOUNTS = {
    "hybrid": "30 25 0:26 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n"
    "31 25 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu\n",
    "v2": "30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
    "elsewhere": "30 25 0:26 / /mnt/cg rw shared:4 - cgroup2 none rw\n",
    "v1": "31 25 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu\n",
}


@pytest.mark.parametrize(
    ("host", "root"),
    [("hybrid", "/sys/fs/cgroup/unified"), ("v2", "/sys/fs/cgroup"), ("elsewhere", "/mnt/cg"), ("v1", None)],
)
def test_the_default_cgroup_is_the_v2_root(tmp_path: Path, host: str, root: str) -> None:
    (tmp_path / "mountinfo").write_text(MOUNTS[host])
    assert ebpf.default_cgroup(str(tmp_path / "mountinfo")) == root


def test_capabilities_are_cap_bpf_where_the_kernel_has_it(tmp_path: Path) -> None:
    (tmp_path / "last").write_text("40\n")
    assert ebpf.kernel_capabilities(str(tmp_path / "last")) == (ebpf.CAP_BPF, ebpf.CAP_NET_ADMIN)
    (tmp_path / "last").write_text("37\n")
    assert ebpf.kernel_capabilities(str(tmp_path / "last")) == (ebpf.CAP_SYS_ADMIN, ebpf.CAP_NET_ADMIN)


def test_the_backend_owns_its_links_and_refuses_what_it_cannot_keep(tmp_path: Path) -> None:
    backend = ebpf.EbpfBackend(cgroup=str(tmp_path / "missing"))
    assert backend.name == "ebpf" and backend.can_own()
    assert not backend.is_supported() and "cgroup v2" in backend.unsupported_reason()
    with pytest.raises(RedirectError, match="pinning under bpffs"):
        backend.apply(SPEC, owned=False)
    assert backend.check().state == State.ABSENT and backend.check().owned
    assert backend.record(COOKIE) is None
    assert not backend.remove()
    backend.close()


def test_map_keys_are_native_u64_cookies() -> None:
    assert struct.pack("=Q", COOKIE) == COOKIE.to_bytes(8, sys.byteorder)


def test_ebpf_can_be_named_but_auto_never_picks_it() -> None:
    from imds_agent.redirect import registry

    assert isinstance(registry.make_backend("ebpf"), ebpf.EbpfBackend)
    assert registry.EXPERIMENTAL == ("ebpf",)
    assert "ebpf" not in registry.BACKEND_NAMES and "ebpf" not in registry.CHOICES
