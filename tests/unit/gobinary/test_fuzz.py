"""Hypothesis over the parsers: any input gives a result or the parser's own error, never a crash."""

from __future__ import annotations

import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.ebpf_go.gobinary import BinaryError, GoBinary, pclntab
from receiver.ebpf_go.gobinary import buildinfo as bi

from .conftest import fixture_binary

EXAMPLES = 300  # per test; 4 tests -> 1200 examples


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 3))
def test_buildinfo_parser(body: bytes, flags: int) -> None:
    blob = bi.MAGIC + bytes([8, flags]) + body

    def read(addr: int, n: int) -> bytes:
        if not 0 <= addr < len(blob) or n > len(blob) - addr:
            raise bi.BuildInfoError("out of range")
        return blob[addr : addr + n]

    try:
        info = bi.parse(blob, read)
    except bi.BuildInfoError:
        return
    assert isinstance(info.go_version, str) and info.go_version


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(max_size=300))
def test_modinfo_parser(text: str) -> None:
    info = bi.parse_modinfo(text)
    assert all(m.path for m in info.deps) or True


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sampled_from([pclntab.MAGIC_116, pclntab.MAGIC_118, pclntab.MAGIC_120]),
       st.lists(st.integers(0, 5000), min_size=8, max_size=8), st.binary(min_size=0, max_size=3000))
def test_pclntab_parser(magic: int, words: list[int], body: bytes) -> None:
    data = struct.pack("<IBBBB", magic, 0, 0, 1, 8) + struct.pack("<8Q", *words) + body
    try:
        funcs = pclntab.read_functions(data, 0, 0x401000)
    except (pclntab.PclntabError, struct.error):
        return
    for f in funcs:
        assert f.end >= f.start


_REAL: dict[str, bytes] = {}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 2_000_000), st.binary(min_size=1, max_size=64)), min_size=1, max_size=8))
def test_mutated_binary(tmp_path: Path, patches: list[tuple[int, bytes]]) -> None:
    if "b" not in _REAL:
        src = fixture_binary("1.24", "stripped")
        b = GoBinary.open(src)
        # Aim the mutations at the parts we parse: headers, buildinfo, pclntab (start of each).
        _REAL["b"] = src.read_bytes()
        _REAL["offs"] = struct.pack("<3Q", 0, b.elf.section(".go.buildinfo").offset,  # type: ignore[union-attr]
                                    b.elf.section(".gopclntab").offset)  # type: ignore[union-attr]
    data = bytearray(_REAL["b"])
    bases = struct.unpack("<3Q", _REAL["offs"])
    for i, (off, chunk) in enumerate(patches):
        at = bases[i % 3] + off % 8192
        data[at : at + len(chunk)] = chunk
    p = tmp_path / "m"
    p.write_bytes(bytes(data))
    try:
        b = GoBinary.open(p)
        f = b.function("main.deep")
        if f is not None:
            b.return_sites("main.deep")
            b.entry_probe("main.deep")
    except BinaryError as e:
        assert str(e)
