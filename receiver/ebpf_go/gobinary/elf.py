"""Minimal ELF access: headers via pyelftools, bytes by virtual address from one mmap.

Everything the rest of the package needs from an ELF file: its sections and loadable segments,
reading bytes at a virtual address, the symbol table (parsed directly with `struct`, which is an
order of magnitude faster than pyelftools for the ~10^4-10^5 symbols of a Go binary) and the
R_*_RELATIVE relocations of a PIE (for pointers the dynamic loader fills in).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import IO, cast

from elftools.elf.elffile import ELFFile

from .errors import BinaryError

PT_LOAD = 1
PF_X, PF_W = 1, 2
SHT_NOBITS = 8
ET_DYN = 3
R_X86_64_RELATIVE = 8
R_AARCH64_RELATIVE = 1027

ARCHES = {"EM_X86_64": "amd64", "EM_AARCH64": "arm64"}


@dataclass(frozen=True)
class Section:
    name: str
    addr: int
    offset: int
    size: int
    type: int
    flags: int
    link: int


@dataclass(frozen=True)
class Segment:
    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class Symbol:
    name: str
    value: int
    size: int
    type: int  # STT_*


class ElfImage:
    """An opened ELF file. Raises BinaryError for anything that is not a readable 64-bit ELF."""

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.isdir(path):
            raise BinaryError(f"{path}: is a directory, not an executable")
        try:
            fh = open(path, "rb")
        except FileNotFoundError as e:
            raise BinaryError(f"{path}: no such file") from e
        except PermissionError as e:
            raise BinaryError(f"{path}: permission denied (cannot read the executable)") from e
        except OSError as e:
            raise BinaryError(f"{path}: cannot read: {e.strerror or e}") from e
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise BinaryError(f"{path}: empty file, not an ELF executable")
            head = fh.read(64)
            if head[:4] != b"\x7fELF":
                raise BinaryError(f"{path}: not an ELF file")
            if len(head) < 64:
                raise BinaryError(f"{path}: truncated ELF header")
            try:
                self.data: bytes | mmap.mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                fh.seek(0)
                self.data = fh.read()
        self.size = len(self.data)
        self._parse_headers()

    def _parse_headers(self) -> None:
        path = self.path
        if self.data[4] != 2:
            raise BinaryError(f"{path}: 32-bit ELF; only 64-bit (amd64, arm64) Go executables are supported")
        if self.data[5] != 1:
            raise BinaryError(f"{path}: big-endian ELF; only little-endian (amd64, arm64) is supported")
        try:
            elf = ELFFile(cast(IO[bytes], _ByteStream(self.data)))
            machine = elf["e_machine"]
            self.elf_type = elf["e_type"]
            self.entry = int(elf["e_entry"])
            shnum = elf.num_sections()
            phnum = elf.num_segments()
            if elf["e_shoff"] + shnum * max(elf["e_shentsize"], 1) > self.size:
                raise BinaryError(f"{path}: truncated (section headers past the end of the file)")
            if elf["e_phoff"] + phnum * max(elf["e_phentsize"], 1) > self.size:
                raise BinaryError(f"{path}: truncated (program headers past the end of the file)")
            sections: list[Section] = []
            for i in range(shnum):
                sh = elf._get_section_header(i)
                name = elf._get_section_name(sh) if i else ""
                sections.append(
                    Section(str(name), int(sh["sh_addr"]), int(sh["sh_offset"]), int(sh["sh_size"]),
                            _sh_type(sh["sh_type"]), int(sh["sh_flags"]), int(sh["sh_link"]))
                )
            segments: list[Segment] = []
            for i in range(phnum):
                ph = elf._get_segment_header(i)
                if ph["p_type"] in ("PT_LOAD", PT_LOAD):
                    segments.append(
                        Segment(int(ph["p_vaddr"]), int(ph["p_offset"]), int(ph["p_filesz"]),
                                int(ph["p_memsz"]), int(ph["p_flags"]))
                    )
            self._elf = elf
        except BinaryError:
            raise
        except Exception as e:  # pyelftools raises many kinds on corrupt input
            raise BinaryError(f"{path}: corrupt ELF headers ({type(e).__name__}: {e})".splitlines()[0]) from e
        if machine not in ARCHES:
            raise BinaryError(f"{path}: unsupported architecture {machine}; Go on amd64 or arm64 only")
        self.arch = ARCHES[machine]
        self.is_pie = self.elf_type in ("ET_DYN", ET_DYN)
        self.sections = sections
        self.segments = segments
        for s in sections:
            if s.type != SHT_NOBITS and s.size and s.offset + s.size > self.size:
                raise BinaryError(f"{path}: truncated (section {s.name or '?'} runs past the end of the file)")
        for seg in segments:
            if seg.filesz and seg.offset + seg.filesz > self.size:
                raise BinaryError(f"{path}: truncated (a loadable segment runs past the end of the file)")

    @property
    def pyelf(self) -> ELFFile:
        return self._elf

    # ---- sections and bytes -------------------------------------------------------------
    def section(self, name: str) -> Section | None:
        for s in self.sections:
            if s.name == name:
                return s
        return None

    def section_bytes(self, s: Section) -> bytes:
        if s.type == SHT_NOBITS:
            return b""
        return bytes(self.data[s.offset : s.offset + s.size])

    def vaddr_to_offset(self, vaddr: int) -> int | None:
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
                return seg.offset + (vaddr - seg.vaddr)
        return None

    def read(self, vaddr: int, n: int) -> bytes:
        """`n` bytes at virtual address `vaddr`, from one loadable segment; BinaryError if not in the file."""
        off = self.vaddr_to_offset(vaddr)
        if off is None or n < 0:
            raise BinaryError(f"{self.path}: address {vaddr:#x} is not in the file")
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
                if vaddr + n > seg.vaddr + seg.filesz:
                    raise BinaryError(f"{self.path}: {n} bytes at {vaddr:#x} run past their segment")
        return bytes(self.data[off : off + n])

    def executable_ranges(self) -> list[tuple[int, int]]:
        return [(s.vaddr, s.vaddr + s.filesz) for s in self.segments if s.flags & PF_X]

    # ---- symbols ------------------------------------------------------------------------
    def symbols(self) -> list[Symbol] | None:
        """Function and object symbols of `.symtab`, or None when the binary has no `.symtab`."""
        symtab = self.section(".symtab")
        if symtab is None or symtab.size == 0:
            return None
        sections = self.sections
        link = symtab.link
        if not (0 < link < len(sections)):
            return None
        strtab = self.section_bytes(sections[link])
        raw = self.section_bytes(symtab)
        out: list[Symbol] = []
        n = len(raw) // 24
        for st_name, st_info, _other, _shndx, st_value, st_size in struct.iter_unpack("<IBBHQQ", raw[: n * 24]):
            typ = st_info & 0xF
            if typ not in (1, 2) or st_name >= len(strtab):  # STT_OBJECT, STT_FUNC
                continue
            end = strtab.find(b"\0", st_name)
            name = strtab[st_name : end if end >= 0 else len(strtab)].decode("utf-8", "replace")
            out.append(Symbol(name, st_value, st_size, typ))
        return out

    def relative_relocations(self) -> dict[int, int]:
        """PIE: where the dynamic loader writes `base + addend` (R_*_RELATIVE): vaddr -> addend."""
        rel_type = R_X86_64_RELATIVE if self.arch == "amd64" else R_AARCH64_RELATIVE
        out: dict[int, int] = {}
        for s in self.sections:
            if s.type != 4:  # SHT_RELA
                continue
            raw = self.section_bytes(s)
            n = len(raw) // 24
            for r_offset, r_info, r_addend in struct.iter_unpack("<QQq", raw[: n * 24]):
                if r_info & 0xFFFFFFFF == rel_type:
                    out[r_offset] = r_addend
        return out

    def u64(self, vaddr: int) -> int:
        return int(struct.unpack("<Q", self.read(vaddr, 8))[0])


class _ByteStream:
    """A read-only file-like view of the mapped file for pyelftools (which seeks and reads)."""

    def __init__(self, m: bytes | mmap.mmap) -> None:
        self._m = m
        self._pos = 0

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 0:
            self._pos = pos
        elif whence == 1:
            self._pos += pos
        else:
            self._pos = len(self._m) + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if self._pos < 0:
            return b""
        end = len(self._m) if n is None or n < 0 else self._pos + n
        data = self._m[self._pos : end]
        self._pos += len(data)
        return bytes(data)


def _sh_type(value: object) -> int:
    names = {"SHT_NULL": 0, "SHT_PROGBITS": 1, "SHT_SYMTAB": 2, "SHT_STRTAB": 3, "SHT_RELA": 4,
             "SHT_NOBITS": 8, "SHT_DYNSYM": 11}
    if isinstance(value, int):
        return value
    return names.get(str(value), -1)

