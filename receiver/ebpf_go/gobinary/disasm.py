"""Instruction-level facts from capstone: return sites and the cheap entry probe point.

A uprobe must sit on an instruction boundary (mid-instruction probes are accepted by the kernel
and silently corrupt the program), so every address returned here comes from a linear sweep that
starts at the function entry and steps instruction by instruction.

Cheap entry point (amd64): Go's regabi prologue checks the stack bound before touching anything,
in one of three shapes (`cmd/internal/obj/x86/obj6.go` `stacksplit`):

    small frame   cmp rsp, [r14+0x10]                 ; jbe morestack
    big frame     lea r12, [rsp-N] ; cmp r12, [r14+0x10] ; jbe morestack
    huge frame    mov r12, rsp ; sub r12, N ; jb morestack ; cmp r12, [r14+0x10] ; jbe morestack

The first conditional jump of that sequence is emulated by the kernel (~0.6 us) where `cmp` at the
entry is single-stepped (~9.5 us); only R12 (scratch, never an argument) has changed, so argument
registers, R14 (g) and [rsp] (return PC) are the entry's. We accept the point only when the jump
target lies inside the function and the tail there calls runtime.morestack* and jumps back to the
entry; anything else falls back to the entry itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import capstone


@dataclass(frozen=True)
class Insn:
    address: int
    size: int
    mnemonic: str
    op_str: str


@dataclass(frozen=True)
class Sweep:
    insns: list[Insn]
    complete: bool  # False when the sweep stopped at bytes capstone could not decode


_CS: dict[str, capstone.Cs] = {}


def _cs(arch: str) -> capstone.Cs:
    cs = _CS.get(arch)
    if cs is None:
        if arch == "amd64":
            cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        elif arch == "arm64":
            cs = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
        else:
            raise ValueError(f"unsupported architecture {arch}")
        cs.detail = False
        _CS[arch] = cs
    return cs


def sweep(arch: str, code: bytes, start: int) -> Sweep:
    """Linear sweep of `code` (loaded at `start`)."""
    cs = _cs(arch)
    insns: list[Insn] = []
    pos = 0
    while pos < len(code):
        got = False
        for addr, size, mnem, ops in cs.disasm_lite(code[pos:], start + pos):
            insns.append(Insn(addr, size, mnem, ops))
            pos += size
            got = True
        if pos >= len(code):
            break
        if arch == "amd64" and code[pos] == 0xCC or not got and arch == "arm64" and len(code) - pos >= 4:
            # capstone stops at int3 padding on some versions; and arm64 undefined words are data.
            step = 1 if arch == "amd64" else 4
            insns.append(Insn(start + pos, step, "(bad)" if arch == "arm64" else "int3", ""))
            pos += step
            continue
        return Sweep(insns, False)
    return Sweep(insns, True)


def return_sites(arch: str, sw: Sweep) -> list[int]:
    if arch == "amd64":
        return [i.address for i in sw.insns if i.mnemonic in ("ret", "retf", "retq")]
    return [i.address for i in sw.insns if i.mnemonic == "ret"]


_STACK_BOUND = "qword ptr [r14 + 0x10]"


@dataclass(frozen=True)
class EntryPoint:
    addr: int
    kind: str  # "jcc-after-stack-check" | "entry"
    reason: str


def _target(insn: Insn) -> int | None:
    try:
        return int(insn.op_str, 16)
    except ValueError:
        return None


def entry_point(arch: str, sw: Sweep, start: int, end: int, morestack: set[int] | None = None) -> EntryPoint:
    """The cheapest point at which a probe sees the function's entry state; see the module doc."""
    if arch != "amd64":
        return EntryPoint(start, "entry", f"{arch}: cheap entry point not implemented (untested architecture)")
    ins = sw.insns
    if not ins or ins[0].address != start:
        return EntryPoint(start, "entry", "no instructions decoded at the entry")
    jcc_idx: int | None = None
    check_idx = 0
    a = [(i.mnemonic, i.op_str) for i in ins[:5]]
    if len(a) >= 2 and a[0] == ("cmp", f"rsp, {_STACK_BOUND}") and a[1][0] == "jbe":
        jcc_idx, check_idx, shape = 1, 1, "cmp rsp,[r14+0x10]; jbe"
    elif (
        len(a) >= 3
        and a[0][0] == "lea"
        and a[0][1].startswith("r12, [rsp")
        and a[1] == ("cmp", f"r12, {_STACK_BOUND}")
        and a[2][0] == "jbe"
    ):
        jcc_idx, check_idx, shape = 2, 2, "lea r12,[rsp-N]; cmp r12,[r14+0x10]; jbe"
    elif (
        len(a) >= 5
        and a[0] == ("mov", "r12, rsp")
        and a[1][0] == "sub"
        and a[1][1].startswith("r12, ")
        and a[2][0] in ("jb", "jae")
        and a[3] == ("cmp", f"r12, {_STACK_BOUND}")
        and a[4][0] == "jbe"
    ):
        jcc_idx, check_idx, shape = 2, 4, "mov r12,rsp; sub r12,N; jb; cmp r12,[r14+0x10]; jbe"
    if jcc_idx is None:
        first = f"{ins[0].mnemonic} {ins[0].op_str}".strip()
        return EntryPoint(start, "entry", f"no stack-check prologue (first instruction: {first})")
    jcc = ins[jcc_idx]
    target = _target(ins[check_idx])
    if target is None or not (jcc.address < target < end):
        return EntryPoint(start, "entry", "stack-check jump does not land inside the function")
    # The morestack tail: ... call runtime.morestack* ; jmp <entry>
    tail = [i for i in ins if i.address >= target]
    call_ok = False
    jmp_back = False
    for i in tail[:24]:
        if i.mnemonic == "call":
            t = _target(i)
            call_ok = morestack is None or (t is not None and t in morestack)
        elif i.mnemonic == "jmp" and _target(i) == start:
            jmp_back = True
            break
    if not (call_ok and jmp_back):
        return EntryPoint(start, "entry", "stack-check jump target is not a morestack tail")
    return EntryPoint(jcc.address, "jcc-after-stack-check", f"{shape} at +{jcc.address - start}")


# ---- return points in callers ---------------------------------------------------------------
#
# x86 instructions the kernel emulates at a uprobe instead of single-stepping them out of line
# (arch/x86/kernel/uprobes.c: branch_setup_xol_ops, push_setup_xol_ops), by their bytes: call
# rel32, jmp rel8/rel32, jcc rel8/rel32, push r64. NOPs are emulated only by recent kernels: left out.
def is_emulated(code: bytes) -> bool:
    if not code:
        return False
    b0 = code[0]
    b1 = code[1] if len(code) > 1 else -1
    return (b0 in (0xE8, 0xE9, 0xEB) or 0x70 <= b0 <= 0x7F or (b0 == 0x0F and 0x80 <= b1 <= 0x8F)
            or 0x50 <= b0 <= 0x57 or (b0 == 0x41 and 0x50 <= b1 <= 0x57))


def _branch_into(ins: list[Insn], lo: int, hi: int, point: Insn, inside_ok: bool = False) -> Insn | None:
    """A direct jump or call of the function, other than `point`, that lands in (lo, hi]: then that
    stretch is not reached only by straight-line code from lo. `inside_ok`: jumps that themselves
    sit in (lo, hi) are allowed (a write-barrier check that starts and ends inside the stretch)."""
    for other in ins:
        t = _target(other) if other.mnemonic.startswith("j") or other.mnemonic == "call" else None
        if t is None or other is point or not lo < t <= hi:
            continue
        if inside_ok and lo < other.address < hi and other.mnemonic != "call":
            continue
        return other
    return None


# Instructions that end the straight line after a call: control leaves or the program stops.
_LEAVES = frozenset({"ret", "retf", "retq", "jmp", "int3", "ud2", "hlt", "syscall", "iretq", "int"})


@dataclass(frozen=True)
class AfterCall:
    addr: int  # 0 when there is no usable point (reason says why)
    call_site: int
    reason: str


def point_after_call(arch: str, sw: Sweep, code_at: Any, callee: int, max_insns: int = 24) -> AfterCall:
    """The first instruction after the one direct `call callee` of a swept function that the kernel
    emulates, reached from the call by straight-line code only.

    Between the call and the point only non-branching instructions and indirect calls (which return
    to the next instruction or unwind by panic, like the callee itself) are allowed, and no branch
    of the function may land in that stretch, so the point runs exactly once after every normal
    return of the callee from that call site and never otherwise. `code_at(addr, n)` reads bytes."""
    if arch != "amd64":
        return AfterCall(0, 0, f"{arch}: not implemented")
    ins = sw.insns
    sites = [k for k, i in enumerate(ins) if i.mnemonic == "call" and _target(i) == callee]
    if len(sites) != 1:
        return AfterCall(0, 0, f"{len(sites)} direct calls of the callee (need exactly one)")
    return point_after_call_site(sw, code_at, sites[0], max_insns)


def point_after_call_site(sw: Sweep, code_at: Any, k: int, max_insns: int = 24) -> AfterCall:
    """`point_after_call` for the call that is instruction `k` of the sweep (amd64). The stack pointer
    must not change on the way (the point sees the caller's frame as the call left it)."""
    ins = sw.insns
    call = ins[k]
    for j in range(k + 1, min(k + 1 + max_insns, len(ins))):
        i = ins[j]
        if is_emulated(code_at(i.address, min(i.size, 2))):
            if i.mnemonic == "call" and _target(i) is None:
                continue  # defensive: an indirect call never has an emulated opcode
            lo, hi = call.address, i.address
            other = _branch_into(ins, lo, hi, i)
            if other is not None:
                return AfterCall(0, call.address, f"a branch at {other.address:#x} lands between the call "
                                                  f"and {hi:#x}")
            return AfterCall(i.address, call.address,
                             f"{i.mnemonic} {i.op_str} at +{i.address - call.address} after the call "
                             f"({j - k - 1} instructions between)")
        if i.mnemonic in _LEAVES or i.mnemonic.startswith("j") or i.mnemonic.startswith("loop"):
            return AfterCall(0, call.address, f"{i.mnemonic} at {i.address:#x} before any emulated instruction")
        if i.mnemonic in _STACK_OPS or _writes(i, "rsp"):
            return AfterCall(0, call.address, f"{i.mnemonic} {i.op_str} at {i.address:#x} moves the stack pointer")
    return AfterCall(0, call.address, f"no emulated instruction within {max_insns} instructions after the call")


@dataclass(frozen=True)
class AfterStore:
    addr: int    # 0 when there is no usable point (reason says why)
    base: str    # the register holding the struct's address at `addr` ("rax"), "" with addr 0
    reason: str
    # where each word of the field is at `addr`: "" in memory at base+disp(+8), else the register
    # that still holds the value about to be stored there
    words: tuple[str, ...] = ()


# A store of one 8-byte word into a struct field: `mov qword ptr [<base> + <disp>], <reg>`
# (capstone leaves out a zero displacement).
_STORE = re.compile(r"^qword ptr \[(?P<base>r[a-z0-9]+)(?: \+ (?P<disp>0x[0-9a-f]+))?\], (?P<src>r[a-z0-9]+)$")
# Registers by their 64-bit name, with the narrower names that write them.
_ALIASES = {"rsp": ("esp", "sp", "spl"), "rax": ("eax", "ax", "al", "ah"), "rbx": ("ebx", "bx", "bl", "bh"), "rcx": ("ecx", "cx", "cl", "ch"),
            "rdx": ("edx", "dx", "dl", "dh"), "rsi": ("esi", "si", "sil"), "rdi": ("edi", "di", "dil"),
            "rbp": ("ebp", "bp", "bpl"), **{f"r{n}": (f"r{n}d", f"r{n}w", f"r{n}b") for n in range(8, 16)}}
# Mnemonics whose first operand is only read.
_READ_ONLY = frozenset({"cmp", "test", "push", "nop", "bt", "ucomisd", "ucomiss", "comisd", "comiss"})
# Registers some instructions write without naming them (exact mnemonics; any `rep` form writes
# rcx, rdi and rsi).
_IMPLICIT = {"rax": {"mul", "div", "idiv", "cqo", "cdq", "cwd", "cpuid", "rdtsc", "lodsb", "lodsq", "cmpxchg"},
             "rdx": {"mul", "div", "idiv", "cqo", "cdq", "cwd", "cpuid", "rdtsc"},
             "rbx": {"cpuid"}, "rcx": {"cpuid", "syscall", "loop"}, "r11": {"syscall"},
             "rdi": {"stosb", "stosq", "movsb", "movsq"}, "rsi": {"movsb", "movsq", "lodsb", "lodsq"},
             "rsp": {"pop", "leave", "popfq", "enter"}}
_STACK_OPS = frozenset({"push", "pop", "pushfq", "popfq", "leave", "enter"})


def _writes(insn: Insn, reg: str) -> bool:
    """Whether `insn` may change `reg` (a 64-bit name): it is, or a narrower name of it is, the first
    operand of an instruction that is not a compare, an exchange names it, or it is written implicitly."""
    names = (reg, *_ALIASES.get(reg, ()))
    m = insn.mnemonic
    if m.startswith("j") or m in _READ_ONLY:
        return False
    operands = [o.strip() for o in insn.op_str.split(",")]
    if operands[0] in names:
        return True
    if m in ("xchg", "xadd", "cmpxchg") and any(o in names for o in operands):
        return True
    return m in _IMPLICIT.get(reg, ()) or m.startswith("rep") and reg in ("rcx", "rdi", "rsi")


def point_at_field_store(arch: str, sw: Sweep, code_at: Any, disp: int, allowed_calls: set[int],
                         words: int = 2, max_insns: int = 24) -> AfterStore:
    """A kernel-emulated instruction at which a function's one assignment of a struct field at `disp`
    (`s.f = v`: a string's pointer word at disp and length word at disp+8, or one pointer word) is
    readable: after the stores, from the struct (`point_after_field_store`), or else between or just
    before them, each word from the struct if it is stored already or from the register it is about
    to be stored from (`words` of the result says which).

    Go writes a pointer word with the write-barrier check before it (the barrier's buffer call,
    runtime.gcWriteBarrier*, in `allowed_calls`, keeps every register but R11). Accepted only when the
    function has exactly one store of each word, with one base register, and the stretch from the
    point or the first store (whichever is earlier) to the point or the last store is straight-line
    code apart from branches that start and end inside it, no other branch of the function lands in
    it, and nothing in it writes the register a word is read from: then the point runs once for every
    such assignment and sees the value assigned. Go 1.21+ ends some functions right after the
    assignment (echo's Router.Find) or jumps over the stretch after it (gorilla/mux's Route.Match):
    the point then sits at the barrier check's jcc inside or before the stores."""
    if arch != "amd64":
        return AfterStore(0, "", f"{arch}: not implemented")
    ins = sw.insns
    found = _field_stores(ins, disp, words, max_insns)
    if isinstance(found, str):
        return AfterStore(0, "", found)
    (first, last), base = found
    after = _point_after_stores(ins, code_at, first, last, base, allowed_calls, max_insns)
    if after.addr:
        return AfterStore(after.addr, base, after.reason, ("",) * words)
    within = _point_within_stores(ins, code_at, disp, words, first, last, base, allowed_calls, max_insns)
    return within if within.addr else AfterStore(0, "", f"{after.reason}; and before it: {within.reason}")


def _field_stores(ins: list[Insn], disp: int, words: int, max_insns: int) -> tuple[tuple[int, int], str] | str:
    """(index of the first and the last store, base register) of the field's one assignment, or why not."""
    stores: dict[int, list[tuple[int, str]]] = {disp + 8 * w: [] for w in range(words)}
    for k, i in enumerate(ins):
        if i.mnemonic != "mov":
            continue
        m = _STORE.match(i.op_str)
        if m is None or m["base"] in ("rsp", "r11"):     # r11: the write barrier's buffer
            continue
        d = int(m["disp"] or "0", 16)
        if d in stores:
            stores[d].append((k, m["base"]))
    got = [stores[disp + 8 * w] for w in range(words)]
    if words == 1:
        if len(got[0]) != 1:
            return f"{len(got[0])} stores of the field's pointer word at +{disp:#x} (need one)"
        (k, base), = got[0]
        return (k, k), base
    # a string assignment writes both words through one register, close together; a lone store at
    # one of the displacements through another register is some other object's field (echo v4.11's
    # Router.Find builds a closure with a word at +0x10 too)
    pairs = [(a, b) for a in got[0] for b in got[1] if a[1] == b[1] and abs(a[0] - b[0]) <= max_insns]
    if len(pairs) != 1:
        return (f"{len(got[0])} stores of the field's pointer word and {len(got[1])} of its length at "
                f"+{disp:#x}, {len(pairs)} through one register and close together (need one)")
    (kp, base), (kl, _) = pairs[0]
    if sum(1 for _, b in got[0] + got[1] if b == base) != 2:
        return f"more than one assignment of the field at +{disp:#x} through {base}"
    first, last = min(kp, kl), max(kp, kl)
    return (first, last), base


def _point_after_stores(ins: list[Insn], code_at: Any, first: int, last: int, base: str,
                        allowed_calls: set[int], max_insns: int) -> AfterStore:
    lo = ins[first].address
    for j in range(first + 1, min(last + 1 + max_insns, len(ins))):
        i = ins[j]
        if j > last and is_emulated(code_at(i.address, min(i.size, 2))):
            hi = i.address
            other = _branch_into(ins, lo, hi, i, inside_ok=True)
            if other is not None:
                return AfterStore(0, "", f"a branch at {other.address:#x} lands between the store and {hi:#x}")
            return AfterStore(hi, base, f"{i.mnemonic} {i.op_str} at +{hi - ins[last].address} after the store "
                                        f"(struct address in {base})")
        if i.mnemonic == "call":
            if _target(i) not in allowed_calls or base == "r11":
                return AfterStore(0, "", f"a call at {i.address:#x} between the store and any emulated instruction")
            continue
        if i.mnemonic in _LEAVES or i.mnemonic.startswith("loop"):
            return AfterStore(0, "", f"{i.mnemonic} at {i.address:#x} before any emulated instruction")
        if i.mnemonic.startswith("j"):
            t = _target(i)
            if j > last or t is None or not (ins[first].address < t <= ins[last].address):
                return AfterStore(0, "", f"a branch at {i.address:#x} leaves the assignment")
            continue
        if _writes(i, base):
            return AfterStore(0, "", f"{i.mnemonic} {i.op_str} at {i.address:#x} overwrites {base}")
    return AfterStore(0, "", f"no emulated instruction within {max_insns} instructions after the store")


def _point_within_stores(ins: list[Insn], code_at: Any, disp: int, words: int, first: int, last: int,
                         base: str, allowed_calls: set[int], max_insns: int) -> AfterStore:
    """The emulated instruction closest to the last store, from `max_insns` before the first store up
    to the last, that passes every check of `point_at_field_store`."""
    def store_of(w: int) -> tuple[int, str]:
        for k in range(first, last + 1):
            m = _STORE.match(ins[k].op_str) if ins[k].mnemonic == "mov" else None
            if m and m["base"] == base and int(m["disp"] or "0", 16) == disp + 8 * w:
                return k, m["src"]
        raise AssertionError("the store was found before")

    stores = [store_of(w) for w in range(words)]
    why = ""   # the refusal of the candidate nearest the stores: the one that says most
    for j in range(last - 1, max(first - max_insns, 0) - 1, -1):
        p = ins[j]
        if p.mnemonic == "call" or not is_emulated(code_at(p.address, min(p.size, 2))):
            continue
        refusal = _within_refusal(ins, j, first, last, base, stores, allowed_calls)
        if refusal:
            why = why or refusal
            continue
        regs = tuple("" if k < j else src for k, src in stores)
        where = ", ".join(f"{n} {'in ' + r if r else 'stored'}" for n, r in zip(("pointer", "length"), regs, strict=False))
        return AfterStore(p.address, base, f"{p.mnemonic} {p.op_str} at {p.address:#x} by the store ({where}; "
                                           f"struct address in {base})", regs)
    return AfterStore(0, "", why or "no emulated instruction by the stores")


def _within_refusal(ins: list[Insn], j: int, first: int, last: int, base: str, stores: list[tuple[int, str]],
                    allowed_calls: set[int]) -> str:
    """Why the point at ins[j] (j < last) does not see every word of the assignment, or ""."""
    lo, hi = min(j, first), last
    a_lo, a_hi, a_p = ins[lo].address, ins[hi].address, ins[j].address
    for k in range(lo, hi + 1):
        i = ins[k]
        if i.mnemonic in _LEAVES or i.mnemonic.startswith("loop"):
            return f"{i.mnemonic} at {i.address:#x} inside the assignment"
        if i.mnemonic == "call":
            if _target(i) not in allowed_calls:
                return f"a call at {i.address:#x} inside the assignment"
            if k > j and any(src == "r11" for s, src in stores if s > k):
                return f"the barrier call at {i.address:#x} overwrites r11"
            continue
        if i.mnemonic.startswith("j"):
            t = _target(i)
            if t is None or not a_lo < t <= a_hi:
                return f"a branch at {i.address:#x} leaves the assignment"
            if k < j and t > a_p:
                return f"a branch at {i.address:#x} jumps over {a_p:#x}"
        for s, src in stores:
            if j <= k < s and _writes(i, src):
                return f"{i.mnemonic} {i.op_str} at {i.address:#x} overwrites {src} before its store"
            if s < k <= j and _writes(i, base):
                return f"{i.mnemonic} {i.op_str} at {i.address:#x} overwrites {base}"
    other = _branch_into(ins, a_lo, a_hi, ins[j], inside_ok=True)
    if other is not None:
        return f"a branch at {other.address:#x} lands inside the assignment"
    return ""
