"""GoBinary: everything the eBPF receiver needs to know about one Go executable, read once.

Opening reads the ELF headers and the buildinfo (cheap); symbols, disassembly and DWARF are read
lazily and cached, so `inspect` and the receiver pay only for what they ask.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Any

from . import buildinfo as bi
from . import callers as callers_mod
from . import disasm, pclntab
from .dwarf import DwarfError, DwarfStructs
from .elf import PF_W, PF_X, ElfImage
from .errors import BinaryError, NotGoBinary
from .offsets import OffsetTable


@dataclass(frozen=True)
class Function:
    name: str
    start: int  # ELF virtual address (what BCC attach_uprobe(addr=) takes)
    end: int  # exclusive: start + code size, without the padding before the next function


@dataclass(frozen=True)
class ProbePoint:
    addr: int
    kind: str  # "jcc-after-stack-check" | "entry"
    reason: str


@dataclass(frozen=True)
class FieldStorePoint:
    addr: int
    base: str   # register holding the struct's address at addr ("rax"); "" when addr is 0
    reason: str
    words: tuple[str, ...] = ()  # per word of the field: "" in the struct at addr, else the register holding it


@dataclass(frozen=True)
class ReturnPoint:
    addr: int
    caller: str
    kind: str
    reason: str


@dataclass(frozen=True)
class FieldOffset:
    value: int
    source: str  # "dwarf" | "table" | "guess"
    detail: str
    agreed: bool = True  # False: a table guess across releases whose layouts may differ (offsets.TableHit)


# DWARF answers shared between binaries. A struct's layout is fixed by the code that declares it (the
# module and its version, or the Go release for std), the target and the settings that select
# files (build tags, GOEXPERIMENT): a binary with DWARF whose key was answered from another binary's
# DWARF takes that answer instead of parsing its own (0.5-2 s and ~50 MB each). A struct absent
# from that DWARF sends both to the offsets table. Stripped binaries do not use it: what they report
# never depends on which other binaries were seen.
# key -> (struct present in the DWARF, member offset or None, path of the binary that answered)
_SHARED_DWARF: dict[tuple[str, ...], tuple[bool, int | None, str]] = {}
_SHARED_LOCK = threading.Lock()


class GoBinary:
    """A Go ELF executable. Create with `GoBinary.open(path)`."""

    def __init__(self, image: ElfImage, info: bi.BuildInfo) -> None:
        self._img = image
        self.path = image.path
        self.arch: str = image.arch
        self.is_pie: bool = image.is_pie
        self.build = info
        self.go_version: str = info.go_version.split(" ")[0] if info.go_version.startswith("go") else info.go_version
        self.go_version_tuple: tuple[int, int, int] = bi.version_tuple(info.go_version)
        self.main_module: str = info.main.path if info.main else ""
        self.main_package: str = info.path
        self.modules: dict[str, str] = {m.path: m.effective_version for m in info.deps}
        self.module_list: list[bi.Module] = list(info.deps)
        self.build_settings: dict[str, str] = dict(info.settings)
        self.warnings: list[str] = []
        self.ambiguous: set[str] = set()  # pclntab names given to two functions (the first is kept)
        self._same_name: dict[str, list[Function]] = {}   # every function of an ambiguous name
        syms = image.section(".symtab")
        self.stripped: bool = syms is None or syms.size == 0
        self._funcs: dict[str, Function] | None = None
        self._starts: list[int] | None = None
        self._by_start: list[Function] | None = None
        self._func_source = ""
        self._sweeps: dict[int, disasm.Sweep] = {}   # by function start
        self._dwarf: DwarfStructs | None | bool = None
        self._table: OffsetTable | None = None
        self._offsets: dict[tuple[str, str], FieldOffset | None] = {}  # every answer given, kept

    # ---- opening ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Any) -> GoBinary:
        path = str(path)
        img = ElfImage(path)
        try:
            info = _read_buildinfo(img)
        except BinaryError:
            raise
        except (bi.BuildInfoError, ValueError, IndexError, OverflowError) as e:
            raise BinaryError(f"{path}: corrupt Go build info ({e})") from e
        if info is None:
            raise NotGoBinary(f"{path}: not a Go executable (no Go build info)")
        return cls(img, info)

    @property
    def elf(self) -> ElfImage:
        return self._img

    @property
    def has_dwarf(self) -> bool:
        return any(s.name in (".debug_info", ".zdebug_info") for s in self._img.sections)

    @property
    def function_source(self) -> str:
        self._functions()
        return self._func_source

    # ---- functions ----------------------------------------------------------------------
    def _functions(self) -> dict[str, Function]:
        if self._funcs is not None:
            return self._funcs
        funcs: dict[str, Function] = {}
        syms = self._img.symbols()
        if syms:
            ex = self._img.executable_ranges()
            for s in syms:
                if s.type == 2 and s.size and any(a <= s.value < b for a, b in ex):
                    funcs.setdefault(s.name, Function(s.name, s.value, s.value + s.size))
            self._func_source = "symtab"
        if not funcs:
            try:
                entries = self._pclntab_functions()
            except (pclntab.PclntabError, IndexError, ValueError, OverflowError) as e:
                raise BinaryError(f"{self.path}: corrupt Go function table (pclntab): {e}") from e
            # An assembly function and its Go-ABI wrapper share a name in the pclntab; `.symtab`
            # calls the assembly one "name.abi0". Do the same when the ASM flag (Go >= 1.20) tells
            # them apart; other duplicates (generic instantiations "f[...]", ABI0 wrappers of Go
            # functions called from assembly) keep the first and are listed in `ambiguous`.
            counts: dict[str, int] = {}
            for f in entries:
                counts[f.name] = counts.get(f.name, 0) + 1
            for f in entries:
                dup = counts[f.name] > 1
                name = f.name + ".abi0" if dup and f.flag & pclntab.FUNC_FLAG_ASM else f.name
                fn = Function(name, f.start, f.end)
                if name in funcs:
                    self.ambiguous.add(name)
                    self._same_name.setdefault(name, [funcs[name]]).append(fn)
                funcs.setdefault(name, fn)
            self._func_source = "pclntab"
        self._funcs = funcs
        self._by_start = sorted(funcs.values(), key=lambda f: f.start)
        self._starts = [f.start for f in self._by_start]
        return funcs

    def functions_named(self, name: str) -> list[Function]:
        """Every function of this name: one, or several where the pclntab repeats it (the instances of a
        generic function, named `f[...]` there); [] when there is none."""
        self._functions()
        if name in self._same_name:
            return list(self._same_name[name])
        f = self.function(name)
        return [f] if f is not None else []

    def inlined_only(self, name: str) -> bool:
        """`name` is no function of the binary but its function table names it: the inlining records of
        its callers do (the compiler inlined it into every one)."""
        if self.function(name) is not None:
            return False
        try:
            data = self._pclntab_data()[0]
        except (BinaryError, pclntab.PclntabError, IndexError, ValueError):
            return False
        return data.find(b"\0" + name.encode() + b"\0") >= 0

    def entry_probe_of(self, f: Function) -> ProbePoint:
        """`entry_probe` of this very function (one of several of a name)."""
        funcs = self._functions()
        morestack = {g.start for n, g in funcs.items() if n.startswith("runtime.morestack")}
        ep = disasm.entry_point(self.arch, self._sweep(f), f.start, f.end, morestack or None)
        return ProbePoint(ep.addr, ep.kind, ep.reason)

    def return_sites_of(self, f: Function) -> list[int]:
        return disasm.return_sites(self.arch, self._sweep(f))

    def callers(self, funcs: list[Function]) -> dict[int, callers_mod.Callers]:
        """By function start: its direct call sites (checked against each caller's sweep), and why it
        may also be called indirectly ("" : it may not). One pass over the text for all (callers.py)."""
        img = self._img
        segs = [(seg.vaddr, bytes(img.data[seg.offset: seg.offset + seg.filesz]))
                for seg in img.segments if seg.flags & PF_X]
        candidates, lea = callers_mod.scan_text(segs, {f.start for f in funcs})
        # data the program reads pointers from: allocated, not code, not the function table (whose
        # entry offsets name every function)
        data = [img.section_bytes(sec) for sec in img.sections
                if sec.flags & 2 and not sec.flags & 4 and sec.type != 8 and "pclntab" not in sec.name
                and sec.name not in (".go.buildinfo", ".note.go.buildid")]
        separate_table = any("pclntab" in sec.name for sec in img.sections)
        addends = set(img.relative_relocations().values()) if img.is_pie else set()
        text = img.section(".text")
        text_start = text.addr if text is not None else 0     # runtime.text: what method tables count from
        out: dict[int, callers_mod.Callers] = {}
        for f in funcs:
            if not separate_table or text is None:
                out[f.start] = callers_mod.Callers((), "no separate function table section to exclude from the data search")
                continue
            taken = "its address is loaded by a lea (a func value made in code)" if f.start in lea else ""
            sites = []
            for site in candidates.get(f.start, []):
                caller = self.function_at(site)
                if caller is None:
                    taken = taken or f"a call at {site:#x} outside any known function"
                    continue
                sw = self._sweep(caller)
                if any(i.address == site and i.mnemonic == "call" for i in sw.insns):
                    sites.append(site)
            taken = taken or callers_mod.address_taken(data, addends, text_start if callers_mod.is_method(f.name)
                                                        else None, f.start)
            out[f.start] = callers_mod.Callers(tuple(sites), taken)
        return out

    def point_after_call_site(self, site: int) -> ReturnPoint:
        """The first kernel-emulated instruction after the `call` at `site`, reached by straight-line
        code with the caller's stack pointer (disasm.point_after_call_site)."""
        f = self.function_at(site)
        if f is None:
            return ReturnPoint(0, "", "none", f"{site:#x} is in no known function")
        sw = self._sweep(f)
        k = next((k for k, i in enumerate(sw.insns) if i.address == site), None)
        if k is None or sw.insns[k].mnemonic != "call":
            return ReturnPoint(0, f.name, "none", f"no call instruction at {site:#x}")
        p = disasm.point_after_call_site(sw, self._img.read, k)
        return ReturnPoint(p.addr, f.name, "emulated-after-call" if p.addr else "none", p.reason)

    def _pclntab_data(self) -> tuple[bytes, int]:
        """The pclntab's bytes and virtual address (not kept: megabytes, needed once or twice)."""
        img = self._img
        data: bytes | None = None
        base_vaddr = 0
        for name in (".gopclntab", ".data.rel.ro.gopclntab"):
            s = img.section(name)
            if s is not None and s.size:
                raw = img.section_bytes(s)
                if pclntab.header_ok(raw):
                    data, base_vaddr = raw, s.addr
                    break
        if data is None:
            # Merged into .data.rel.ro (external-link PIE) or no section headers: scan by magic.
            candidates = [s for s in img.sections if s.name.startswith(".data.rel.ro") or s.name == ".rodata"]
            for s in candidates:
                raw = img.section_bytes(s)
                off = pclntab.find(raw)
                if off >= 0:
                    data, base_vaddr = raw[off:], s.addr + off
                    break
        if data is None:
            for seg in img.segments:
                if seg.flags & PF_X and not seg.flags & PF_W and len(img.segments) > 1:
                    continue
                raw = bytes(img.data[seg.offset : seg.offset + seg.filesz])
                off = pclntab.find(raw)
                if off >= 0:
                    data, base_vaddr = raw[off:], seg.vaddr + off
                    break
        if data is None:
            raise BinaryError(f"{self.path}: no symbol table and no Go function table (pclntab) found")
        return data, base_vaddr

    def _pclntab_functions(self) -> list[pclntab.FuncEntry]:
        img = self._img
        data, base_vaddr = self._pclntab_data()
        text_start: int | None = None
        ts_off = pclntab.text_start_offset(data)
        if ts_off >= 0:
            stored = int.from_bytes(data[ts_off : ts_off + 8], "little")
            relocs = img.relative_relocations() if img.is_pie else {}
            if base_vaddr + ts_off in relocs:  # PIE up to Go 1.25: filled in by the loader
                text_start = relocs[base_vaddr + ts_off]
            elif stored == 0:  # Go >= 1.26 PIE: read-only pclntab; runtime.text is in moduledata
                text_start = self._text_from_moduledata(data, base_vaddr, relocs)
        return pclntab.read_functions(data, 0, text_start)

    def _text_from_moduledata(self, data: bytes, pcln_vaddr: int, relocs: dict[int, int]) -> int:
        """runtime.text from `runtime.firstmoduledata`, found as the word that points at the pclntab.

        moduledata starts {pcHeader; funcnametab, cutab, filetab, pctab, pclntable, ftab []T;
        findfunctab, minpc, maxpc, text, etext uintptr} (stable since Go 1.16). A candidate is kept
        only if maxpc-minpc equals the span of the function table and text lies in executable code.
        """
        img = self._img
        span = pclntab.entry_span(data)
        cands = [a for a, v in relocs.items() if v == pcln_vaddr]
        if not img.is_pie:
            needle = pcln_vaddr.to_bytes(8, "little")
            for seg in img.segments:
                if seg.flags & PF_W:
                    raw = bytes(img.data[seg.offset : seg.offset + seg.filesz])
                    i = raw.find(needle)
                    while i >= 0:
                        if i % 8 == 0:
                            cands.append(seg.vaddr + i)
                        i = raw.find(needle, i + 1)

        def word(addr: int) -> int:
            return relocs[addr] if addr in relocs else img.u64(addr)

        ex = img.executable_ranges()
        for md in cands:
            try:
                minpc, maxpc, text = word(md + 160), word(md + 168), word(md + 176)
            except BinaryError:
                continue
            if maxpc - minpc == span and text <= minpc and any(a <= text < b for a, b in ex):
                return text
        text_sec = img.section(".text")
        if text_sec is None:
            raise BinaryError(f"{self.path}: cannot find where Go code starts (no moduledata, no .text)")
        self.warnings.append("pclntab text start not found in moduledata; assuming the start of .text")
        return text_sec.addr

    def function(self, name: str) -> Function | None:
        """The function named `name` (Go's symbol name, e.g. "net/http.(*Transport).roundTrip").

        Assembly functions are "pkg.fn.abi0" in `.symtab` but "pkg.fn" in the pclntab: either works."""
        funcs = self._functions()
        f = funcs.get(name)
        if name in self.ambiguous and f is not None:
            self.warnings.append(f"{name}: two functions have this name in the pclntab; using the first")
        if f is None:
            alt = name.removesuffix(".abi0") if name.endswith(".abi0") else name + ".abi0"
            f = funcs.get(alt)
        return f

    def functions(self) -> dict[str, Function]:
        return dict(self._functions())

    def function_at(self, addr: int) -> Function | None:
        self._functions()
        assert self._starts is not None and self._by_start is not None
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and self._by_start[i].start <= addr < self._by_start[i].end:
            return self._by_start[i]
        return None

    def _require(self, name: str) -> Function:
        f = self.function(name)
        if f is None:
            raise BinaryError(f"{self.path}: no function {name!r}")
        return f

    def _sweep(self, f: Function) -> disasm.Sweep:
        sw = self._sweeps.get(f.start)
        if sw is None:
            code = self._img.read(f.start, f.end - f.start)
            sw = disasm.sweep(self.arch, code, f.start)
            if not sw.complete:
                self.warnings.append(f"{f.name}: disassembly stopped early; return sites may be incomplete")
            self._sweeps[f.start] = sw
        return sw

    def instructions(self, name: str) -> list[disasm.Insn]:
        return list(self._sweep(self._require(name)).insns)

    def return_sites(self, name: str) -> list[int]:
        """Addresses of every return instruction of `name`; BinaryError if there is no such function."""
        return disasm.return_sites(self.arch, self._sweep(self._require(name)))

    def entry_probe(self, name: str) -> ProbePoint:
        return self.entry_probe_of(self._require(name))

    def caller_return_points(self, name: str) -> list[ReturnPoint] | None:
        """Not provably exact for every caller (see README: "Return points in callers"): always
        None. For one known caller use `point_after_call`."""
        return None

    def point_after_call(self, caller: str, callee: str) -> ReturnPoint:
        """The first kernel-emulated instruction after the single direct call of `callee` in
        `caller`, reached by straight-line code (README: "Return points in callers"). `addr` is 0
        and `kind` "none" when there is none; `reason` says why or what was found."""
        f, g = self.function(caller), self.function(callee)
        if f is None or g is None:
            return ReturnPoint(0, caller, "none", f"{caller if f is None else callee} not in the binary")
        p = disasm.point_after_call(self.arch, self._sweep(f), self._img.read, g.start)
        return ReturnPoint(p.addr, caller, "emulated-after-call" if p.addr else "none", p.reason)

    def point_at_field_store(self, func: str, disp: int, words: int = 2) -> FieldStorePoint:
        """A kernel-emulated instruction at which `func`'s one assignment of the field at `disp` of a
        struct (a string: 2 words, a pointer: 1) can be read, and where each word is there
        (disasm.point_at_field_store). `addr` 0 when there is none; `reason` says why or what was found."""
        f = self.function(func)
        if f is None:
            return FieldStorePoint(0, "", f"{func} not in the binary")
        barriers = {g.start for n, g in self._functions().items() if n.startswith("runtime.gcWriteBarrier")}
        p = disasm.point_at_field_store(self.arch, self._sweep(f), self._img.read, disp, barriers, words)
        return FieldStorePoint(p.addr, p.base, p.reason, p.words)

    # ---- struct offsets -----------------------------------------------------------------
    def _dwarf_structs(self) -> DwarfStructs | None:
        if self._dwarf is None:
            self._dwarf = False
            if self.has_dwarf:
                try:
                    self._dwarf = DwarfStructs(self._img.pyelf)
                except DwarfError as e:
                    self.warnings.append(f"DWARF present but unreadable: {e}")
        return self._dwarf if isinstance(self._dwarf, DwarfStructs) else None

    def module_of(self, struct: str) -> tuple[str, str]:
        """(module, version) that provides the package of a qualified type name; ("std", go version)."""
        pkg = struct.rsplit(".", 1)[0] if "." in struct.rsplit("/", 1)[-1] else struct
        best = ""
        for mod in self.modules:
            if (pkg == mod or pkg.startswith(mod + "/")) and len(mod) > len(best):
                best = mod
        if self.main_module and (pkg == self.main_module or pkg.startswith(self.main_module + "/")):
            if len(self.main_module) > len(best):
                return self.main_module, self.build.main.version if self.build.main else ""
        if best:
            return best, self.modules[best]
        return "std", self.go_version.removeprefix("go")

    def release_dwarf(self) -> None:
        """Free the parsed DWARF (pyelftools keeps every DIE it read: ~50 MB for a 9 MB binary).
        Offsets already looked up stay answered; a new lookup parses the DWARF again."""
        if isinstance(self._dwarf, DwarfStructs):
            self._dwarf = None

    def struct_offset(self, struct: str, field: str) -> FieldOffset | None:
        """Byte offset of `field` in `struct` (e.g. "net/http.Request", "Method"): DWARF, else the
        bundled table for this Go/module version, else a guess from the nearest known version."""
        key = (struct, field)
        if key not in self._offsets:
            self._offsets[key] = self._struct_offset(struct, field)
        return self._offsets[key]

    def _layout_key(self, struct: str, field: str) -> tuple[str, ...] | None:
        """The key under which another binary's DWARF answer holds for this one, or None (the main
        module, a development or directory-replaced module: their code is not pinned by a version)."""
        module, version = self.module_of(struct)
        if module == self.main_module or not version or version == "(devel)":
            return None
        replaced = next((m.replace.path for m in self.module_list if m.path == module and m.replace), "")
        s = self.build_settings
        return (module, version, replaced, self.build.go_version, self.arch, s.get("-tags", ""),
                s.get("GOEXPERIMENT", ""), struct, field)

    def _struct_offset(self, struct: str, field: str) -> FieldOffset | None:
        key = self._layout_key(struct, field) if self.has_dwarf else None
        with _SHARED_LOCK:
            shared = _SHARED_DWARF.get(key) if key is not None else None
        if key is not None and shared is not None:
            present, off, source = shared
            if present:
                detail = "DWARF of the binary" if source == self.path else f"DWARF of {source} (same {key[0]} {key[1]})"
                return None if off is None else FieldOffset(off, "dwarf", detail)
        elif (d := self._dwarf_structs()) is not None:
            try:
                present = d.has_struct(struct)
                off = d.member_offset(struct, field) if present else None
                if key is not None:
                    with _SHARED_LOCK:
                        _SHARED_DWARF.setdefault(key, (present, off, self.path))
                if present:
                    return None if off is None else FieldOffset(off, "dwarf", "DWARF of the binary")
            except DwarfError as e:
                self.warnings.append(str(e))
        if self._table is None:
            self._table = OffsetTable()
        module, version = self.module_of(struct)
        hit = self._table.lookup(module, version, struct, field)
        if hit is None or hit.offset is None:
            return None
        return FieldOffset(hit.offset, hit.source, hit.detail, hit.agreed)


def _read_buildinfo(img: ElfImage) -> bi.BuildInfo | None:
    s = img.section(".go.buildinfo")
    blobs: list[bytes] = []
    if s is not None and s.size:
        blobs.append(bytes(img.data[s.offset : s.offset + min(s.size, bi.SEARCH_LIMIT)]))
    else:
        for seg in img.segments:
            if seg.flags & PF_W and not seg.flags & PF_X:
                blobs.append(bytes(img.data[seg.offset : seg.offset + min(seg.filesz, bi.SEARCH_LIMIT)]))
                break
    for blob in blobs:
        i = bi.find_blob(blob)
        if i >= 0:
            return bi.parse(blob[i:], img.read)
    if img.section(".gopclntab") is not None or img.section(".gosymtab") is not None:
        raise BinaryError(f"{img.path}: Go executable without build info (Go older than 1.13?); unsupported")
    return None
