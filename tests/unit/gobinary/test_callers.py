"""`GoBinary.callers`: every direct call site of a function, against the whole-binary disassembly of
`go tool objdump`, for several Go releases, stripped and PIE; and the refusals that keep a function's
end on its RETs (address taken, a stretch after the call that moves the stack pointer)."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

from receiver.ebpf_go.gobinary import GoBinary, disasm
from receiver.ebpf_go.gobinary.callers import is_method
from tests.support.gobuild import build_go_fixture, go_env, go_toolchain

from .conftest import FUNCS, GO_VERSIONS, UNSTRIPPED_TWIN, fixture_binary

_CALL = re.compile(r"\t(0x[0-9a-f]+)\t+[0-9a-f]+\t+CALL (\S+)\(SB\)")


@cache
def objdump_calls(version: str, binary: Path) -> dict[str, set[int]]:
    """target symbol -> addresses of every direct CALL of it in the binary."""
    go = go_toolchain(version)
    out = subprocess.run([str(go), "tool", "objdump", str(binary)], capture_output=True, text=True,
                         env=go_env(go), check=True).stdout
    calls: dict[str, set[int]] = {}
    for m in _CALL.finditer(out):
        calls.setdefault(m.group(2), set()).add(int(m.group(1), 16))
    return calls


@pytest.mark.parametrize("version,variant", [(v, x) for v in GO_VERSIONS for x in ("plain", "stripped-pie")])
def test_call_sites_are_objdumps(version: str, variant: str) -> None:
    """For every checked function: the call sites found are exactly objdump's CALLs of it (the
    stripped PIE is compared with its unstripped twin: same addresses)."""
    b = GoBinary.open(fixture_binary(version, variant))
    oracle = objdump_calls(version, fixture_binary(version, UNSTRIPPED_TWIN[variant]))
    funcs = [f for name in FUNCS if name != "main.main" for f in b.functions_named(name)]
    assert len(funcs) >= 8
    found = b.callers(funcs)
    for f in funcs:
        assert set(found[f.start].sites) == oracle.get(f.name, set()), f.name
    assert any(found[f.start].sites for f in funcs)


def test_funcapp_direct_and_taken() -> None:
    """funcapp: a function only called directly is not taken; one stored in a func variable and a
    method in a method table are, with the reason."""
    b = GoBinary.open(build_go_fixture("funcapp", "1.24"))
    names = ["main.lookupItem", "main.sleepFor", "main.viaValue", "example.com/funcapp/store.(*Store).Get"]
    funcs = [b.function(n) for n in names]
    assert all(funcs)
    got = {f.name: c for f, c in zip(funcs, b.callers(funcs).values(), strict=True)}  # type: ignore[union-attr]
    assert got["main.lookupItem"].taken == "" and len(got["main.lookupItem"].sites) == 1
    assert got["main.sleepFor"].taken == ""
    assert "data" in got["main.viaValue"].taken or "lea" in got["main.viaValue"].taken
    assert "method table" in got["example.com/funcapp/store.(*Store).Get"].taken


def test_point_after_call_site_refuses_a_moving_stack_pointer() -> None:
    """`call f; add rsp, 8; jmp x`: the jmp is emulated but sees the frame gone: no point."""
    code = bytes.fromhex("e800100000" "4883c408" "eb00")       # call +0x1000; add rsp, 8; jmp
    sw = disasm.sweep("amd64", code, 0x1000)
    p = disasm.point_after_call_site(sw, lambda a, n: code[a - 0x1000:a - 0x1000 + n], 0)
    assert p.addr == 0 and "moves the stack pointer" in p.reason
    code = bytes.fromhex("e800100000" "4889c1" "eb00")         # call +0x1000; mov rcx, rax; jmp
    sw = disasm.sweep("amd64", code, 0x1000)
    p = disasm.point_after_call_site(sw, lambda a, n: code[a - 0x1000:a - 0x1000 + n], 0)
    assert p.addr == 0x1008, p.reason


@pytest.mark.parametrize("symbol,method", [
    ("main.lookupItem", False), ("example.com/a/store.(*Store).Get", True), ("main.T.M", True),
    ("main.Max[go.shape.int]", False), ("main.(*List[go.shape.int]).Push", True), ("gopkg.in/yaml%2ev3.Unmarshal", False),
])
def test_is_method(symbol: str, method: bool) -> None:
    assert is_method(symbol) is method
