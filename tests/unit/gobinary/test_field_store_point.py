"""disasm.point_after_field_store: where a route probe may sit after `s.f = v` for a string field.

Machine code is written out byte by byte in the shapes Go emits (Go 1.21+: the length word, the
write-barrier check with its buffer call, the pointer word at the check's join), then bent one
way at a time; each bend must be refused with its reason. The real shapes of gin builds are checked
on real binaries in tests/e2e/test_ebpf_gin.py."""

from __future__ import annotations

import struct

from receiver.ebpf_go.gobinary import disasm

BASE = 0x1000
WB = 0x9000          # runtime.gcWriteBarrier2
NEXT = 0x8000        # the next call, e.g. (*Context).Next
DISP = 0x70


def call(at: int, target: int) -> bytes:
    return b"\xe8" + struct.pack("<i", target - (at + 5))


class Code:
    def __init__(self) -> None:
        self.b = b""

    def add(self, raw: bytes) -> Code:
        self.b += raw
        return self

    def call(self, target: int) -> Code:
        return self.add(call(BASE + len(self.b), target))

    @property
    def here(self) -> int:
        return BASE + len(self.b)


def go121(*, between: bytes = b"", wb_target: int = WB, second_ptr_store: bool = False, prefix: bytes = b"") -> Code:
    """`c.fullPath = v` with v in rdx (ptr) / rcx (len) and c in rax, then `call NEXT`."""
    c = Code().add(prefix)
    c.add(b"\x48\x89\x48\x78")                       # mov [rax+0x78], rcx    (len)
    c.add(b"\x83\x3d\x00\x00\x00\x00\x00")           # cmp dword ptr [rip], 0 (writeBarrier)
    c.add(b"\x74\x0d")                               # je  +13 -> the pointer store
    c.add(b"\x48\x8b\x48\x70")                       # mov rcx, [rax+0x70]    (old value for the buffer)
    c.call(wb_target)                                # call gcWriteBarrier2
    c.add(b"\x49\x89\x13")                           # mov [r11], rdx
    c.add(b"\x90")                                   # nop (pads the je to the store below)
    c.add(b"\x48\x89\x50\x70")                       # mov [rax+0x70], rdx    (ptr)
    if second_ptr_store:
        c.add(b"\x48\x89\x50\x70")
    c.add(between)
    c.call(NEXT)                                     # call (*Context).Next   <- the point
    c.add(b"\xc3")
    return c


def point(c: Code, allowed: set[int] | None = None) -> disasm.AfterStore:
    sw = disasm.sweep("amd64", c.b, BASE)
    assert sw.complete

    def code_at(addr: int, n: int) -> bytes:
        return c.b[addr - BASE:addr - BASE + n]

    return disasm.point_after_field_store("amd64", sw, code_at, DISP, {WB} if allowed is None else allowed)


def test_the_go_shape_gives_the_call_after_the_pointer_store_and_the_base_register() -> None:
    c = go121()
    p = point(c)
    assert (p.addr, p.base) == (c.here - 1 - 5, "rax"), p
    assert p.reason.startswith("call ")
    # the je in the middle lands on the pointer store: it is decoded where the code says
    je = [i for i in disasm.sweep("amd64", c.b, BASE).insns if i.mnemonic == "je"][0]
    store = [i for i in disasm.sweep("amd64", c.b, BASE).insns if i.op_str == "qword ptr [rax + 0x70], rdx"][0]
    assert int(je.op_str, 16) == store.address


def test_plain_instructions_between_are_walked_over() -> None:
    c = go121(between=b"\x48\x89\xd9" + b"\x0f\xb6\x70\x68")   # mov rcx, rbx ; movzx esi, byte [rax+0x68]
    p = point(c)
    assert (p.addr, p.base) == (c.here - 1 - 5, "rax"), p


def test_the_base_register_overwritten_is_refused() -> None:
    p = point(go121(between=b"\x48\x89\xd8"))                  # mov rax, rbx
    assert p.addr == 0 and "overwrites rax" in p.reason, p
    p = point(go121(between=b"\x31\xc0"))                      # xor eax, eax
    assert p.addr == 0 and "overwrites rax" in p.reason, p


def test_a_call_that_is_not_the_write_barrier_is_refused() -> None:
    p = point(go121(), allowed=set())
    assert p.addr == 0 and "a call at" in p.reason, p


def test_more_than_one_assignment_is_refused() -> None:
    p = point(go121(second_ptr_store=True))
    assert p.addr == 0 and "2 stores of the field's pointer word" in p.reason, p


def test_a_branch_from_outside_into_the_stretch_is_refused() -> None:
    # a jmp placed before the assignment, landing on the call after it (skipping the stores)
    probe = go121(prefix=b"\xeb\x00")
    target = probe.here - 1 - 5                                # the call's address once the prefix is in
    rel = target - (BASE + 2)
    assert 0 < rel < 128
    p = point(go121(prefix=b"\xeb" + bytes([rel])))
    assert p.addr == 0 and "lands between the store" in p.reason, p


def test_a_branch_leaving_the_assignment_is_refused() -> None:
    # Go 1.19's shape: the barrier's out-of-line path is a jne away, out of the assignment
    c = Code()
    c.add(b"\x48\x89\x48\x78")                       # mov [rax+0x78], rcx
    c.add(b"\x83\x3d\x00\x00\x00\x00\x00")           # cmp dword ptr [rip], 0
    c.add(b"\x75\x09")                               # jne +9 -> past the call below (out of line)
    c.add(b"\x48\x89\x50\x70")                       # mov [rax+0x70], rdx
    c.call(NEXT)
    c.add(b"\xc3")
    c.add(b"\xcc" * 4)
    p = point(c)
    assert p.addr == 0 and "leaves the assignment" in p.reason, p
