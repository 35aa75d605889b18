"""`point_after_call`: the emulated instruction after a call, against `go tool objdump`, and its
refusals on hand-made code (branches into the stretch, leaving before an emulated instruction)."""

from __future__ import annotations

import re
import subprocess

import pytest

from receiver.ebpf_go.gobinary import GoBinary, disasm
from tests.support.gobuild import go_env, go_toolchain

from .conftest import GO_VERSIONS, fixture_binary

SERVE = "net/http.(*conn).serve"
SERVE_HTTP = "net/http.serverHandler.ServeHTTP"


@pytest.mark.parametrize("version,variant", [(v, x) for v in GO_VERSIONS for x in ("plain", "stripped-pie")])
def test_after_serve_http_is_the_call_of_hijacked(version: str, variant: str) -> None:
    """In (*conn).serve the first emulated instruction after ServeHTTP returns is the direct call
    of (*conn).hijacked (objdump of the unstripped twin: same addresses as the stripped build)."""
    b = GoBinary.open(fixture_binary(version, variant))
    p = b.point_after_call(SERVE, SERVE_HTTP)
    assert p.kind == "emulated-after-call", p.reason
    go = go_toolchain(version)
    twin = fixture_binary(version, "plain" if variant == "plain" else "pie")
    out = subprocess.run([str(go), "tool", "objdump", "-s", r"^net/http\.\(\*conn\)\.serve$", str(twin)],
                         capture_output=True, text=True, env=go_env(go), check=True).stdout
    calls = re.findall(r"\t(0x[0-9a-f]+)\t+[0-9a-f]+\t+CALL (\S+)", out)
    k = [i for i, (_, t) in enumerate(calls) if t == f"{SERVE_HTTP}(SB)"]
    assert len(k) == 1
    direct = [(int(a, 16), t) for a, t in calls[k[0] + 1:] if "(SB)" in t]
    assert direct[0] == (p.addr, "net/http.(*conn).hijacked(SB)")


def _sweep(code: bytes) -> disasm.Sweep:
    return disasm.sweep("amd64", code, 0x1000)


def _read(code: bytes):  # type: ignore[no-untyped-def]
    return lambda addr, n: code[addr - 0x1000:addr - 0x1000 + n]


CALL_F = bytes.fromhex("e8fb0f0000")      # 0x1000: call 0x2000 (the callee)
MOV = bytes.fromhex("4889c3")             # mov rbx, rax
CALL_IND = bytes.fromhex("ffd6")          # call rsi (not emulated)
CALL_G = bytes.fromhex("e8f00f0000")      # call rel32 (emulated)
RET = bytes.fromhex("c3")


def test_point_after_call_hand_made() -> None:
    code = CALL_F + MOV + CALL_IND + CALL_G + RET
    p = disasm.point_after_call("amd64", _sweep(code), _read(code), 0x2000)
    assert p.addr == 0x1000 + len(CALL_F + MOV + CALL_IND) and p.call_site == 0x1000
    # Leaving before any emulated instruction: none.
    code = CALL_F + MOV + RET + CALL_G
    assert disasm.point_after_call("amd64", _sweep(code), _read(code), 0x2000).addr == 0
    # A jump landing between the call and the point: none (the point would run without the call).
    body = CALL_F + MOV + CALL_IND + CALL_G + RET
    jmp_in = bytes([0xEB, (0x1005 - (0x1000 + len(body) + 2)) & 0xFF])  # jmp back to the mov after the call
    code = body + jmp_in
    sw = _sweep(code)
    assert sw.insns[-1].mnemonic == "jmp" and int(sw.insns[-1].op_str, 16) == 0x1005
    assert disasm.point_after_call("amd64", sw, _read(code), 0x2000).addr == 0
    # Two calls of the callee: ambiguous, none.
    code = CALL_F + MOV + CALL_F[:1] + (0x2000 - 0x1008 - 5).to_bytes(4, "little") + CALL_G + RET
    assert disasm.point_after_call("amd64", _sweep(code), _read(code), 0x2000).addr == 0


def test_is_emulated() -> None:
    for hx in ("e800000000", "eb00", "e900000000", "7400", "0f8400000000", "55", "4154"):
        assert disasm.is_emulated(bytes.fromhex(hx)), hx
    for hx in ("c3", "ffd6", "483b6610", "90", "e300", "4889c3"):
        assert not disasm.is_emulated(bytes.fromhex(hx)), hx


def test_server_end_plan_and_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The net/http server probe's choice per binary: emulated end points where found, else every RET
    (logged reason); "emulated" forced on a binary without them is refused."""
    from receiver.ebpf_go.gobinary import ReturnPoint
    from receiver.ebpf_go.probes import nethttp_server as ns
    b = GoBinary.open(fixture_binary("1.27", "stripped-pie"))
    plan = ns.end_plan(b)
    assert plan.mode == "emulated"
    assert [f for _, f in plan.points] == ["uprobe_server_end_h1", "uprobe_server_end_h2"]
    assert ns.end_plan(b, "ret").points == [(a, "uprobe_server_ServeHTTP_return") for a in b.return_sites(ns.SYMBOL)]
    monkeypatch.setattr(GoBinary, "point_after_call",
                        lambda self, caller, callee: ReturnPoint(0, caller, "none", "test: no point"))
    plan = ns.end_plan(b)
    assert plan.mode == "ret" and "test: no point" in plan.reason
    with pytest.raises(ns.ProbeUnavailable):
        ns.end_plan(b, "emulated")
    assert ns.end_report(b)["mode"] == "ret"
