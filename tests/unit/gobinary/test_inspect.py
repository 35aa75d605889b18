"""`otelgo-collector inspect` (gobinary.inspect.main)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from receiver.ebpf_go.gobinary.inspect import main

from .conftest import fixture_binary


def test_inspect_stripped_text(capsys: pytest.CaptureFixture[str]) -> None:
    path = fixture_binary("1.27", "stripped")
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "Go go1.27" in out and "functions from pclntab" in out
    assert "[x] net/http server" in out and "[x] database/sql" in out
    assert "    [ ] gRPC server: not linked: no google.golang.org/grpc.(*Server).handleStream or " in out
    assert "jcc-after-stack-check" in out and "[table]" in out


def test_inspect_json(capsys: pytest.CaptureFixture[str]) -> None:
    path = fixture_binary("1.24", "plain", "gobin_modules")
    assert main([str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["modules"]["golang.org/x/text"] == "v0.3.8"
    assert rep["go_version"].startswith("go1.24")
    http = next(i for i in rep["instrumentations"] if i["name"] == "net/http server")
    assert not http["applies"]
    assert http["reason"] == "not linked: no net/http.serverHandler.ServeHTTP in this binary"


def test_inspect_says_why_a_probe_is_not_attached(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # `inspect` runs the receiver's own checks: a probe whose offsets are missing is `[ ]` with the
    # reason the receiver logs.
    from receiver.ebpf_go.gobinary import GoBinary
    path = fixture_binary("1.27", "stripped")
    real_open = GoBinary.open

    def opened(p: str) -> GoBinary:
        b = real_open(p)
        real_offset = b.struct_offset
        b.struct_offset = lambda st, f: None if (st, f) == ("net/http.Request", "ctx") else real_offset(st, f)  # type: ignore[method-assign]
        return b
    monkeypatch.setattr(GoBinary, "open", staticmethod(opened))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert ("    [ ] net/http server: no offset for net/http.Request.ctx (no DWARF and not in the offsets table)\n"
            in out)
    assert "    [x] database/sql\n" in out


def test_inspect_basic_json_offsets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(fixture_binary("1.23", "pie")), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    http = next(i for i in rep["instrumentations"] if i["name"] == "net/http server")
    f = http["functions"][0]
    assert f["name"] == "net/http.serverHandler.ServeHTTP" and f["return_sites"]
    srcs = {o["source"] for o in http["offsets"]}
    assert srcs == {"dwarf"} or srcs == {"dwarf", None}


def test_inspect_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["/bin/ls"]) == 1
    assert "not a Go executable" in capsys.readouterr().err
    assert main(["999999999"]) == 1
    assert main([]) == 2


def test_inspect_pid(capsys: pytest.CaptureFixture[str]) -> None:
    path = fixture_binary("1.27", "stripped")
    proc = subprocess.Popen([str(path), "calls", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.2)
        if not os.access(f"/proc/{proc.pid}/exe", os.R_OK) and os.geteuid() != 0:
            pytest.skip("cannot read /proc/pid/exe as non-root (CI runs as root)")
        assert main([str(proc.pid), "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["pid"] == proc.pid and rep["go_version"].startswith("go1.27")
    finally:
        proc.kill()
        proc.wait()
    _ = sys
