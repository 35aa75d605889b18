"""Who calls a function: its direct call sites, and whether its address is taken anywhere (then it
may be called indirectly: through a func value, an interface, a method table, and only its own
RETs see every return).

A probe on a `call` instruction or on the first emulated instruction after it costs ~0.6 us where a
probe on a RET (single-stepped) costs ~9.9 us on this platform: a function whose every call is a
direct one can be timed from its callers (function spans, probes/functions).

| looked for | where | as |
|---|---|---|
| `call rel32` (E8) to the function | executable segments, one pass for all asked functions | a call site, kept where the caller's sweep has that instruction |
| `lea r, [rip+d]` (8D, mod 00 rm 101) to it | the same pass | address taken |
| its address as a little-endian u64 | every non-executable section; PIE: the `R_*_RELATIVE` addends | address taken (func values, itabs, dictionaries) |
| its offset from the text start as a u32 (methods only) | the same sections | address taken (method tables: the runtime builds itabs from them) |

Byte patterns, not a disassembly of the whole text: the pass reads each byte once with `re` (~0.3 s
for a 10 MB text, where a capstone sweep of all of it takes tens of seconds), and a match counts only
where the caller's own sweep decodes that very call; any other match is a conservative "taken".
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

_CALL = re.compile(rb"\xe8", re.DOTALL)
_LEA_RIP = re.compile(rb"\x8d[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]", re.DOTALL)


@dataclass(frozen=True)
class Callers:
    sites: tuple[int, ...]       # vaddr of every direct `call` to the function
    taken: str                   # why it may be called indirectly ("" : it is not)


def scan_text(segments: list[tuple[int, bytes]], targets: set[int]) -> tuple[dict[int, list[int]], set[int]]:
    """(target -> candidate call-site vaddrs, targets referenced by a rip-relative lea) over the
    executable `segments` ([(vaddr, bytes)])."""
    calls: dict[int, list[int]] = {t: [] for t in targets}
    lea: set[int] = set()
    unpack = struct.unpack_from
    for base, code in segments:
        end = len(code) - 4
        for m in _CALL.finditer(code):
            p = m.start()
            if p < end:
                t = base + p + 5 + unpack("<i", code, p + 1)[0]
                if t in calls:
                    calls[t].append(base + p)
        end = len(code) - 5
        for m in _LEA_RIP.finditer(code):
            p = m.start()
            if p < end:
                t = base + p + 6 + unpack("<i", code, p + 2)[0]
                if t in targets:
                    lea.add(t)
    return calls, lea


def is_method(symbol: str) -> bool:
    """`pkg.T.M` or `pkg.(*T).M` (three parts after the package path, type arguments aside): the kind of
    function a method table can name. A plain function `pkg.f` never is in one."""
    out, depth = [], 0
    for ch in symbol[symbol.rfind("/") + 1:]:
        depth += ch == "["
        if depth == 0:
            out.append(ch)
        depth -= ch == "]" and depth > 0
    return "".join(out).count(".") >= 2


def address_taken(data_sections: list[bytes], relocation_addends: set[int], text_start: int | None,
                  target: int) -> str:
    """Why `target` may be reached through a pointer kept in data, or "". `text_start`: also look for
    its offset from there (methods only: a 4-byte value matches by chance more often)."""
    if target in relocation_addends:
        return "its address is in a relocated pointer (a func value, itab or dictionary)"
    absolute = struct.pack("<Q", target)
    offset = struct.pack("<I", target - text_start) if text_start is not None and target >= text_start else None
    for raw in data_sections:
        if raw.find(absolute) >= 0:
            return "its address is stored in data (a func value, itab or dictionary)"
        if offset is not None and raw.find(offset) >= 0:
            return "its text offset is in data (a method table: it can be called through an interface)"
    return ""
