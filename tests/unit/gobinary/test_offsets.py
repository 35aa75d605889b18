"""Struct offsets: table (stripped binaries) agrees with the DWARF of the unstripped twin."""

from __future__ import annotations

from typing import Any

import pytest

from receiver.ebpf_go.gobinary import GoBinary
from receiver.ebpf_go.gobinary.fields import STD_FIELDS
from receiver.ebpf_go.gobinary.offsets import OffsetTable, version_key

from .conftest import GO_VERSIONS, fixture_binary


@pytest.mark.parametrize("version", GO_VERSIONS)
def test_table_matches_dwarf_of_twin(version: str) -> None:
    stripped = GoBinary.open(fixture_binary(version, "stripped"))
    plain = GoBinary.open(fixture_binary(version, "plain"))
    assert plain.has_dwarf and not stripped.has_dwarf
    compared = 0
    for struct, fields in STD_FIELDS.items():
        for field in fields:
            d = plain.struct_offset(struct, field)
            t = stripped.struct_offset(struct, field)
            if d is None or d.source != "dwarf":
                # Absent in this version, or the type is not linked into the fixture (then the
                # unstripped binary falls back to the table too).
                continue
            assert t is not None, (struct, field)
            assert t.source == "table", (struct, field, t)
            assert t.value == d.value, (struct, field)
            compared += 1
    assert compared >= 60


def test_known_values() -> None:
    b = GoBinary.open(fixture_binary("1.24", "stripped"))
    assert b.struct_offset("net/http.Request", "Method").value == 0  # type: ignore[union-attr]
    assert b.struct_offset("net/http.Request", "ctx").value == 248  # type: ignore[union-attr]
    assert b.struct_offset("runtime.g", "goid").value == 160  # type: ignore[union-attr]
    assert b.struct_offset("net/http.Request", "NoSuchField") is None
    old = GoBinary.open(fixture_binary("1.19", "stripped"))
    assert old.struct_offset("net/http.Request", "ctx").value == 232  # type: ignore[union-attr]
    assert old.struct_offset("net/http.Request", "Pattern") is None  # field added in 1.23


TABLE = {
    "schema": 1,
    "modules": {
        "std": {"versions": ["1.21.13", "1.23.9", "1.24.11"], "fields": {"net/http.Request": {"ctx": {
            "1.21.13": 232, "1.23.9": 248, "1.24.11": 248}}}},
        "google.golang.org/grpc": {"versions": ["v1.66.2", "v1.69.4"], "fields": {
            "google.golang.org/grpc/internal/transport.Stream": {"method": {"v1.66.2": 88, "v1.69.4": 24}}}},
    },
}


def test_lookup_rules() -> None:
    t = OffsetTable(TABLE)
    exact = t.lookup("std", "go1.23.9", "net/http.Request", "ctx")
    assert exact is not None and (exact.offset, exact.source) == (248, "table")
    same_minor = t.lookup("std", "go1.23.2", "net/http.Request", "ctx")
    assert same_minor is not None and (same_minor.offset, same_minor.source) == (248, "guess")
    assert "1.23.9" in same_minor.detail
    between = t.lookup("std", "1.22.5", "net/http.Request", "ctx")
    assert between is not None and between.offset == 232 and "DISAGREE" in between.detail
    newer = t.lookup("std", "1.30.0", "net/http.Request", "ctx")
    assert newer is not None and newer.offset == 248 and newer.source == "guess"
    older = t.lookup("std", "1.17.0", "net/http.Request", "ctx")
    assert older is not None and older.offset == 232
    mod = t.lookup("google.golang.org/grpc", "v1.69.4", "google.golang.org/grpc/internal/transport.Stream", "method")
    assert mod is not None and (mod.offset, mod.source) == (24, "table")
    mod2 = t.lookup("google.golang.org/grpc", "v1.70.0", "google.golang.org/grpc/internal/transport.Stream", "method")
    assert mod2 is not None and (mod2.offset, mod2.source) == (24, "guess")
    assert not mod2.agreed          # past the newest known release: nothing vouches for the layout
    assert mod.agreed and newer is not None and not newer.agreed
    assert t.lookup("google.golang.org/grpc", "v1.70.0", "x.Y", "z") is None


def test_bundled_table_covers_modules() -> None:
    t = OffsetTable()
    assert len(t.versions("std")) >= 8
    grpc = t.versions("google.golang.org/grpc")
    assert len(grpc) >= 8
    hit = t.lookup("google.golang.org/grpc", "v1.69.4", "google.golang.org/grpc/internal/transport.Stream", "method")
    assert hit is not None and hit.offset == 24  # matches OBI's table (reference section 4.3)
    old = t.lookup("google.golang.org/grpc", "v1.60.1", "google.golang.org/grpc/internal/transport.Stream", "method")
    assert old is not None and old.offset == 80


def test_module_of() -> None:
    b = GoBinary.open(fixture_binary("1.24", "stripped", "gobin_modules"))
    assert b.module_of("golang.org/x/text/language.Tag") == ("golang.org/x/text", "v0.3.8")
    assert b.module_of("net/http.Request") == ("std", "1.24.11")


@pytest.mark.parametrize("a,b", [("v1.2.3", "v1.10.0"), ("v0.0.0-20240101000000-abc", "v0.0.0-20250101000000-def"),
                                 ("v0.46.1-0.20251013234738-63d1a5100f82", "v0.46.1"), ("1.9.0", "1.19.8")])
def test_version_order(a: str, b: str) -> None:
    assert version_key(a) < version_key(b)


def test_release_dwarf_keeps_the_answers_and_frees_the_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    from receiver.ebpf_go.gobinary import binary
    parses = []

    class Counting(binary.DwarfStructs):
        def __init__(self, elf: Any) -> None:
            parses.append(1)
            super().__init__(elf)
    monkeypatch.setattr(binary, "DwarfStructs", Counting)
    monkeypatch.setattr(binary, "_SHARED_DWARF", {})   # answers other tests' binaries gave
    b = GoBinary.open(fixture_binary("1.26", "plain"))
    before = b.struct_offset("net/http.Request", "Method")
    assert before is not None and before.source == "dwarf" and parses == [1]
    b.release_dwarf()
    assert b._dwarf is None
    assert b.struct_offset("net/http.Request", "Method") == before and parses == [1]   # answered from memory
    again = b.struct_offset("net/http.Request", "Header")                               # a new question
    assert again is not None and again.source == "dwarf" and parses == [1, 1]


def test_a_second_binary_of_the_same_go_release_takes_the_first_ones_dwarf_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """20 services built with one Go release parse DWARF once: the layout of a std struct is the
    release's. The answers are those the second binary's own DWARF gives; a stripped binary still
    answers from the table, whatever was seen before."""
    from receiver.ebpf_go.gobinary import binary
    parses: list[int] = []

    class Counting(binary.DwarfStructs):
        def __init__(self, elf: Any) -> None:
            parses.append(1)
            super().__init__(elf)
    monkeypatch.setattr(binary, "DwarfStructs", Counting)
    monkeypatch.setattr(binary, "_SHARED_DWARF", {})
    asked = [("net/http.Request", "ctx"), ("net/http.Request", "Header"), ("net/url.URL", "Path"),
             ("net/http.Request", "NoSuchField"), ("net/http.noSuchStruct", "x")]
    first = GoBinary.open(fixture_binary("1.24", "plain"))
    second = GoBinary.open(fixture_binary("1.24", "plain", "httpserver"))
    assert first.path != second.path and first.go_version == second.go_version
    a = [first.struct_offset(s, f) for s, f in asked]
    b = [second.struct_offset(s, f) for s, f in asked]
    assert parses == [1]
    assert [x and x.value for x in a] == [x and x.value for x in b]
    assert b[0] is not None and b[0].source == "dwarf" and first.path in b[0].detail
    assert b[3] is None and b[4] is None and a[4] is None   # no DWARF parse for them either
    monkeypatch.setattr(binary, "_SHARED_DWARF", {})   # the same questions, each from its own DWARF
    own = GoBinary.open(fixture_binary("1.24", "plain", "httpserver"))
    assert [x and x.value for x in b] == [own.struct_offset(s, f) and own.struct_offset(s, f).value  # type: ignore[union-attr]
                                          for s, f in asked]
    assert parses == [1, 1]
    stripped = GoBinary.open(fixture_binary("1.24", "stripped"))
    ctx = stripped.struct_offset("net/http.Request", "ctx")
    assert ctx is not None and ctx.source == "table" and ctx.value == b[0].value


def test_unreadable_type_units_leave_a_warning_and_the_table_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    from receiver.ebpf_go.gobinary import binary
    monkeypatch.setattr(binary, "_SHARED_DWARF", {})
    b = GoBinary.open(fixture_binary("1.24", "plain"))
    d = b._dwarf_structs()
    assert d is not None
    d._info = d._info[: len(d._info) // 3]   # the type units cut short
    ctx = b.struct_offset("net/http.Request", "ctx")
    assert ctx is not None and (ctx.value, ctx.source) == (248, "table")
    assert len(b.warnings) == 1 and b.warnings[0].startswith("unreadable DWARF: ")


@pytest.mark.parametrize("encoded,value", [(b"\x02", 2), (b"\x7e", -2), (b"\xff\x00", 127), (b"\x81\x7f", -127),
                                           (b"\x80\x7f", -128), (b"\x81\x01", 129), (b"\xc0\x00", 64)])
def test_signed_leb128(encoded: bytes, value: int) -> None:
    from receiver.ebpf_go.gobinary.dwarf import _sleb
    assert _sleb(b"\x00" + encoded + b"\x05", 1) == (value, 1 + len(encoded))
