"""Where a binary's itabs are, and where a process loaded the binary.

An error or other interface value reaches BPF as (itab, data): the itab pointer tells its dynamic
type. Two sources name an itab, from the executable alone:

| what                          | from                                                           |
|-------------------------------|----------------------------------------------------------------|
| every itab (`itab_types`)     | the `go:itab.<type>,<interface>` symbols (none when stripped)   |
| one itab (`returned_itab`)    | the `lea rax, [rip+X]` that loads it before a RET of a function that returns it as an interface, e.g. `(*status.Status).Err` returning `&Error{}` as `error`: works on stripped binaries (pclntab names the function) |

Addresses are ELF virtual addresses; in a PIE process add `load_bias(pid, binary)`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .binary import GoBinary

_ITAB = re.compile(r"^go[.:]itab\.(.+),([^,]+)$")
_LEA_RIP = re.compile(r"^rax, \[rip ([+-]) (0x[0-9a-f]+|\d+)\]$")


def itab_types(binary: GoBinary) -> dict[int, tuple[str, str]]:
    """ELF address of each itab -> (concrete type, interface), from the symbol table (none if stripped)."""
    out: dict[int, tuple[str, str]] = {}
    for s in binary.elf.symbols() or []:
        if s.name.startswith(("go:itab.", "go.itab.")):
            m = _ITAB.match(s.name)
            if m:
                out[s.value] = (m.group(1), m.group(2))
    return out


def itab_symbol(binary: GoBinary, name: str) -> int:
    """The ELF address of the itab symbol `name` (e.g. `go:itab.*net.TCPAddr,net.Addr`); 0 when the
    binary is stripped or a PIE (whose itab pointers are relocated at run time: BPF compares
    run-time values)."""
    if binary.is_pie:
        return 0
    return next((s.value for s in binary.elf.symbols() or [] if s.name == name), 0)


def returned_itab(binary: GoBinary, function: str) -> int:
    """The itab `function` returns (regabi: the interface's itab in RAX at RET), as the one address
    loaded into RAX by a rip-relative LEA at most 3 instructions before a RET; 0 when the function
    is absent or returns more than one (or no) such itab. The address must lie outside the code."""
    if binary.function(function) is None:
        return 0
    insns = binary.instructions(function)
    found: set[int] = set()
    for i, ins in enumerate(insns):
        if ins.mnemonic != "ret":
            continue
        for prev in insns[max(0, i - 3):i]:
            m = _LEA_RIP.match(prev.op_str) if prev.mnemonic == "lea" else None
            if m:
                disp = int(m.group(2), 0)
                found.add(prev.address + prev.size + (disp if m.group(1) == "+" else -disp))
    if len(found) != 1:
        return 0
    addr = found.pop()
    if any(lo <= addr < hi for lo, hi in binary.elf.executable_ranges()):
        return 0
    return addr


def load_bias(pid: int, binary: GoBinary) -> int:
    """Run-time address minus ELF address for this process (0 unless PIE): where the mapping of
    file offset 0 starts, minus the virtual address of the segment at file offset 0 (Go links its
    PIEs at 0x400000, not 0)."""
    if not binary.is_pie:
        return 0
    first = min((seg.vaddr - seg.offset for seg in binary.elf.segments if seg.offset == 0), default=0)
    try:
        exe = Path(f"/proc/{pid}/exe").resolve()
        with open(f"/proc/{pid}/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and parts[2] == "00000000" and Path(parts[5]) == exe:
                    return int(parts[0].split("-")[0], 16) - first
    except OSError:
        pass
    return 0
