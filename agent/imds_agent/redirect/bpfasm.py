"""A small typed eBPF assembler: readable program source in, ``struct bpf_insn`` bytes out.

Why bytecode assembled here rather than restricted C compiled at package build time: neither the hosts that run
the agent nor the hosts that build its packages have clang (and the distributions' Python packaging has no step
for it), the programs are a few dozen instructions that read as easily as their C would, and the C compiler
would not be the real check anyway: the kernel's verifier is, at load time, on the host that runs them. What the
assembler must get right is the encoding, which its unit tests pin down with golden bytes.

An instruction is 8 bytes: opcode, dst and src register nibbles, a signed 16-bit offset, a signed 32-bit
immediate (linux/bpf.h, Documentation/bpf/standardization/instruction-set.rst). ``BPF_LD | BPF_DW | BPF_IMM``
takes two slots; with src = BPF_PSEUDO_MAP_FD its immediate is a map fd that the kernel swaps for the map. Jumps
name labels; their offsets (in slots, from the next instruction) are resolved by ``assemble``. Maps are named
too and resolved to fds at assembly, so a program's structure can be built and tested without a kernel.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

# Instruction classes, sizes, modes and sources (linux/bpf_common.h, linux/bpf.h).
LD, LDX, ST, STX, ALU, JMP, JMP32, ALU64 = range(8)
W, H, B, DW = 0x00, 0x08, 0x10, 0x18
IMM, MEM = 0x00, 0x60
K, X = 0x00, 0x08
BPF_PSEUDO_MAP_FD = 1

ALU_OPS = {"add": 0x00, "sub": 0x10, "mul": 0x20, "div": 0x30, "or": 0x40, "and": 0x50, "lsh": 0x60,
           "rsh": 0x70, "mod": 0x90, "xor": 0xA0, "mov": 0xB0, "arsh": 0xC0}  # fmt: skip
JMP_OPS = {"ja": 0x00, "jeq": 0x10, "jgt": 0x20, "jge": 0x30, "jset": 0x40, "jne": 0x50, "jsgt": 0x60,
           "jsge": 0x70, "jlt": 0xA0, "jle": 0xB0, "jslt": 0xC0, "jsle": 0xD0}  # fmt: skip
CALL, EXIT = 0x80, 0x90
SIZES = {1: B, 2: H, 4: W, 8: DW}

_INSN = struct.Struct("<BBhi")


class Reg(enum.IntEnum):
    """The eleven registers: r0 return value, r1-r5 arguments (clobbered by calls), r6-r9 callee-saved, r10 the
    read-only frame pointer."""

    R0 = 0
    R1 = 1
    R2 = 2
    R3 = 3
    R4 = 4
    R5 = 5
    R6 = 6
    R7 = 7
    R8 = 8
    R9 = 9
    R10 = 10


R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = tuple(Reg)
FP = Reg.R10


def _imm32(value: int) -> int:
    """A 32-bit immediate as the signed field holds it; unsigned spellings (0xfea9fea9) are accepted."""
    if not -(1 << 31) <= value < (1 << 32):
        raise ValueError(f"immediate {value:#x} does not fit in 32 bits")
    return value - (1 << 32) if value >= (1 << 31) else value


@dataclass(frozen=True)
class Insn:
    """One 8-byte instruction slot, validated on construction."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 0xFF:
            raise ValueError(f"opcode {self.code:#x} is not a byte")
        if not (0 <= self.dst <= 10 and 0 <= self.src <= 10):
            raise ValueError(f"register out of range in {self}")
        if not -(1 << 15) <= self.off < (1 << 15):
            raise ValueError(f"offset {self.off} does not fit in 16 bits")
        object.__setattr__(self, "imm", _imm32(self.imm))

    def encode(self) -> bytes:
        """The instruction as the kernel reads it (little-endian host: dst in the low nibble)."""
        return _INSN.pack(self.code, (self.src << 4) | self.dst, self.off, self.imm)


@dataclass(frozen=True)
class Label:
    """A jump target: the next instruction emitted after it."""

    name: str


@dataclass(frozen=True)
class Jump:
    """A conditional or unconditional jump to a label, resolved at assembly."""

    code: int
    dst: int
    src: int
    imm: int
    target: str


@dataclass(frozen=True)
class LoadMap:
    """``dst = map`` (BPF_LD_IMM64 with BPF_PSEUDO_MAP_FD): two slots, the fd of the named map."""

    dst: int
    name: str


Item = Union[Insn, Label, Jump, LoadMap]


def _slots(item: Item) -> int:
    return 0 if isinstance(item, Label) else 2 if isinstance(item, LoadMap) else 1


class Program:
    """A program under construction: call the instruction methods in order, then ``assemble``."""

    def __init__(self) -> None:
        self.items: list[Item] = []

    # --- moves and arithmetic -----------------------------------------------------------------------------------
    def mov(self, dst: Reg, src: Union[Reg, int]) -> Program:
        """64-bit ``dst = src`` (a register, or an immediate sign-extended to 64 bits)."""
        return self.alu("mov", dst, src)

    def mov32(self, dst: Reg, src: Union[Reg, int]) -> Program:
        """32-bit ``dst = src``: writes the low half and zeroes the high half (so 0xfea9fea9 stays unsigned)."""
        return self.alu("mov", dst, src, wide=False)

    def alu(self, op: str, dst: Reg, src: Union[Reg, int], wide: bool = True) -> Program:
        """``dst op= src``; ``wide`` picks ALU64 over 32-bit ALU."""
        cls = ALU64 if wide else ALU
        if isinstance(src, Reg):
            self.items.append(Insn(cls | ALU_OPS[op] | X, dst, src))
        else:
            self.items.append(Insn(cls | ALU_OPS[op] | K, dst, 0, 0, src))
        return self

    # --- memory -------------------------------------------------------------------------------------------------
    def load(self, size: int, dst: Reg, src: Reg, off: int) -> Program:
        """``dst = *(u<size*8> *)(src + off)`` (zero-extended)."""
        self.items.append(Insn(LDX | SIZES[size] | MEM, dst, src, off))
        return self

    def store(self, size: int, dst: Reg, off: int, src: Reg) -> Program:
        """``*(u<size*8> *)(dst + off) = src``."""
        self.items.append(Insn(STX | SIZES[size] | MEM, dst, src, off))
        return self

    def store_imm(self, size: int, dst: Reg, off: int, imm: int) -> Program:
        """``*(u<size*8> *)(dst + off) = imm`` (not into the context: the verifier wants a register there)."""
        self.items.append(Insn(ST | SIZES[size] | MEM, dst, 0, off, imm))
        return self

    def load_imm64(self, dst: Reg, value: int) -> Program:
        """``dst = value`` for a full 64-bit constant (BPF_LD_IMM64: two slots, low half first)."""
        if not 0 <= value < (1 << 64):
            raise ValueError(f"constant {value:#x} is not an unsigned 64-bit value")
        self.items.append(Insn(LD | DW | IMM, dst, 0, 0, value & 0xFFFFFFFF))
        self.items.append(Insn(0, 0, 0, 0, value >> 32))
        return self

    def load_map(self, dst: Reg, name: str) -> Program:
        """``dst = &map`` for the map that ``assemble`` is given under ``name``."""
        self.items.append(LoadMap(dst, name))
        return self

    # --- control flow -------------------------------------------------------------------------------------------
    def label(self, name: str) -> Program:
        """Mark the next instruction as ``name``."""
        self.items.append(Label(name))
        return self

    def jump(self, op: str, dst: Reg, src: Union[Reg, int], target: str, wide: bool = True) -> Program:
        """``if dst <op> src goto target``; ``wide=False`` compares the low 32 bits only (JMP32)."""
        cls = JMP if wide else JMP32
        if isinstance(src, Reg):
            self.items.append(Jump(cls | JMP_OPS[op] | X, dst, src, 0, target))
        else:
            self.items.append(Jump(cls | JMP_OPS[op] | K, dst, 0, _imm32(src), target))
        return self

    def goto(self, target: str) -> Program:
        """``goto target``."""
        self.items.append(Jump(JMP | JMP_OPS["ja"], 0, 0, 0, target))
        return self

    def call(self, helper: int) -> Program:
        """Call helper number ``helper`` (arguments in r1-r5, result in r0)."""
        self.items.append(Insn(JMP | CALL, 0, 0, 0, helper))
        return self

    def exit(self) -> Program:
        """Return r0."""
        self.items.append(Insn(JMP | EXIT))
        return self

    # --- assembly -----------------------------------------------------------------------------------------------
    def labels(self) -> dict[str, int]:
        """Each label's slot index."""
        where: dict[str, int] = {}
        slot = 0
        for item in self.items:
            if isinstance(item, Label):
                if item.name in where:
                    raise ValueError(f"label {item.name!r} defined twice")
                where[item.name] = slot
            slot += _slots(item)
        return where

    def instructions(self, maps: Mapping[str, int]) -> list[Insn]:
        """The program as instruction slots, jumps resolved and maps replaced by their fds."""
        where = self.labels()
        out: list[Insn] = []
        for item in self.items:
            if isinstance(item, Insn):
                out.append(item)
            elif isinstance(item, Jump):
                if item.target not in where:
                    raise ValueError(f"jump to undefined label {item.target!r}")
                out.append(Insn(item.code, item.dst, item.src, where[item.target] - (len(out) + 1), item.imm))
            elif isinstance(item, LoadMap):
                if item.name not in maps:
                    raise ValueError(f"no fd given for map {item.name!r}")
                out.append(Insn(LD | DW | IMM, item.dst, BPF_PSEUDO_MAP_FD, 0, maps[item.name]))
                out.append(Insn(0))
        return out

    def assemble(self, maps: Mapping[str, int]) -> bytes:
        """The bytes BPF_PROG_LOAD takes."""
        return b"".join(insn.encode() for insn in self.instructions(maps))
