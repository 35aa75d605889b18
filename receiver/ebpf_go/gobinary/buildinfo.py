"""Go version and module list from `.go.buildinfo` (the format of Go's `debug/buildinfo`).

Two layouts exist. Go >= 1.18 writes both strings inline after the 32-byte header (flag bit 1);
older Go stores, at header bytes 16 and 16+ptrsize, the addresses of the Go string headers of
`runtime.buildVersion` and `runtime.modinfo`, which we follow through the loadable segments.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

MAGIC = b"\xff Go buildinf:"
SEARCH_LIMIT = 64 * 1024


class BuildInfoError(ValueError):
    """The buildinfo blob is malformed (the caller turns this into a BinaryError)."""


@dataclass(frozen=True)
class Module:
    path: str
    version: str
    sum: str = ""
    replace: Module | None = None

    @property
    def effective_version(self) -> str:
        """The version whose code is linked: the replacement's, or "(devel)" for a directory replace."""
        if self.replace is None:
            return self.version
        return self.replace.version or "(devel)"


@dataclass
class BuildInfo:
    go_version: str
    path: str = ""
    main: Module | None = None
    deps: list[Module] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)


def find_blob(data: bytes) -> int:
    """Offset of the buildinfo magic at a 16-byte-aligned offset with 32 bytes left, or -1."""
    i = 0
    while True:
        i = data.find(MAGIC, i)
        if i < 0 or len(data) - i < 32:
            return -1
        if i % 16 == 0:
            return i
        i += 1


def uvarint(data: bytes, pos: int, error: type[Exception] = ValueError) -> tuple[int, int]:
    """Go's unsigned varint at data[pos:] → (value, next position); `error` on truncation."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise error("truncated varint")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def parse(blob: bytes, read: Callable[[int, int], bytes]) -> BuildInfo:
    """Parse a blob that starts at the magic. `read(vaddr, n)` reads mapped memory (pointer format)."""
    if len(blob) < 32 or not blob.startswith(MAGIC):
        raise BuildInfoError("no buildinfo header")
    ptr_size = blob[14]
    flags = blob[15]
    if flags & 2:  # inline strings (Go >= 1.18)
        n, pos = uvarint(blob, 32, BuildInfoError)
        if pos + n > len(blob):
            raise BuildInfoError("truncated version string")
        version = blob[pos : pos + n]
        pos += n
        n, pos = uvarint(blob, pos, BuildInfoError)
        if pos + n > len(blob):
            raise BuildInfoError("truncated module info")
        modinfo = blob[pos : pos + n]
    else:
        if ptr_size not in (4, 8):
            raise BuildInfoError(f"bad pointer size {ptr_size}")
        if flags & 1:
            raise BuildInfoError("big-endian buildinfo is not supported")
        fmt = "<Q" if ptr_size == 8 else "<I"
        (ver_ptr,) = struct.unpack_from(fmt, blob, 16)
        (mod_ptr,) = struct.unpack_from(fmt, blob, 16 + ptr_size)
        version = _read_go_string(read, ver_ptr, ptr_size)
        modinfo = _read_go_string(read, mod_ptr, ptr_size)
    go_version = version.decode("utf-8", "replace")
    if not go_version:
        raise BuildInfoError("empty Go version")
    mod = modinfo.decode("utf-8", "replace")
    if len(modinfo) >= 33 and modinfo[-17] == ord("\n"):
        mod = modinfo[16:-16].decode("utf-8", "replace")
    info = parse_modinfo(mod)
    info.go_version = go_version
    return info


def _read_go_string(read: Callable[[int, int], bytes], header_addr: int, ptr_size: int) -> bytes:
    if header_addr == 0:
        return b""
    hdr = read(header_addr, 2 * ptr_size)
    fmt = "<QQ" if ptr_size == 8 else "<II"
    ptr, n = struct.unpack(fmt, hdr)
    if n == 0:
        return b""
    if n > 1 << 24:
        raise BuildInfoError("implausible string length in buildinfo")
    return read(ptr, n)


def parse_modinfo(text: str) -> BuildInfo:
    info = BuildInfo(go_version="")
    last: Module | None = None
    for line in text.splitlines():
        parts = line.split("\t")
        kind = parts[0]
        if kind == "path" and len(parts) >= 2:
            info.path = parts[1]
        elif kind in ("mod", "dep") and len(parts) >= 3:
            m = Module(parts[1], parts[2], parts[3] if len(parts) > 3 else "")
            if kind == "mod":
                info.main = m
            else:
                info.deps.append(m)
            last = m
        elif kind == "=>" and len(parts) >= 2 and last is not None:
            rep = Module(parts[1], parts[2] if len(parts) > 2 else "", parts[3] if len(parts) > 3 else "")
            new = Module(last.path, last.version, last.sum, rep)
            if info.main is last:
                info.main = new
            else:
                info.deps[-1] = new
            last = None
        elif kind == "build" and len(parts) >= 2:
            k, _, v = parts[1].partition("=")
            info.settings[k] = v
    return info


_VERSION_RE = re.compile(r"go(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def version_tuple(go_version: str) -> tuple[int, int, int]:
    """`go1.24.11` -> (1, 24, 11); `go1.21rc2` -> (1, 21, 0); `go1.22.3 X:nocoverageredesign` -> (1, 22, 3).

    A development build (`devel go1.27-abcdef ...`) yields what it names, else (0, 0, 0).
    """
    m = _VERSION_RE.search(go_version.split(" X:")[0])
    if not m:
        return (0, 0, 0)
    return (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))
