"""Go version and modules from .go.buildinfo agree with `go version -m`."""

from __future__ import annotations

import struct

import pytest

from receiver.ebpf_go.gobinary import GoBinary
from receiver.ebpf_go.gobinary import buildinfo as bi

from .conftest import GO_VERSIONS, VARIANTS, fixture_binary, go_version_m


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("version", GO_VERSIONS)
def test_version_and_modules_basic(version: str, variant: str) -> None:
    path = fixture_binary(version, variant)
    b = GoBinary.open(path)
    ref = go_version_m(version, path)
    assert b.go_version == ref.go_version
    assert b.go_version_tuple[:2] == tuple(int(x) for x in version.split("."))
    assert b.main_module == ref.main == "example.com/gobinbasic"
    assert b.modules == ref.deps == {}
    assert b.arch == "amd64"
    assert b.is_pie == variant.endswith("pie")
    assert b.stripped == variant.startswith("stripped")
    if "-buildmode" in b.build_settings:  # Go 1.19 does not record it
        assert b.build_settings["-buildmode"] == ("pie" if b.is_pie else "exe")


@pytest.mark.parametrize("version", GO_VERSIONS)
def test_modules_with_replacements(version: str) -> None:
    path = fixture_binary(version, "stripped", "gobin_modules")
    b = GoBinary.open(path)
    ref = go_version_m(version, path)
    assert b.go_version == ref.go_version
    assert b.main_module == ref.main == "example.com/gobinmodules"
    assert b.modules == ref.deps
    assert b.modules["golang.org/x/text"] == "v0.3.8"  # replaced v0.3.7 => v0.3.8
    assert b.modules["example.com/localdep"] == "(devel)"  # replaced by a directory
    assert b.modules["github.com/google/uuid"] == "v1.3.0"
    text = {m.path: m for m in b.module_list}["golang.org/x/text"]
    assert text.version == "v0.3.7" and text.replace is not None and text.replace.version == "v0.3.8"


def _pointer_format_blob(version: bytes, modinfo: bytes) -> tuple[bytes, dict[int, bytes]]:
    """A pre-1.18 buildinfo: header + two pointers to Go string headers elsewhere in memory."""
    mem: dict[int, bytes] = {
        0x1000: struct.pack("<QQ", 0x2000, len(version)),
        0x1010: struct.pack("<QQ", 0x3000, len(modinfo)),
        0x2000: version,
        0x3000: modinfo,
    }
    blob = bi.MAGIC + bytes([8, 0]) + struct.pack("<QQ", 0x1000, 0x1010)
    return blob, mem


def test_pointer_format() -> None:
    sentinel = b"0123456789abcdef"
    mod = sentinel + b"path\tx/y\nmod\tx/y\t(devel)\t\ndep\ta/b\tv1.0.0\th1:x\n=>\ta/c\tv1.1.0\th1:y\n" + sentinel
    blob, mem = _pointer_format_blob(b"go1.16.15", mod)

    def read(addr: int, n: int) -> bytes:
        for base, data in mem.items():
            if base <= addr and addr + n <= base + len(data):
                return data[addr - base : addr - base + n]
        raise ValueError(addr)

    info = bi.parse(blob, read)
    assert info.go_version == "go1.16.15"
    assert info.path == "x/y" and info.main is not None and info.main.path == "x/y"
    assert [(m.path, m.effective_version) for m in info.deps] == [("a/b", "v1.1.0")]


def test_inline_format_example() -> None:
    # From the reference: go1.18 header bytes, then varint-prefixed strings.
    blob = bytes.fromhex("ff20476f206275696c64696e663a0802") + bytes(16) + b"\x06go1.18" + b"\x00"
    info = bi.parse(blob, lambda a, n: b"")
    assert info.go_version == "go1.18" and info.deps == []


@pytest.mark.parametrize(
    "text,expected",
    [("go1.24.11", (1, 24, 11)), ("go1.21rc2", (1, 21, 0)), ("go1.22.3 X:nocoverageredesign", (1, 22, 3)),
     ("go1.19", (1, 19, 0)), ("devel go1.27-abcdef", (1, 27, 0)), ("weird", (0, 0, 0))],
)
def test_version_tuple(text: str, expected: tuple[int, int, int]) -> None:
    assert bi.version_tuple(text) == expected
