"""The assembler's encoding against golden bytes (checked by hand against linux/bpf.h), labels and the 2-slot loads."""

from __future__ import annotations

import pytest

from imds_agent.redirect.bpfasm import FP, R0, R1, R2, R6, Insn, Program


def one(p: Program) -> str:
    return p.assemble({}).hex()


@pytest.mark.parametrize(
    ("build", "golden"),
    [
        (lambda p: p.mov(R0, 1), "b700000001000000"),  # ALU64|MOV|K
        (lambda p: p.mov(R6, R1), "bf16000000000000"),  # ALU64|MOV|X, src r1 in the high nibble
        (lambda p: p.mov32(R2, 0xFEA9FEA9), "b4020000a9fea9fe"),  # ALU|MOV|K, unsigned spelling
        (lambda p: p.alu("rsh", R0, 32), "7700000020000000"),
        (lambda p: p.alu("add", R1, -24), "07010000e8ffffff"),
        (lambda p: p.load(4, R2, R1, 36), "6112240000000000"),  # LDX|W|MEM
        (lambda p: p.store(4, R6, 4, R2), "6326040000000000"),  # STX|W|MEM
        (lambda p: p.store(2, FP, -8, R2), "6b2af8ff00000000"),  # STX|H|MEM
        (lambda p: p.store_imm(8, FP, -72, 0), "7a0ab8ff00000000"),  # ST|DW|MEM
        (lambda p: p.call(14), "850000000e000000"),
        (lambda p: p.exit(), "9500000000000000"),
    ],
)
def test_single_instructions_encode_to_golden_bytes(build, golden: str) -> None:
    assert one(build(Program())) == golden


def test_a_map_load_is_the_ld_imm64_pair_with_the_pseudo_map_fd() -> None:
    code = Program().load_map(R1, "records").assemble({"records": 7})
    assert code.hex() == "1811000007000000" + "0000000000000000"


def test_a_64_bit_constant_is_split_low_half_first() -> None:
    code = Program().load_imm64(R2, 0x1122334455667788).assemble({})
    assert code.hex() == "1802000088776655" + "0000000044332211"


def test_jumps_resolve_forward_and_backward_in_slots_after_the_jump() -> None:
    p = Program().label("top").mov(R0, 0).jump("jne", R2, 6, "end", wide=False)
    p.load_map(R1, "m").goto("top").label("end").exit()
    insns = p.instructions({"m": 3})
    assert [i.code for i in insns] == [0xB7, 0x56, 0x18, 0x00, 0x05, 0x95]
    assert insns[1].off == 3, "skips the two-slot map load and the goto"
    assert insns[4].off == -5, "back to slot 0 from slot 5"
    assert p.labels() == {"top": 0, "end": 5}


def test_jump_immediates_keep_32_bits_and_jmp32_is_its_own_class() -> None:
    p = Program().jump("jeq", R0, 0xFFFFFFFF, "x", wide=False).jump("jeq", R0, 1, "x").label("x").exit()
    first, second, _ = p.instructions({})
    assert (first.code, first.imm, second.code) == (0x16, -1, 0x15)


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda: Program().goto("nowhere").assemble({}), "undefined label 'nowhere'"),
        (lambda: Program().label("a").label("a").exit().assemble({}), "label 'a' defined twice"),
        (lambda: Program().load_map(R1, "m").assemble({}), "no fd given for map 'm'"),
        (lambda: Insn(0xB7, 11), "register out of range"),
        (lambda: Insn(0x61, 1, 1, 1 << 15), "offset 32768"),
        (lambda: Insn(0xB7, 0, 0, 0, 1 << 32), "does not fit in 32 bits"),
        (lambda: Program().load_imm64(R0, -1), "not an unsigned 64-bit"),
    ],
)
def test_mistakes_are_refused_when_built_not_by_the_verifier(build, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        build()
