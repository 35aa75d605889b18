"""Function ranges, return sites and entry probe points agree with `go tool objdump`.

The oracle is objdump of the unstripped twin (same build with symbols): a stripped binary must give
the same answers from its pclntab as the symbol table gives."""

from __future__ import annotations

import pytest

from receiver.ebpf_go.gobinary import BinaryError, GoBinary
from tests.support.ci import skip_or_fail_in_ci

from .conftest import (
    EXTERNAL_VERSIONS,
    FUNCS,
    GO_VERSIONS,
    UNSTRIPPED_TWIN,
    VARIANTS,
    fixture_binary,
    have_gcc,
    objdump,
)

CASES = [(v, var) for v in GO_VERSIONS for var in [*VARIANTS, "strip(1)"]]
CASES += [(v, "pie-external+strip(1)") for v in EXTERNAL_VERSIONS]


def _twin(version: str, variant: str) -> GoBinary:
    return GoBinary.open(fixture_binary(version, UNSTRIPPED_TWIN[variant]))


@pytest.mark.parametrize("version,variant", CASES)
def test_functions_and_returns_match_objdump(version: str, variant: str) -> None:
    if "external" in variant and not have_gcc():
        skip_or_fail_in_ci("gcc needed for external linking")
    path = fixture_binary(version, variant)
    b = GoBinary.open(path)
    assert b.stripped == (variant != "plain" and variant != "pie")
    assert b.function_source == ("pclntab" if b.stripped else "symtab")
    oracle = objdump(version, fixture_binary(version, UNSTRIPPED_TWIN[variant]))
    assert set(oracle) == set(FUNCS)
    for name in FUNCS:
        ref = oracle[name]
        f = b.function(name)
        assert f is not None, name
        assert (f.start, f.end) == (ref.start, ref.end), name
        assert b.return_sites(name) == ref.rets, name
        boundaries = {a for a, _, _ in ref.insns}
        assert [i.address for i in b.instructions(name)] == sorted(boundaries), name
        ep = b.entry_probe(name)
        assert ep.addr in boundaries, name  # never mid-instruction
    assert not b.warnings


@pytest.mark.parametrize("version,variant", [(v, var) for v in GO_VERSIONS for var in ("strip(1)", "stripped-pie")]
                         + [(v, "pie-external+strip(1)") for v in EXTERNAL_VERSIONS])
def test_pclntab_equals_symtab_for_every_function(version: str, variant: str) -> None:
    """Every function of the pclntab has the start and end the symbol table of the twin gives."""
    if "external" in variant and not have_gcc():
        skip_or_fail_in_ci("gcc needed for external linking")
    sb = GoBinary.open(fixture_binary(version, variant))
    stripped = sb.functions()
    symtab = _twin(version, variant).functions()
    # Generic instantiations are all "f[...]" in the pclntab; and Go < 1.20 has no ASM flag, so an
    # assembly function and its Go-ABI wrapper share a name there. Nothing else may be ambiguous.
    # Also ABI wrappers of Go functions called from assembly share the Go function's name.
    assert len(sb.ambiguous) < 80
    assert not sb.ambiguous & set(FUNCS)
    checked = 0
    missing, mismatched = [], []
    for n, f in stripped.items():
        if n in sb.ambiguous or n.startswith("go:"):  # go:textfipsstart and such are markers
            continue
        # Go < 1.20: assembly functions are "f" in the pclntab and "f.abi0" in .symtab.
        ref = symtab.get(n) or symtab.get(n + ".abi0")
        if ref is None:
            missing.append(n)
        elif (f.start, f.end) != (ref.start, ref.end):
            mismatched.append(n)
        checked += 1
    assert checked > 2000
    assert mismatched == []
    # The pclntab abbreviates type arguments ("[...]"); .symtab spells them out.
    assert [n for n in missing if "[...]" not in n and not n.startswith(("type..", "type:.", "go:"))] == []


EXPECTED_SHAPES = {
    "net/http.serverHandler.ServeHTTP": "",  # small frame since 1.21, big before
    "main.deep": "lea r12,[rsp-N]; cmp r12,[r14+0x10]; jbe",
    "database/sql.(*DB).queryDC": "lea r12,[rsp-N]; cmp r12,[r14+0x10]; jbe",
}


@pytest.mark.parametrize("version", GO_VERSIONS)
def test_entry_probe_shapes(version: str) -> None:
    b = GoBinary.open(fixture_binary(version, "stripped"))
    for name, shape in EXPECTED_SHAPES.items():
        ep = b.entry_probe(name)
        f = b.function(name)
        assert f is not None
        assert ep.kind == "jcc-after-stack-check" and ep.reason.startswith(shape), (name, ep)
        insns = b.instructions(name)
        jcc = next(i for i in insns if i.address == ep.addr)
        assert jcc.mnemonic == "jbe"
        # Nothing before the jcc writes an argument register or R14.
        for i in insns:
            if i.address >= ep.addr:
                break
            dst = i.op_str.split(",")[0]
            assert i.mnemonic in ("cmp", "lea") and dst in ("rsp", "r12"), i
    # A leaf function without a stack check stays at its entry.
    leaf = b.entry_probe("main.probeTarget")
    assert leaf.kind == "entry" and leaf.addr == b.function("main.probeTarget").start  # type: ignore[union-attr]


def test_huge_frame_prologue_shape() -> None:
    """runtime functions with frames over StackBig use the `mov r12,rsp; sub; jb` prologue when present."""
    b = GoBinary.open(fixture_binary("1.27", "stripped"))
    shapes = {}
    for name in list(b.functions())[:20000]:
        ep = b.entry_probe(name)
        key = ep.reason.split(" at +")[0] if ep.kind != "entry" else "entry"
        shapes.setdefault(key, name)
    assert "cmp rsp,[r14+0x10]; jbe" in shapes
    assert "lea r12,[rsp-N]; cmp r12,[r14+0x10]; jbe" in shapes
    assert "mov r12,rsp; sub r12,N; jb; cmp r12,[r14+0x10]; jbe" in shapes  # runtime has a few


def test_unknown_function() -> None:
    b = GoBinary.open(fixture_binary("1.27", "stripped"))
    assert b.function("no.such") is None
    with pytest.raises(BinaryError):
        b.return_sites("no.such")
    with pytest.raises(BinaryError):
        b.entry_probe("no.such")
    assert b.caller_return_points("main.deep") is None
