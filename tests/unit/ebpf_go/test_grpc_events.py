"""gRPC probes without the kernel: records to spans, targets to server attributes, the status-error
itab found in stripped binaries, and the offsets each grpc-go version needs."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

import pytest

from collector.spans import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, STATUS_UNSET
from receiver.ebpf_go.gobinary import GoBinary
from receiver.ebpf_go.gobinary.itabs import itab_types, load_bias, returned_itab
from receiver.ebpf_go.probes import Build, ProbeUnavailable
from receiver.ebpf_go.probes import grpc_client as gc
from receiver.ebpf_go.probes import grpc_server as gs
from tests.support.gobuild import build_go_fixture
from tests.support.grpcapp import GrpcApp

TRACE, SPAN, PARENT = bytes(range(1, 17)), bytes(range(20, 28)), bytes(range(40, 48))


def _pad(b: bytes, n: int) -> bytes:
    return b + b"\0" * (n - len(b))


def server_record(code: int, method: bytes = b"/otelgo.test.Echo/Echo", message: bytes = b"",
                  remote: bool = False, peer: tuple[bytes, int] = (bytes([127, 0, 0, 1]), 5000),
                  local: tuple[bytes, int] = (bytes([127, 0, 0, 1]), 7000), stream_id: int = 1) -> tuple[Any, ...]:
    raw = gs.RECORD.layout.pack(
        4, 99, 1000, 5000, 7, TRACE, SPAN, PARENT if remote else b"\0" * 8, 1, int(remote), code, len(method),
        len(message), _pad(peer[0], 16), peer[1], len(peer[0]), _pad(local[0], 16), local[1], len(local[0]),
        stream_id, _pad(method, 128), _pad(message, 128))
    return gs.RECORD.layout.unpack(raw)


def client_record(err_tab: int, code: int, message: bytes = b"", eof: bool = False, from_ctx: bool = True,
                  target: bytes = b"127.0.0.1:7000", method: bytes = b"/otelgo.test.Echo/Echo", stream_id: int = 1,
                  local: tuple[bytes, int] = (bytes([127, 0, 0, 1]), 5000),
                  peer: tuple[bytes, int] = (bytes([127, 0, 0, 1]), 7000)) -> tuple[Any, ...]:
    raw = gc.RECORD.layout.pack(
        5, 99, 1000, 5000, 7, TRACE, SPAN, PARENT, 1, 0, err_tab, code, len(method), len(target), len(message),
        int(from_ctx), int(eof), stream_id, _pad(local[0], 16), local[1], len(local[0]), _pad(peer[0], 16), peer[1],
        len(peer[0]), _pad(method, 128), _pad(target, 128), _pad(message, 128))
    return gc.RECORD.layout.unpack(raw)


def test_server_span_shape() -> None:
    ((pid, s),) = gs.to_spans([server_record(0, remote=True)], 10)
    assert pid == 99 and s.kind == KIND_SERVER and s.name == "otelgo.test.Echo/Echo"
    assert (s.trace_id, s.span_id, s.parent_span_id) == (TRACE, SPAN, PARENT)
    assert (s.start_time_unix_nano, s.end_time_unix_nano) == (1010, 5010)
    assert s.attributes == {"rpc.system": "grpc", "rpc.service": "otelgo.test.Echo", "rpc.method": "Echo",
                            "rpc.grpc.status_code": 0, "server.address": "127.0.0.1", "server.port": 7000,
                            "network.peer.address": "127.0.0.1", "network.peer.port": 5000}
    assert s.status_code == STATUS_UNSET and s.flags == 0x301   # sampled, parent is remote
    ((_, root),) = gs.to_spans([server_record(0)], 0)
    assert root.parent_span_id == b"" and root.flags == 0x101


@pytest.mark.parametrize("code, error", [(0, False), (1, False), (2, True), (3, False), (4, True), (5, False),
                                         (7, False), (12, True), (13, True), (14, True), (15, True), (16, False)])
def test_server_status_is_error_only_for_server_faults(code: int, error: bool) -> None:
    ((_, s),) = gs.to_spans([server_record(code, message=b"why")], 0)
    assert s.attributes["rpc.grpc.status_code"] == code
    assert (s.status_code, s.status_message) == ((STATUS_ERROR, "why") if error else (STATUS_UNSET, ""))


def test_server_addresses() -> None:
    v6 = ipaddress.IPv6Address("2001:db8::1").packed
    mapped = ipaddress.IPv6Address("::ffff:10.0.0.2").packed
    ((_, s),) = gs.to_spans([server_record(0, peer=(v6, 1), local=(mapped, 2))], 0)
    assert (s.attributes["network.peer.address"], s.attributes["server.address"]) == ("2001:db8::1", "10.0.0.2")
    ((_, s),) = gs.to_spans([server_record(0, peer=(b"", 0), local=(b"", 0))], 0)
    assert not {"network.peer.address", "network.peer.port", "server.address", "server.port"} & set(s.attributes)


@pytest.mark.parametrize("full, want", [
    ("/grpc.health.v1.Health/Check", ("grpc.health.v1.Health/Check", "grpc.health.v1.Health", "Check")),
    ("/a.b.C/D", ("a.b.C/D", "a.b.C", "D")),
    ("/Lonely", ("Lonely", "", "Lonely")),
])
def test_split_method(full: str, want: tuple[str, str, str]) -> None:
    assert gs.split_method(full) == want


ITAB = 0x1000


@pytest.mark.parametrize("err_tab, code, eof, want_code", [
    (0, 0, False, 0),            # nil
    (0x2000, 0, True, 0),        # io.EOF: a stream's normal end
    (ITAB, 5, False, 5),         # a status error
    (ITAB, 4, False, 4),
    (0x2000, 5, False, 2),       # another error type: UNKNOWN, whatever the speculative read saw
    (ITAB, 99, False, 2),        # no valid code: UNKNOWN
])
def test_client_status(err_tab: int, code: int, eof: bool, want_code: int) -> None:
    s = gc.to_span(client_record(err_tab, code, b"no such thing", eof=eof), ITAB, 0)
    assert s.kind == KIND_CLIENT and s.name == "otelgo.test.Echo/Echo"
    assert s.attributes == {"rpc.system": "grpc", "rpc.service": "otelgo.test.Echo", "rpc.method": "Echo",
                            "rpc.grpc.status_code": want_code, "server.address": "127.0.0.1", "server.port": 7000,
                            "network.peer.address": "127.0.0.1", "network.peer.port": 7000}
    if want_code == 0:
        assert (s.status_code, s.status_message) == (STATUS_UNSET, "")
    else:
        assert s.status_code == STATUS_ERROR
        assert s.status_message == ("no such thing" if err_tab == ITAB and code == want_code else "UNKNOWN")


def test_client_parent() -> None:
    assert gc.to_span(client_record(0, 0), ITAB, 0).parent_span_id == PARENT
    assert gc.to_span(client_record(0, 0, from_ctx=False), ITAB, 0).parent_span_id == b""


@pytest.mark.parametrize("target, want", [
    ("localhost:50051", {"server.address": "localhost", "server.port": 50051}),
    ("dns:///svc.ns:443", {"server.address": "svc.ns", "server.port": 443}),
    ("dns://8.8.8.8/svc.ns:443", {"server.address": "svc.ns", "server.port": 443}),
    ("passthrough:///10.0.0.1:9000", {"server.address": "10.0.0.1", "server.port": 9000}),
    ("[::1]:50051", {"server.address": "::1", "server.port": 50051}),
    ("dns:///[::1]:50051", {"server.address": "::1", "server.port": 50051}),
    ("svc.ns", {"server.address": "svc.ns"}),
    ("unix:///tmp/app.sock", {"server.address": "/tmp/app.sock"}),
    ("unix:app.sock", {"server.address": "app.sock"}),
    ("xds:///frontend", {"server.address": "frontend"}),
])
def test_target_attrs(target: str, want: dict[str, Any]) -> None:
    assert gc.target_attrs(target) == want


# ---- from real binaries


@pytest.fixture(scope="module")
def grpcapp_plain() -> GoBinary:
    return GoBinary.open(build_go_fixture("grpcapp", "system"))


def test_status_error_itab_on_a_stripped_binary(grpcapp_plain: GoBinary) -> None:
    # The itab (*status.Error, error) the client compares finish's error with: found from the code of
    # (*Status).Err alone, so a stripped build (same addresses, no symbols) gives the symbol's address.
    by_symbol = {t: a for a, t in itab_types(grpcapp_plain).items()}
    want = by_symbol[("*google.golang.org/grpc/internal/status.Error", "error")]
    assert gc.status_error_itab(grpcapp_plain) == want
    stripped = GoBinary.open(build_go_fixture("grpcapp", "system", "stripped"))
    assert stripped.stripped and not itab_types(stripped)
    assert gc.status_error_itab(stripped) == want
    # a function returning no itab
    assert returned_itab(grpcapp_plain, "google.golang.org/grpc/internal/status.(*Status).Code") == 0


def test_grpc_offsets_and_flags(grpcapp_plain: GoBinary) -> None:
    flags = dict(f[2:].split("=", 1) for f in gs.PROBE.cflags(grpcapp_plain, Build("/p", 16, 1))
                 if f.startswith("-D") and "=" in f and not f.startswith("-DRECORD_ASSERTS"))
    # grpc v1.83 (the fixture's go.mod): ServerStream holds Stream by value, operateHeaders(ctx, frame, ...)
    assert flags["STREAM_MODE"] == "2" and flags["OPH_FRAME_ARG"] == "4" and flags["HF_SIZE"] == "40"
    peer = grpcapp_plain.struct_offset("google.golang.org/grpc/internal/transport.http2Server", "peer")
    assert peer is not None and int(flags["REMOTE_ADDR_POS"]) == peer.value
    assert int(flags["LOCAL_ADDR_POS"]) == peer.value + 16
    assert gs.PROBE.present(grpcapp_plain) and gc.PROBE.present(grpcapp_plain)


def test_an_unknown_grpc_layout_turns_the_probe_off(grpcapp_plain: GoBinary, monkeypatch: pytest.MonkeyPatch) -> None:
    # No DWARF and a grpc version the table does not know, far from any known one: the probe is off
    # with the reason, rather than reading memory at guessed offsets.
    stripped = GoBinary.open(build_go_fixture("grpcapp", "system", "stripped"))
    monkeypatch.setitem(stripped.modules, "google.golang.org/grpc", "v1.200.0")
    with pytest.raises(ProbeUnavailable) as e:
        gs.PROBE.cflags(stripped, Build("/p", 16, 1))
    assert "no measured offset for google.golang.org/grpc/internal/transport.Stream.id" in str(e.value)
    monkeypatch.setitem(stripped.modules, "google.golang.org/grpc", "v1.39.0")
    with pytest.raises(ProbeUnavailable, match="older than v1.40.0"):
        gc.PROBE.cflags(stripped, Build("/p", 16, 1))


@pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason="reads another process's memory")
@pytest.mark.parametrize("variant", ["pie", "pie-external"])
def test_load_bias_of_a_running_pie(variant: str) -> None:
    # Go links its own PIEs at 0x400000 (gcc at 0): the bias is where file offset 0 is mapped minus
    # that address, so the code of a function is at its ELF address + bias in the process.
    binary = build_go_fixture("grpcapp", "system", variant)
    gb = GoBinary.open(binary)
    app = GrpcApp(binary)
    try:
        bias = load_bias(app.pid, gb)
        f = gb.function(gc.FINISH)
        assert f is not None and bias != 0
        with open(f"/proc/{app.pid}/mem", "rb") as mem:
            mem.seek(f.start + bias)
            assert mem.read(32) == gb.elf.read(f.start, 32)
    finally:
        app.stop()


def test_stream_keys_for_the_stitcher() -> None:
    # Both ends name one stream the same way: (client end address, client end port, server port, id).
    streams: dict[bytes, tuple[str, int, int, int]] = {}
    gs.to_spans([server_record(0, stream_id=7)], 0, streams)
    assert streams == {SPAN: ("127.0.0.1", 5000, 7000, 7)}
    streams.clear()
    gc.to_span(client_record(0, 0, stream_id=7), ITAB, 0, streams)
    assert streams == {SPAN: ("127.0.0.1", 5000, 7000, 7)}
    streams.clear()
    gc.to_span(client_record(0, 0, stream_id=0), ITAB, 0, streams)     # no attempt read: no key
    gs.to_spans([server_record(0, peer=(b"", 0))], 0, streams)
    assert streams == {}
