"""gRPC SERVER and CLIENT spans from eBPF, through `otelgo-collector --config` (ebpf_go -> batch ->
file exporter), for tests/fixtures/go/grpcapp: a real grpc-go server and client in one process.

What a user checks: exact span names and rpc.* attributes, status codes and span status, parents
(an incoming traceparent, HTTP -> gRPC, gRPC -> gRPC, gRPC -> HTTP and database/sql in one process),
streams (one span each), concurrent calls on one connection. Then the same over grpc-go releases
from v1.40 to the newest, Go 1.21-1.27, plain, stripped and PIE builds.

Server spans whose caller sent no traceparent come from a local peer: the stitcher (propagation
auto) joins each to the client span of its HTTP/2 stream when that client is traced (the calls
grpcapp makes to itself), and holds them STITCH_WINDOW_S before they leave, so the tests wait for
counts, not for time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from collector.spans import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, STATUS_UNSET, Span
from tests.e2e.test_ebpf_database_sql import _read_spans, wait_instrumented
from tests.support.collector import CollectorProcess, wait_for
from tests.support.gobuild import build_go_fixture
from tests.support.grpcapp import GrpcApp

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT and os.environ.get("CI") != "true", reason="needs root and eBPF")
pytestmark = [pytest.mark.root, needs_root]

SERVER_SCOPE = "otelgo-collector/google.golang.org/grpc"
CLIENT_SCOPE = "otelgo-collector/google.golang.org/grpc/client"
TP_TRACE, TP_PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACEPARENT = f"00-{TP_TRACE}-{TP_PARENT}-01"
ECHO, COUNT, SUM, CHECK = ("otelgo.test.Echo/Echo", "otelgo.test.Echo/Count", "otelgo.test.Echo/Sum",
                           "grpc.health.v1.Health/Check")


def rpc(name: str, code: int) -> dict[str, Any]:
    service, method = name.split("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, "rpc.grpc.status_code": code}


class Run:
    """grpcapp traced by a collector; `spans()` what the file exporter wrote."""

    def __init__(self, binary: Path, workdir: Path, probes: tuple[str, ...]) -> None:
        self.app = GrpcApp(binary)
        self.out = workdir / "spans.jsonl"
        self.col = CollectorProcess({
            "receivers": {"ebpf_go": {"targets": [{"exe_path": str(binary), "pid": [self.app.pid]}]}},
            "processors": {"batch": {"timeout": "100ms"}},
            "exporters": {"file": {"path": str(self.out), "flush_interval": "50ms"}},
            "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "processors": ["batch"],
                                                 "exporters": ["file"]}}},
        }, workdir)
        wait_instrumented(self.col, self.app.pid, probes)

    def spans(self, n: int, timeout: float = 20.0) -> list[tuple[str, Span]]:
        """Wait for n spans, then a moment for any extra (there must be none)."""
        wait_for(lambda: len(_read_spans(self.out)) >= n, timeout, f"{n} spans:\n{self.col.log()[-3000:]}")
        self.col.stop()     # flushes the stitcher: anything held leaves now
        got = [(scope, sp) for res, scope, sp in _read_spans(self.out)]
        assert len(got) == n, sorted((scope.rsplit("/", 1)[-1], sp.name) for scope, sp in got)
        return got

    def stop(self) -> None:
        self.col.stop()
        self.app.stop()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    started: list[Run] = []

    def start(binary: Path, probes: tuple[str, ...] = ("grpc_server", "grpc_client", "net_http_server")) -> Run:
        r = Run(binary, tmp_path, probes)
        started.append(r)
        return r

    try:
        yield start
    finally:
        for r in started:
            r.stop()


def one(spans: list[Span], **where: Any) -> Span:
    found = [s for s in spans if all((getattr(s, k) if k in ("name", "kind") else s.attributes.get(k)) == v
                                     for k, v in where.items())]
    assert len(found) == 1, (where, [(s.name, s.attributes) for s in spans])
    return found[0]


def children(spans: list[Span], parent: Span) -> list[Span]:
    return sorted((s for s in spans if s.parent_span_id == parent.span_id), key=lambda s: s.start_time_unix_nano)


def test_grpc_spans_statuses_streams_and_parents(run: Callable[..., Run]) -> None:
    r = run(build_go_fixture("grpcapp", "system"), ("grpc_server", "grpc_client", "net_http_server",
                                                    "net_http_client", "database_sql"))
    app = r.app
    assert app.echo("ok") == (grpc.StatusCode.OK, "ok")
    assert app.echo("notfound", metadata=[("traceparent", TRACEPARENT)]) == (grpc.StatusCode.NOT_FOUND, "no such thing")
    assert app.http("/call?v=internal") == "13"
    assert app.http("/call?v=sleep:2000&timeout_ms=100") == "4"
    assert app.http("/count?n=3") == "0"
    assert app.http("/sum?n=4") == "0"
    assert app.http("/call?v=grpc") == "0"
    assert app.http("/call?v=http") == "0"
    assert app.http("/concurrent?n=8") == "ok"
    # server spans: 2 from this test + internal, sleep, count, sum, grpc (Echo + Check), http, 8 concurrent
    # client spans: internal, sleep, count, sum, grpc (Echo + Check), http, 8 concurrent
    # net/http: 7 server (/call x4, /count, /sum, /concurrent) + GET /ping server + its client; SQL: 1
    got = r.spans(17 + 15 + 9 + 1)
    servers = [s for scope, s in got if scope == SERVER_SCOPE]
    clients = [s for scope, s in got if scope == CLIENT_SCOPE]
    http_servers = [s for scope, s in got if scope == "otelgo-collector/net/http"]
    assert (len(servers), len(clients)) == (17, 15)
    port = app.grpc_port
    for s in servers:
        assert s.kind == KIND_SERVER
        assert s.attributes["server.address"] == "127.0.0.1" and s.attributes["server.port"] == port
        assert s.attributes["network.peer.address"] == "127.0.0.1" and s.attributes["network.peer.port"] > 0
        assert set(s.attributes) == {*rpc(s.name, 0), "server.address", "server.port", "network.peer.address",
                                     "network.peer.port"}
    for c in clients:
        assert c.kind == KIND_CLIENT
        want = rpc(c.name, c.attributes["rpc.grpc.status_code"]) | {
            "server.address": "127.0.0.1", "server.port": port, "network.peer.address": "127.0.0.1",
            "network.peer.port": port}
        assert c.attributes == want
    by_route = {}
    for h in http_servers:
        by_route.setdefault(h.attributes["url.path"], []).append(h)

    # from this test process: a root, and one continuing the caller's traceparent
    ok = one(servers, name=ECHO, **{"network.peer.port": one(servers, **{"rpc.grpc.status_code": 5})
                                    .attributes["network.peer.port"], "rpc.grpc.status_code": 0})
    assert ok.parent_span_id == b"" and ok.status_code == STATUS_UNSET
    nf = one(servers, **{"rpc.grpc.status_code": 5})
    assert (nf.name, nf.trace_id.hex(), nf.parent_span_id.hex()) == (ECHO, TP_TRACE, TP_PARENT)
    assert nf.status_code == STATUS_UNSET and nf.status_message == ""   # NOT_FOUND is the caller's fault

    # HTTP -> gRPC client -> gRPC server (joined by the stitcher on its stream)
    internal_c = one(clients, **{"rpc.grpc.status_code": 13})
    internal_s = one(servers, **{"rpc.grpc.status_code": 13})
    assert internal_c.name == internal_s.name == ECHO
    assert (internal_c.status_code, internal_c.status_message) == (STATUS_ERROR, "boom")
    assert (internal_s.status_code, internal_s.status_message) == (STATUS_ERROR, "boom")
    calls = {h.span_id: h for h in by_route["/call"]}
    assert internal_c.parent_span_id in calls and internal_c.trace_id == calls[internal_c.parent_span_id].trace_id
    assert (internal_s.parent_span_id, internal_s.trace_id) == (internal_c.span_id, internal_c.trace_id)
    assert internal_s.start_time_unix_nano >= internal_c.start_time_unix_nano
    assert internal_s.end_time_unix_nano <= internal_c.end_time_unix_nano

    # a deadline: the client says DEADLINE_EXCEEDED after ~100 ms; the server span ends when its
    # handler returns (the client's RST_STREAM or its own deadline, whichever grpc saw first)
    # (grpc-go's own message: its timer's, or the server's RST_STREAM if that arrived first)
    late_c = one(clients, **{"rpc.grpc.status_code": 4})
    assert late_c.status_code == STATUS_ERROR
    assert late_c.status_message in ("context deadline exceeded",
                                     "stream terminated by RST_STREAM with error code: CANCEL")
    assert 90e6 <= late_c.end_time_unix_nano - late_c.start_time_unix_nano < 1000e6
    late_s = [s for s in servers if s.attributes["rpc.grpc.status_code"] in (1, 4)]
    assert len(late_s) == 1 and late_s[0].end_time_unix_nano - late_s[0].start_time_unix_nano < 1500e6
    assert late_s[0].status_code == (STATUS_ERROR if late_s[0].attributes["rpc.grpc.status_code"] == 4 else STATUS_UNSET)

    # streams: one span each for the whole stream, on both sides
    for name, route in ((COUNT, "/count"), (SUM, "/sum")):
        c, s = one(clients, name=name), one(servers, name=name)
        assert c.attributes["rpc.grpc.status_code"] == s.attributes["rpc.grpc.status_code"] == 0
        assert c.status_code == s.status_code == STATUS_UNSET
        assert c.parent_span_id == by_route[route][0].span_id
        assert (s.parent_span_id, s.trace_id) == (c.span_id, c.trace_id)
        assert c.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano <= c.end_time_unix_nano

    # gRPC -> gRPC in one process: the Health/Check client span is a child of the Echo server span
    check_c, check_s = one(clients, name=CHECK), one(servers, name=CHECK)
    (grpc_echo_s,) = [s for s in servers if s.span_id == check_c.parent_span_id]
    assert grpc_echo_s.name == ECHO and check_c.trace_id == grpc_echo_s.trace_id
    assert (check_s.parent_span_id, check_s.trace_id) == (check_c.span_id, check_c.trace_id)

    # gRPC -> HTTP and SQLite in one process: both children of the Echo server span
    (ping_client,) = [s for scope, s in got if scope == "otelgo-collector/net/http/client"]
    (sql,) = [s for scope, s in got if scope == "otelgo-collector/database/sql"]
    assert ping_client.parent_span_id == sql.parent_span_id
    (http_echo_s,) = [s for s in servers if s.span_id == sql.parent_span_id]
    assert http_echo_s.name == ECHO and sql.trace_id == ping_client.trace_id == http_echo_s.trace_id
    assert [s.name for s in children([s for _, s in got], http_echo_s)] == ["GET", "SELECT"]

    # 8 concurrent calls on one connection: 8 client spans under the request, 8 distinct server spans
    (conc,) = by_route["/concurrent"]
    conc_c = children(clients, conc)
    assert len(conc_c) == 8 and all(c.name == ECHO and c.attributes["rpc.grpc.status_code"] == 0 for c in conc_c)
    conc_s = [s for s in servers if s.name == ECHO and s.attributes["rpc.grpc.status_code"] == 0
              and s.start_time_unix_nano >= conc.start_time_unix_nano and s.end_time_unix_nano <= conc.end_time_unix_nano]
    assert len(conc_s) == 8 and {s.parent_span_id for s in conc_s} == {c.span_id for c in conc_c}


# grpc-go releases over the range, each with a Go it builds with, over plain/stripped/PIE builds, and
# the pins an old grpc or Go needs (tests/fixtures/go/grpcapp/main.go says why).
OLD_PROTOBUF = {"google.golang.org/protobuf": "v1.34.2"}          # v1.36 needs Go 1.23
OLD_GRPC = {"github.com/golang/protobuf": "v1.5.4"}               # grpc <= v1.45's own pin does not build
MATRIX = [
    ("v1.40.0", "1.21", "plain", OLD_PROTOBUF | OLD_GRPC),
    ("v1.50.1", "1.22", "stripped", OLD_PROTOBUF),
    ("v1.60.1", "1.23", "pie", {}),
    ("v1.69.4", "1.24", "stripped-pie", {}),
    ("v1.77.0", "1.25", "stripped", {}),
    ("v1.83.2", "1.26", "pie", {}),
    ("v1.85.0", "1.27", "stripped-pie", {}),
]


@pytest.mark.parametrize("grpc_version, go, variant, pins", MATRIX, ids=[f"grpc{v}-go{g}-{b}" for v, g, b, _ in MATRIX])
def test_grpc_versions(run: Callable[..., Run], grpc_version: str, go: str, variant: str,
                       pins: dict[str, str]) -> None:
    binary = build_go_fixture("grpcapp", go, variant, modules={"google.golang.org/grpc": grpc_version, **pins})
    r = run(binary)
    assert r.app.echo("notfound", metadata=[("traceparent", TRACEPARENT)])[0] == grpc.StatusCode.NOT_FOUND
    assert r.app.http("/call?v=internal") == "13"
    assert r.app.http("/count?n=2") == "0"
    got = r.spans(2 + 3 + 2)   # server: notfound, internal, count; client: internal, count; http: 2
    servers = [s for scope, s in got if scope == SERVER_SCOPE]
    clients = [s for scope, s in got if scope == CLIENT_SCOPE]
    nf = one(servers, **{"rpc.grpc.status_code": 5})
    assert (nf.name, nf.trace_id.hex(), nf.parent_span_id.hex()) == (ECHO, TP_TRACE, TP_PARENT)
    assert nf.attributes == rpc(ECHO, 5) | {"server.address": "127.0.0.1", "server.port": r.app.grpc_port,
                                            "network.peer.address": "127.0.0.1",
                                            "network.peer.port": nf.attributes["network.peer.port"]}
    s13, c13 = one(servers, **{"rpc.grpc.status_code": 13}), one(clients, **{"rpc.grpc.status_code": 13})
    assert (s13.status_message, c13.status_message) == ("boom", "boom")
    assert c13.attributes == rpc(ECHO, 13) | {"server.address": "127.0.0.1", "server.port": r.app.grpc_port,
                                              "network.peer.address": "127.0.0.1", "network.peer.port": r.app.grpc_port}
    assert one(servers, name=COUNT).attributes["rpc.grpc.status_code"] == 0
    count_c = one(clients, name=COUNT)
    assert count_c.attributes["rpc.grpc.status_code"] == 0 and count_c.status_code == STATUS_UNSET
    https = {s.span_id: s for scope, s in got if scope == "otelgo-collector/net/http"}
    assert c13.parent_span_id in https and count_c.parent_span_id in https


@pytest.mark.parametrize("mode", ["auto", "stitch"])
def test_grpc_joined_across_processes_by_stream(tmp_path: Path, mode: str) -> None:
    # A (HTTP -> gRPC client) calls B (gRPC server) in another process of this host. Nothing puts a
    # traceparent into HTTP/2 yet, so the stitcher joins them: by (connection, stream id), exactly,
    # 100 concurrent calls on one connection and a failing one, with no wrong join.
    binary = build_go_fixture("grpcapp", "system")
    b = GrpcApp(binary)
    a = GrpcApp(binary, ("-target", b.grpc_addr))
    out = tmp_path / "spans.jsonl"
    col = None
    try:
        col = CollectorProcess({
            "receivers": {"ebpf_go": {"targets": [{"exe_path": str(binary), "pid": [a.pid, b.pid]}],
                                      "propagation": mode}},
            "processors": {"batch": {"timeout": "100ms"}},
            "exporters": {"file": {"path": str(out), "flush_interval": "50ms"}},
            "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "processors": ["batch"],
                                                 "exporters": ["file"]}}},
        }, tmp_path)
        wait_instrumented(col, a.pid, ("grpc_server", "grpc_client", "net_http_server"))
        for pid in (a.pid, b.pid):   # the metric counts processes: wait for each one by its log line
            wait_for(lambda pid=pid: f"tracing pid {pid} " in col.log(), 60, f"pid {pid} traced:\n{col.log()[-3000:]}")
        assert a.http("/concurrent?n=100") == "ok"
        assert a.http("/call?v=internal") == "13"
        want = 2 + 101 + 101
        wait_for(lambda: len(_read_spans(out)) >= want, 20,
                 f"{want} spans, got {len(_read_spans(out))}:\n{col.log()}")
        metrics = col.scrape()
        col.stop()
        got = _read_spans(out)
        assert len(got) == want
        clients = {s.span_id: s for res, scope, s in got if scope == CLIENT_SCOPE and res["process.pid"] == a.pid}
        servers = [s for res, scope, s in got if scope == SERVER_SCOPE and res["process.pid"] == b.pid]
        assert (len(clients), len(servers)) == (101, 101)
        parents = [s.parent_span_id for s in servers]
        assert set(parents) == set(clients), "every server span joined to its own client span, one to one"
        for s in servers:
            c = clients[s.parent_span_id]
            assert s.trace_id == c.trace_id
            assert c.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano <= c.end_time_unix_nano
            assert s.attributes["rpc.grpc.status_code"] == c.attributes["rpc.grpc.status_code"]
            assert s.attributes["network.peer.port"] != b.grpc_port and c.attributes["network.peer.port"] == b.grpc_port
        joined = [line for line in metrics.splitlines() if line.startswith("otelgo_ebpf_stitch_total{")
                  and 'outcome="joined"' in line and 'protocol="grpc"' in line]
        assert len(joined) == 1 and float(joined[0].rsplit(" ", 1)[1]) == 101
    finally:
        if col is not None:
            col.stop()
        a.stop()
        b.stop()
