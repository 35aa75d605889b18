"""disasm.point_at_field_store: where a route probe may sit at `s.f = v` for a string or pointer field.

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


def point(c: Code, allowed: set[int] | None = None, disp: int = DISP, words: int = 2) -> disasm.AfterStore:
    sw = disasm.sweep("amd64", c.b, BASE)
    assert sw.complete

    def code_at(addr: int, n: int) -> bytes:
        return c.b[addr - BASE:addr - BASE + n]

    return disasm.point_at_field_store("amd64", sw, code_at, disp, {WB} if allowed is None else allowed, words)


def test_the_go_shape_gives_the_call_after_the_pointer_store_and_the_base_register() -> None:
    c = go121()
    p = point(c)
    assert (p.addr, p.base, p.words) == (c.here - 1 - 5, "rax", ("", "")), p
    assert p.reason.startswith("call ")
    # the je in the middle lands on the pointer store: it is decoded where the code says
    je = [i for i in disasm.sweep("amd64", c.b, BASE).insns if i.mnemonic == "je"][0]
    store = [i for i in disasm.sweep("amd64", c.b, BASE).insns if i.op_str == "qword ptr [rax + 0x70], rdx"][0]
    assert int(je.op_str, 16) == store.address


def test_plain_instructions_between_are_walked_over() -> None:
    c = go121(between=b"\x48\x89\xd9" + b"\x0f\xb6\x70\x68")   # mov rcx, rbx ; movzx esi, byte [rax+0x68]
    p = point(c)
    assert (p.addr, p.base) == (c.here - 1 - 5, "rax"), p


def test_the_base_register_overwritten_after_the_stores_moves_the_point_to_the_barrier_check() -> None:
    """No point after the stores sees the struct any more, but the je between the two words does:
    the length is in the struct there, the pointer still in the register it is stored from."""
    for between in (b"\x48\x89\xd8", b"\x31\xc0"):            # mov rax, rbx ; xor eax, eax
        c = go121(between=between)
        p = point(c)
        je = [i for i in disasm.sweep("amd64", c.b, BASE).insns if i.mnemonic == "je"][0]
        assert (p.addr, p.base, p.words) == (je.address, "rax", ("rdx", "")), p
        assert "pointer in rdx, length stored" in p.reason, p


def test_the_pointers_register_overwritten_before_its_store_is_refused_too() -> None:
    # mov rdx, rbx between the barrier's buffer store and the pointer store, and rax overwritten after
    c = Code()
    c.add(b"\x48\x89\x48\x78")                       # mov [rax+0x78], rcx    (len)
    c.add(b"\x83\x3d\x00\x00\x00\x00\x00")           # cmp dword ptr [rip], 0
    c.add(b"\x74\x0a")                               # je  +10 -> the mov rdx, rbx
    c.add(b"\x48\x8b\x48\x70")                       # mov rcx, [rax+0x70]
    c.call(WB)
    c.add(b"\x48\x89\xda")                           # mov rdx, rbx
    c.add(b"\x48\x89\x50\x70")                       # mov [rax+0x70], rdx    (ptr)
    c.add(b"\x31\xc0")                               # xor eax, eax
    c.call(NEXT)
    c.add(b"\xc3")
    p = point(c)
    assert p.addr == 0 and "overwrites rax" in p.reason and "overwrites rdx before its store" in p.reason, p


def test_a_function_that_returns_right_after_the_stores_gets_the_check_between_them() -> None:
    """echo v4.13+'s Router.Find: `ctx.path = rPath; ctx.pnames = rPNames` are its last lines."""
    c = Code()
    c.add(b"\x48\x89\x48\x78")                       # mov [rax+0x78], rcx    (len)
    c.add(b"\x83\x3d\x00\x00\x00\x00\x00")           # cmp dword ptr [rip], 0
    je_at = c.here
    c.add(b"\x74\x0d")                               # je  +13 -> the pointer store
    c.add(b"\x48\x8b\x48\x70")                       # mov rcx, [rax+0x70]
    c.call(WB)
    c.add(b"\x49\x89\x13")                           # mov [r11], rdx
    c.add(b"\x90")
    c.add(b"\x48\x89\x50\x70")                       # mov [rax+0x70], rdx    (ptr)
    c.add(b"\x48\x83\xc4\x10\x5d\xc3")               # add rsp, 0x10 ; pop rbp ; ret
    p = point(c)
    assert (p.addr, p.base, p.words) == (je_at, "rax", ("rdx", "")), p


def mux_shape(clobber: bool = False) -> tuple[Code, int]:
    """`if match.Route == nil { match.Route = r }` with match in rcx, r in rax; (code, the je's address)."""
    c = Code()
    c.add(b"\x48\x83\x39\x00")                       # cmp qword ptr [rcx], 0
    jne_at = c.here
    c.add(b"\x75\x00")                               # jne -> the join past the store (patched below)
    c.add(b"\x83\x3d\x00\x00\x00\x00\x00")           # cmp dword ptr [rip], 0
    je_at = c.here
    c.add(b"\x74\x0e" if clobber else b"\x74\x0c")    # je -> the store
    c.add(b"\x48\x8b\x11")                           # mov rdx, [rcx]
    c.call(WB)
    c.add(b"\x49\x89\x03")                           # mov [r11], rax
    c.add(b"\x49\x89\x53\x08")                       # mov [r11+8], rdx
    if clobber:
        c.add(b"\x31\xc0")                           # xor eax, eax
    c.add(b"\x48\x89\x01")                           # mov [rcx], rax         (the field)
    join = c.here
    c.call(NEXT)
    c.add(b"\xc3")
    off = jne_at - BASE
    c.b = c.b[:off + 1] + bytes([join - (jne_at + 2)]) + c.b[off + 2:]
    return c, je_at


def test_a_pointer_field_at_zero_read_from_its_register_before_the_store() -> None:
    """gorilla/mux's Route.Match: the code after the store is also where the `!= nil` branch lands,
    so the point is the barrier check before the store, reading the pointer from its register."""
    c, je_at = mux_shape()
    p = point(c, disp=0, words=1)
    assert (p.addr, p.base, p.words) == (je_at, "rcx", ("rax",)), p
    assert "pointer in rax" in p.reason, p
    p = point(mux_shape(clobber=True)[0], disp=0, words=1)
    assert p.addr == 0 and "overwrites rax before its store" in p.reason, p


def test_a_call_that_is_not_the_write_barrier_is_refused() -> None:
    p = point(go121(), allowed=set())
    assert p.addr == 0 and "a call at" in p.reason, p


def test_more_than_one_assignment_is_refused() -> None:
    p = point(go121(second_ptr_store=True))
    assert p.addr == 0 and "2 stores of the field's pointer word" in p.reason, p


def test_a_branch_from_outside_into_the_stretch_is_refused() -> None:
    # a jmp placed before the assignment, landing on the call after it (skipping the stores): the
    # call is no point any more, the je between the words still is (it runs whenever they are stored)
    probe = go121(prefix=b"\xeb\x00")
    target = probe.here - 1 - 5                                # the call's address once the prefix is in
    rel = target - (BASE + 2)
    assert 0 < rel < 128
    c = go121(prefix=b"\xeb" + bytes([rel]))
    p = point(c)
    je = [i for i in disasm.sweep("amd64", c.b, BASE).insns if i.mnemonic == "je"][0]
    assert (p.addr, p.words) == (je.address, ("rdx", "")), p
    # landing on the pointer store instead: that store also runs without the je; nothing is left
    store = [i for i in disasm.sweep("amd64", c.b, BASE).insns if i.op_str == "qword ptr [rax + 0x70], rdx"][0]
    p = point(go121(prefix=b"\xeb" + bytes([store.address - (BASE + 2)])))
    assert p.addr == 0 and "lands between the store" in p.reason and "lands inside the assignment" in p.reason, p


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
