"""The bpf(2) syscall through ctypes: create a map, load a program, link it to a cgroup, read maps and info back.

Only the commands the ebpf backend uses, each with its ``union bpf_attr`` member laid out as in linux/bpf.h (the
kernel accepts a shorter attr than its own and zero-fills the rest). Every object comes back as a plain fd that
the caller owns and closes; a link lives exactly as long as its fd, so the programs detach when the agent exits.
Failures raise OSError with the errno and the command; a refused program raises VerifierError carrying the
verifier's log.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from typing import Optional

# Commands (enum bpf_cmd).
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_MAP_TYPE_LRU_HASH = 9
BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT = 10, 11
BPF_LOG_LEVEL1, BPF_LOG_STATS = 1, 4
BPF_F_QUERY_EFFECTIVE = 1
BPF_OBJ_NAME_LEN = 16

_SYS_BPF = {"x86_64": 321, "aarch64": 280, "arm64": 280}
_LOG_SIZE = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)


class VerifierError(OSError):
    """BPF_PROG_LOAD refused a program; ``log`` is what the verifier said."""

    def __init__(self, code: int, name: str, log: str) -> None:
        super().__init__(code, f"the kernel refused program {name}: {os.strerror(code)}")
        self.log = log

    def __str__(self) -> str:
        return f"{self.strerror}\n{self.log}" if self.log else str(self.strerror)


class _MapCreate(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("inner_map_fd", ctypes.c_uint32),
                ("numa_node", ctypes.c_uint32), ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN)]  # fmt: skip


class _MapElem(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]  # fmt: skip


class _ProgLoad(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN), ("prog_ifindex", ctypes.c_uint32),
                ("expected_attach_type", ctypes.c_uint32)]  # fmt: skip


class _LinkCreate(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("flags", ctypes.c_uint32)]  # fmt: skip


class _InfoByFd(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class _ProgQuery(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32), ("prog_ids", ctypes.c_uint64),
                ("prog_cnt", ctypes.c_uint32)]  # fmt: skip


def syscall_number(machine: Optional[str] = None) -> int:
    """bpf(2)'s number on this architecture."""
    machine = machine or platform.machine()
    if machine not in _SYS_BPF:
        raise OSError(38, f"bpf(2): unknown syscall number on {machine}")  # ENOSYS
    return _SYS_BPF[machine]


def bpf(cmd: int, attr: ctypes.Structure, what: str) -> int:
    """Call bpf(cmd, &attr, sizeof attr); the result, or OSError naming ``what``."""
    result = int(_libc.syscall(syscall_number(), cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"bpf {what}: {os.strerror(code)}")
    return result


def _name(name: str) -> bytes:
    return name.encode()[: BPF_OBJ_NAME_LEN - 1]


def create_map(map_type: int, key_size: int, value_size: int, max_entries: int, name: str) -> int:
    """A new map's fd."""
    attr = _MapCreate(map_type, key_size, value_size, max_entries, 0, 0, 0, _name(name))
    return bpf(BPF_MAP_CREATE, attr, f"map create {name}")


def lookup(map_fd: int, key: bytes, value_size: int) -> Optional[bytes]:
    """The value under ``key``, or None when there is none (ENOENT)."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    value = ctypes.create_string_buffer(value_size)
    attr = _MapElem(map_fd, 0, ctypes.addressof(key_buf), ctypes.addressof(value), 0)
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, attr, "map lookup")
    except OSError as exc:
        if exc.errno == 2:
            return None
        raise
    return value.raw


def update(map_fd: int, key: bytes, value: bytes) -> None:
    """Set ``key`` to ``value`` (BPF_ANY)."""
    key_buf = ctypes.create_string_buffer(key, len(key))
    value_buf = ctypes.create_string_buffer(value, len(value))
    bpf(BPF_MAP_UPDATE_ELEM, _MapElem(map_fd, 0, ctypes.addressof(key_buf), ctypes.addressof(value_buf), 0),
        "map update")  # fmt: skip


def load_program(prog_type: int, attach_type: int, code: bytes, name: str, license: str = "GPL") -> tuple[int, str]:
    """Load a program: (its fd, the verifier's statistics line). A refusal is retried once with the full
    instruction log, which VerifierError then carries."""
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(_LOG_SIZE)
    for level in (BPF_LOG_STATS, BPF_LOG_LEVEL1):
        attr = _ProgLoad(prog_type, len(code) // 8, ctypes.addressof(insns), ctypes.addressof(lic), level, _LOG_SIZE,
                         ctypes.addressof(log), 0, 0, _name(name), 0, attach_type)  # fmt: skip
        try:
            return bpf(BPF_PROG_LOAD, attr, f"prog load {name}"), log.value.decode(errors="replace").strip()
        except OSError as exc:
            failure = exc
    text = log.value.decode(errors="replace").strip()
    raise VerifierError(failure.errno or 22, name, text) from None


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach a program to ``target_fd`` (a cgroup directory) through a link; the link's fd. Cgroup links attach
    as BPF_F_ALLOW_MULTI: programs others attached to the cgroup or its ancestors keep running beside ours."""
    return bpf(BPF_LINK_CREATE, _LinkCreate(prog_fd, target_fd, attach_type, 0), "link create")


def object_info(fd: int, size: int = 256) -> bytes:
    """The raw bpf_prog_info / bpf_link_info / bpf_map_info of ``fd``."""
    buf = ctypes.create_string_buffer(size)
    bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoByFd(fd, size, ctypes.addressof(buf)), "obj get info")
    return buf.raw


def prog_id(prog_fd: int) -> int:
    """A program's id (bpf_prog_info.id)."""
    return int(struct.unpack_from("=I", object_info(prog_fd), 4)[0])


def link_info(link_fd: int) -> tuple[int, int, int, int]:
    """A cgroup link's (link id, program id, cgroup id, attach type); cgroup id 0 once it was detached."""
    raw = object_info(link_fd)
    _, link_id, program = struct.unpack_from("=III", raw)
    cgroup_id, attach_type = struct.unpack_from("=QI", raw, 16)
    return link_id, program, cgroup_id, attach_type


def query_cgroup(cgroup_fd: int, attach_type: int, effective: bool = False) -> list[int]:
    """The ids of the programs attached to the cgroup for ``attach_type`` (with ``effective``, inherited too)."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _ProgQuery(cgroup_fd, attach_type, BPF_F_QUERY_EFFECTIVE if effective else 0, 0, ctypes.addressof(ids), 64)
    bpf(BPF_PROG_QUERY, attr, "prog query")
    return list(ids[: attr.prog_cnt])
