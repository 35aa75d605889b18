"""Function table from Go's pclntab (`runtime.pcHeader`), for binaries without `.symtab`.

Layouts (`debug/gosym/pclntab.go`, `runtime/symtab.go`):

| Go        | magic      | header words from byte 8                                   | functab entry         |
|-----------|------------|------------------------------------------------------------|-----------------------|
| 1.16-1.17 | 0xfffffffa | nfunc nfiles funcnameOff cuOff filetabOff pctabOff pclnOff | {entry, funcoff} uintptr |
| 1.18-1.19 | 0xfffffff0 | nfunc nfiles textStart funcnameOff cuOff filetabOff pctabOff pclnOff | {entryoff, funcoff} u32 |
| >= 1.20   | 0xfffffff1 | as 1.18                                                     | as 1.18               |

A function's end is its entry plus the pc span of its pcsp table (the code the compiler emitted,
without the INT3 padding up to the next function), which equals the `.symtab` size the linker
writes; when that table is missing, the next function's entry.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from receiver.ebpf_go.gobinary.buildinfo import uvarint

MAGIC_116 = 0xFFFFFFFA
MAGIC_118 = 0xFFFFFFF0
MAGIC_120 = 0xFFFFFFF1
MAGICS = {MAGIC_116: "1.16", MAGIC_118: "1.18", MAGIC_120: "1.20"}


class PclntabError(ValueError):
    """The table is malformed (the caller turns this into a BinaryError)."""


FUNC_FLAG_ASM = 4  # runtime funcFlag_ASM (Go >= 1.20): an assembly (ABI0) function


@dataclass(frozen=True)
class FuncEntry:
    name: str
    start: int
    end: int
    flag: int = 0  # _func.flag (0 when the layout has none we know)


def header_ok(data: bytes, off: int = 0) -> bool:
    """Cheap validation of a candidate pcHeader at `data[off:]`."""
    if len(data) - off < 8 + 8 * 8:
        return False
    magic = struct.unpack_from("<I", data, off)[0]
    if magic not in MAGICS:
        return False
    if data[off + 4] != 0 or data[off + 5] != 0:
        return False
    if data[off + 6] not in (1, 2, 4) or data[off + 7] != 8:
        return False
    try:
        _layout(data, off)
    except PclntabError:
        return False
    return True


def find(data: bytes, alignment: int = 8) -> int:
    """Offset of the first plausible pcHeader in `data` (e.g. `.data.rel.ro` of a PIE), or -1."""
    for magic in (MAGIC_120, MAGIC_118, MAGIC_116):
        needle = struct.pack("<I", magic) + b"\0\0"
        i = 0
        while True:
            i = data.find(needle, i)
            if i < 0:
                break
            if i % alignment == 0 and header_ok(data, i):
                return i
            i += 1
    return -1


@dataclass(frozen=True)
class _Layout:
    magic: int
    min_lc: int
    nfunc: int
    text_start: int  # 0 for the 1.16 layout (absolute entries)
    text_start_off: int  # byte offset of the textStart word, -1 for 1.16
    funcname: int
    pctab: int
    functab: int


def _layout(data: bytes, off: int) -> _Layout:
    magic = struct.unpack_from("<I", data, off)[0]
    min_lc = data[off + 6]
    words = struct.unpack_from("<8Q", data, off + 8)
    size = len(data) - off
    if magic == MAGIC_116:
        nfunc, _nfiles, funcname, _cu, _filetab, pctab, pcln = words[:7]
        text_start, ts_off = 0, -1
        entry_size = 16
    else:
        nfunc, _nfiles, text_start, funcname, _cu, _filetab, pctab, pcln = words
        ts_off = 8 + 2 * 8
        entry_size = 8
    if not (0 < nfunc < 1 << 24):
        raise PclntabError(f"implausible function count {nfunc}")
    for o in (funcname, pctab, pcln):
        if not (0 < o < size):
            raise PclntabError("pclntab offsets out of bounds")
    if pcln + (nfunc + 1) * entry_size > size:
        raise PclntabError("function table runs past the pclntab")
    return _Layout(magic, min_lc, nfunc, text_start, ts_off, off + funcname, off + pctab, off + pcln)


def text_start_offset(data: bytes, off: int = 0) -> int:
    """Byte offset (from the header) of the textStart word, or -1 when the layout has none."""
    return _layout(data, off).text_start_off


def entry_span(data: bytes, off: int = 0) -> int:
    """Distance from the first function's entry to the end sentinel of the function table."""
    lay = _layout(data, off)
    if lay.magic == MAGIC_116:
        first = struct.unpack_from("<Q", data, lay.functab)[0]
        last = struct.unpack_from("<Q", data, lay.functab + 16 * lay.nfunc)[0]
    else:
        first = struct.unpack_from("<I", data, lay.functab)[0]
        last = struct.unpack_from("<I", data, lay.functab + 8 * lay.nfunc)[0]
    return int(last - first)


def pc_span(data: bytes, pos: int, min_lc: int, limit: int = 1 << 24) -> int:
    """Total pc range covered by the pcvalue table at `data[pos:]` (runtime `step` encoding)."""
    total = 0
    first = True
    while True:
        uvdelta, pos = uvarint(data, pos, PclntabError)
        if uvdelta == 0 and not first:
            return total
        first = False
        pcdelta, pos = uvarint(data, pos, PclntabError)
        total += pcdelta * min_lc
        if total > limit:
            raise PclntabError("pc table longer than the function")


def read_functions(data: bytes, off: int = 0, text_start: int | None = None) -> list[FuncEntry]:
    """Every function of the pclntab at `data[off:]`. `text_start` overrides the header's value
    (a PIE holds 0 there in the file and gets the address from a relocation)."""
    lay = _layout(data, off)
    base = lay.text_start if text_start is None else text_start
    entries: list[tuple[int, int]] = []
    if lay.magic == MAGIC_116:
        for i in range(lay.nfunc + 1):
            e, f = struct.unpack_from("<QQ", data, lay.functab + 16 * i)
            entries.append((e, f))
    else:
        raw = struct.unpack_from(f"<{2 * (lay.nfunc + 1)}I", data, lay.functab)
        entries = [(base + raw[2 * i], raw[2 * i + 1]) for i in range(lay.nfunc + 1)]
    out: list[FuncEntry] = []
    name_pos = 8 if lay.magic == MAGIC_116 else 4
    pcsp_pos = 20 if lay.magic == MAGIC_116 else 16
    flag_pos = 41 if lay.magic == MAGIC_120 else -1
    for i in range(lay.nfunc):
        entry, funcoff = entries[i]
        nxt = entries[i + 1][0]
        rec = lay.functab + funcoff
        if rec + pcsp_pos + 4 > len(data) or nxt < entry:
            raise PclntabError("function record out of bounds")
        name_off = struct.unpack_from("<i", data, rec + name_pos)[0]
        pcsp = struct.unpack_from("<I", data, rec + pcsp_pos)[0]
        npos = lay.funcname + name_off
        if not (lay.funcname <= npos < len(data)):
            raise PclntabError("function name out of bounds")
        nend = data.find(b"\0", npos)
        name = data[npos : nend if nend >= 0 else len(data)].decode("utf-8", "replace")
        end = nxt
        if pcsp:
            try:
                span = pc_span(data, lay.pctab + pcsp, lay.min_lc, limit=nxt - entry)
                if 0 < span <= nxt - entry:
                    end = entry + span
            except PclntabError:
                end = nxt
        flag = data[rec + flag_pos] if 0 <= flag_pos and rec + flag_pos < len(data) else 0
        out.append(FuncEntry(name, entry, end, flag))
    return out
