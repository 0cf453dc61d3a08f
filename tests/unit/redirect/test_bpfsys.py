"""The bpf(2) attr layouts against linux/bpf.h, and how results and failures come back (no syscall is made)."""

from __future__ import annotations

import ctypes
import struct
from typing import Any

import pytest

from imds_agent.redirect import bpfsys


def offsets(cls: Any) -> dict[str, int]:
    return {name: getattr(cls, name).offset for name, *_ in cls._fields_}


def test_attr_layouts_match_union_bpf_attr() -> None:
    assert offsets(bpfsys._ProgLoad) == {
        "prog_type": 0, "insn_cnt": 4, "insns": 8, "license": 16, "log_level": 24, "log_size": 28, "log_buf": 32,
        "kern_version": 40, "prog_flags": 44, "prog_name": 48, "prog_ifindex": 64, "expected_attach_type": 68,
    }  # fmt: skip
    assert ctypes.sizeof(bpfsys._MapCreate) == 44 and bpfsys._MapCreate.map_name.offset == 28
    assert offsets(bpfsys._MapElem) == {"map_fd": 0, "pad": 4, "key": 8, "value": 16, "flags": 24}
    assert ctypes.sizeof(bpfsys._LinkCreate) == 16 and ctypes.sizeof(bpfsys._InfoByFd) == 16
    assert bpfsys._ProgQuery.prog_ids.offset == 16 and bpfsys._ProgQuery.prog_cnt.offset == 24


def test_syscall_numbers_per_architecture() -> None:
    assert bpfsys.syscall_number("x86_64") == 321
    assert bpfsys.syscall_number("aarch64") == 280
    with pytest.raises(OSError, match="unknown syscall number on s390x"):
        bpfsys.syscall_number("s390x")


def test_a_refused_program_carries_the_verifier_log(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def refuse(cmd: int, attr: Any, what: str) -> int:
        calls.append(attr.log_level)
        ctypes.memmove(attr.log_buf, b"0: (95) exit\nR0 !read_ok\n\0", 26)
        raise OSError(13, "bpf prog load: Permission denied")

    monkeypatch.setattr(bpfsys, "bpf", refuse)
    with pytest.raises(bpfsys.VerifierError) as caught:
        bpfsys.load_program(18, 10, bytes(8), "imds_connect4")
    assert calls == [bpfsys.BPF_LOG_STATS, bpfsys.BPF_LOG_LEVEL1], "retried with the full log"
    assert caught.value.errno == 13 and caught.value.log == "0: (95) exit\nR0 !read_ok"
    assert str(caught.value) == "the kernel refused program imds_connect4: Permission denied\n0: (95) exit\nR0 !read_ok"


def test_an_accepted_program_returns_its_fd_and_the_verifier_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    def accept(cmd: int, attr: Any, what: str) -> int:
        assert (cmd, attr.prog_type, attr.expected_attach_type, attr.insn_cnt) == (5, 18, 11, 2)
        assert attr.prog_name == b"imds_connect6"
        ctypes.memmove(attr.log_buf, b"processed 2 insns\n\0", 19)
        return 9

    monkeypatch.setattr(bpfsys, "bpf", accept)
    assert bpfsys.load_program(18, 11, bytes(16), "imds_connect6") == (9, "processed 2 insns")


def test_a_missing_key_is_none_and_other_errors_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(cmd: int, attr: Any, what: str) -> int:
        raise OSError(2, "bpf map lookup: No such file or directory")

    monkeypatch.setattr(bpfsys, "bpf", missing)
    assert bpfsys.lookup(3, bytes(8), 64) is None

    def found(cmd: int, attr: Any, what: str) -> int:
        assert ctypes.string_at(attr.key, 8) == struct.pack("=Q", 77)
        ctypes.memmove(attr.value, b"\x01\x02", 2)
        return 0

    monkeypatch.setattr(bpfsys, "bpf", found)
    assert bpfsys.lookup(3, struct.pack("=Q", 77), 4) == b"\x01\x02\x00\x00"


def test_link_and_program_info_are_read_at_their_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    link = struct.pack("=III4xQI", 1, 21, 42, 6618, 10).ljust(256, b"\0")  # type cgroup, id, prog id, cgroup, type
    monkeypatch.setattr(bpfsys, "object_info", lambda fd, size=256: link)
    assert bpfsys.link_info(5) == (21, 42, 6618, 10)
    assert bpfsys.prog_id(5) == 21
