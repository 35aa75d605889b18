"""ebpf_go receiver, net/http server spans, end to end on real Go servers built in this run.

The receiver runs in-process (a consumer collects its batches) so each case costs a BCC compile
(~1.5 s) and not a collector start; one test drives the real CLI with the file exporter.
Needs root and eBPF: marked `root`, skipped when not root unless CI=true.
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.component import ComponentID
from collector.spans import KIND_SERVER, STATUS_ERROR, STATUS_UNSET, Span, SpanBatch, from_json_dict
from collector.telemetry import ComponentTelemetry, SelfMetrics
from tests.support.ci import needs_root
from tests.support.collector import json_lines, wait_for
from tests.support.gobuild import ROOT, build_go_fixture
from tests.support.goserver import Server
from tests.support.held import open_fds, uprobes_held

pytestmark = [*needs_root(), pytest.mark.timeout(300)]

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


# ---------------------------------------------------------------- helpers


class Collect:
    def __init__(self) -> None:
        self.batches: list[SpanBatch] = []

    def consume(self, batch: SpanBatch) -> None:
        self.batches.append(batch)

    def spans(self) -> list[tuple[dict[str, Any], str, Span]]:
        return [(rs.resource.attributes, ss.scope.name, s) for b in self.batches for rs, ss, s in b.iter_spans()]


def start_receiver(config: dict[str, Any]) -> tuple[Any, Collect]:
    from receiver.ebpf_go.config import EbpfGoConfig
    from receiver.ebpf_go.receiver import factory
    sink = Collect()
    cfg = EbpfGoConfig.model_validate({"discovery_interval": "100ms", **config})
    r = factory.create(ComponentID("ebpf_go"), cfg, ComponentTelemetry("receiver", "ebpf_go", SelfMetrics()), sink)
    r.start(None)
    assert r.enabled, "receiver did not start (see log)"
    return r, sink


def wait_spans(sink: Collect, n: int, timeout: float = 10.0) -> list[tuple[dict[str, Any], str, Span]]:
    wait_for(lambda: len(sink.spans()) >= n, timeout, f"{n} spans (have {len(sink.spans())})")
    time.sleep(0.2)  # nothing more may come
    return sink.spans()


def our_uprobes(pid: int) -> list[dict[str, Any]]:
    """uprobes held by `pid` (perf events and uprobe_multi links), plus tracefs uprobe_events lines
    naming our probes."""
    held = uprobes_held(pid)
    for f in ("/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events"):
        if os.path.exists(f):
            held += [{"tracefs": line} for line in Path(f).read_text().splitlines() if "httpserver" in line]
    return held


@pytest.fixture(scope="module")
def binaries() -> dict[tuple[str, str], Path]:
    return {}


def fixture_binary(version: str, variant: str = "plain") -> Path:
    return build_go_fixture("httpserver", version, variant)


# ---------------------------------------------------------------- spans, per Go version and build

MATRIX = [("1.19", "plain"), ("1.23", "plain"), ("1.24", "plain"), ("1.26", "plain"), ("1.27", "plain"),
          ("1.23", "stripped"), ("1.27", "pie"), ("1.24", "stripped-pie")]


@pytest.mark.parametrize("version,variant", MATRIX, ids=[f"go{v}-{x}" for v, x in MATRIX])
def test_server_spans(version: str, variant: str) -> None:
    binary = fixture_binary(version, variant)
    patterns = version != "1.19"
    n_fill = 28 if tuple(int(x) for x in version.split(".")) >= (1, 24) else 5
    srv = Server(binary, env={"OTEL_SERVICE_NAME": "shop"})
    r, sink = start_receiver({"targets": [{"pid": srv.pid}]})
    try:
        wait_for(lambda: srv.pid in r.processes, 30, "attach")
        good_tp = f"00-{TRACE_ID}-{PARENT_ID}-01"
        # (method, path, headers, body, status, name, route)
        cases: list[tuple[str, str, dict[str, str], bytes, int, str, str | None]] = [
            ("GET", "/hello", {}, b"", 200, "GET /hello", "/hello"),
            ("GET", "/items/42", {"traceparent": good_tp}, b"", 200,
             "GET /items/{id}" if patterns else "GET", "/items/{id}" if patterns else None),
            ("POST", "/echo", {"X-Extra": "1"}, b"payload", 200, "POST /echo", "/echo"),
            ("GET", "/status/503", {}, b"", 503, "GET /status/", "/status/"),
            ("PUT", "/status/404", {"traceparent": "00-zzzz-not-valid"}, b"", 404, "PUT /status/", "/status/"),
            ("DELETE", "/status/201", {}, b"", 201, "DELETE /status/", "/status/"),
            ("GET", "/users/7/posts", {}, b"", 200,
             "GET /users/{id}/posts" if patterns else "GET", "/users/{id}/posts" if patterns else None),
            ("GET", "/hello?x=1", {"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"}, b"", 200, "GET /hello", "/hello"),
            # Many headers. Swiss maps (Go >= 1.24): 30, a table directory, walked whole. Classic maps:
            # 8 lines and Host, 2 buckets; the walk follows one overflow bucket (and no chain of them: where
            # 30 keys land depends on each map's hash seed, so 30 would make this test a lottery; see
            # test_classic_map_overflow_bucket_walked).
            ("GET", "/hello", {**{f"X-Filler-{i}": "v" * i for i in range(n_fill)}, "traceparent": good_tp}, b"",
             200, "GET /hello", "/hello"),
        ]
        if not patterns:
            # Go 1.19 has no ServeMux patterns: every span is named by the method, route from Request is absent.
            cases = [(m, p, h, b, s, m, None) for m, p, h, b, s, _n, _r in cases]
        windows = []
        for method, path, headers, body, _st, _n, _r in cases:
            t0 = time.time_ns()
            resp = srv.request(method, path, headers, body)
            windows.append((t0, time.time_ns()))
            assert resp.startswith(b"HTTP/1.1 "), resp[:50]
        spans = wait_spans(sink, len(cases))
        assert len(spans) == len(cases), [s.name for _, _, s in spans]
        spans.sort(key=lambda t: t[2].start_time_unix_nano)
        for (res, scope, s), case, (t0, t1) in zip(spans, cases, windows, strict=True):
            method, path, headers, _body, status, name, route = case
            assert s.name == name
            assert s.kind == KIND_SERVER
            assert scope == "otelgo-collector/net/http"
            a = s.attributes
            expected = {
                "http.request.method": method, "url.path": path.split("?")[0], "url.scheme": "http",
                "http.response.status_code": status, "server.address": "127.0.0.1", "server.port": srv.port,
                "network.peer.address": "127.0.0.1", "network.protocol.version": "1.1",
                "user_agent.original": "e2e-client/1.0",
            }
            if route:
                expected["http.route"] = route
            peer_port = a.pop("network.peer.port")
            assert isinstance(peer_port, int) and 0 < peer_port < 65536
            assert a == expected
            assert s.status_code == (STATUS_ERROR if status >= 500 else STATUS_UNSET)
            assert t0 <= s.start_time_unix_nano <= s.end_time_unix_nano <= t1, (t0, s.start_time_unix_nano,
                                                                               s.end_time_unix_nano, t1)
            assert len(s.trace_id) == 16 and len(s.span_id) == 8 and any(s.span_id)
            if headers.get("traceparent") == f"00-{TRACE_ID}-{PARENT_ID}-01":
                assert (s.trace_id.hex(), s.parent_span_id.hex()) == (TRACE_ID, PARENT_ID), (method, path, headers)
            else:
                assert s.parent_span_id == b"" and s.trace_id.hex() != TRACE_ID and any(s.trace_id)
            assert res["service.name"] == "shop"
            assert res["process.pid"] == srv.pid
            assert res["process.runtime.name"] == "go"
            assert res["process.runtime.version"].startswith(f"go{version}")
            assert res["process.executable.path"] == str(binary)
            assert res["telemetry.distro.name"] == "otelgo-collector"
            assert res["host.name"] == socket.gethostname()
        ids = {s.trace_id for _, _, s in spans}
        assert len(ids) == len(cases) - 1  # every trace but the propagated ones is new
    finally:
        r.shutdown()
        srv.stop()
    assert our_uprobes(os.getpid()) == []


@pytest.mark.parametrize("version", ["1.19", "1.23"])
def test_classic_map_overflow_bucket_walked(version: str) -> None:
    # 12 header lines (Host included, which net/http deletes after) make a classic map of 2 buckets
    # (the hint counts 13 lines); each map has its own hash seed, so in about 1 request of 7 one bucket
    # takes 9 or more keys and the last ones, traceparent among them, go to an overflow bucket. Before
    # the walk followed it, 26 of 200 such requests lost their parent.
    binary = fixture_binary(version)
    srv = Server(binary)
    r, sink = start_receiver({"targets": [{"pid": srv.pid}]})
    try:
        wait_for(lambda: srv.pid in r.processes, 30, "attach")
        tp = f"00-{TRACE_ID}-{PARENT_ID}-01"
        for _ in range(200):
            srv.request("GET", "/hello", {**{f"X-Filler-{j}": "v" for j in range(8)}, "traceparent": tp})
        spans = wait_spans(sink, 200)
        assert len(spans) == 200
        joined = [s for _, _, s in spans if (s.trace_id.hex(), s.parent_span_id.hex()) == (TRACE_ID, PARENT_ID)]
        assert len(joined) == 200
        assert all(s.attributes["user_agent.original"] == "e2e-client/1.0" for _, _, s in spans)
    finally:
        r.shutdown()
        srv.stop()


# ---------------------------------------------------------------- where the request ends: h2, hijack, panic


class H2Server:
    """The httpserver_h2 fixture: one handler on a plain HTTP/1.x and a TLS (h2, http/1.1) listener."""

    def __init__(self, binary: Path) -> None:
        self.proc = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line.startswith("LISTENING "), line
        self.plain, self.tls = line.split()[1:3]
        self.pid = self.proc.pid

    def raw(self, request: bytes) -> bytes:
        host, port = self.plain.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(request)
            chunks = []
            while b := s.recv(65536):
                chunks.append(b)
        return b"".join(chunks)

    def keepalive(self, paths: list[str]) -> list[bytes]:
        """HTTP/1.1 requests on one keep-alive connection (http.client); the answers' first lines."""
        import http.client
        host, port = self.plain.rsplit(":", 1)
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        out = []
        for p in paths:
            c.request("GET", p)
            r = c.getresponse()
            r.read()
            out.append(f"{r.version} {r.status}".encode())
        c.close()
        return out

    def curl(self, paths: list[str], http: str = "--http2") -> list[str]:
        """One curl process, one TLS connection (reused), `<http_version> <code>` per URL."""
        args = ["curl", "-sk", http, "--max-time", "20"]
        for p in paths:
            args += ["-o", "/dev/null", "-w", "%{http_version} %{http_code}\\n", f"https://{self.tls}{p}"]
        return subprocess.run(args, capture_output=True, text=True).stdout.split()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def _drive_h2(srv: H2Server, n: int, h2_status: bool = True) -> tuple[int, list[tuple[str, str, int | None]]]:
    """The same mix of requests every time: (number of requests that end normally, the span
    identities (protocol version, path, status) they should produce, in any order). `h2_status`:
    whether HTTP/2 spans carry the status (not when two HTTP/2 servers disagree on its offset)."""
    want: list[tuple[str, str, int | None]] = []
    # HTTP/2 over TLS: n on one connection, then the status cases.
    h2_paths = ["/hello"] * n + ["/status/404", "/status/503", "/status/201", "/empty"]
    got = srv.curl(h2_paths)
    assert got == [x for p in h2_paths for x in ("2", "404" if p.endswith("404") else "503" if p.endswith("503")
                                                   else "201" if p.endswith("201") else "200")], got[:12]
    want += [("2", p, None if not h2_status else 200 if p in ("/hello", "/empty") else int(p.rsplit("/", 1)[1]))
             for p in h2_paths]
    # HTTP/1.1 keep-alive, plain: n requests.
    assert srv.keepalive(["/hello"] * n) == [b"11 200"] * n
    want += [("1.1", "/hello", 200)] * n
    # HTTP/1.1 over TLS.
    assert srv.curl(["/status/202"], "--http1.1") == ["1.1", "202"]
    want.append(("1.1", "/status/202", 202))
    # Hijacked connections: the handler returns after answering on the raw connection.
    for _ in range(3):
        assert srv.raw(b"GET /hijack HTTP/1.1\r\nHost: x\r\n\r\n").endswith(b"hijack\n")
        want.append(("1.1", "/hijack", 200))
    # Handlers that panic (HTTP/1.x and HTTP/2, plain panic and ErrAbortHandler): no normal return.
    for path in ("/panic", "/abort"):
        assert srv.raw(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()) == b""
        assert srv.curl([path])[-1] == "000"
    # The target still serves, on both protocols, after the panics.
    assert srv.keepalive(["/hello"]) == [b"11 200"]
    assert srv.curl(["/hello"]) == ["2", "200"]
    want += [("1.1", "/hello", 200), ("2", "/hello", 200 if h2_status else None)]
    return len(want), want


# httpserver_xnet: HTTP/2 from golang.org/x/net/http2 (ConfigureServer) next to the std copy.
H2_MATRIX = [("httpserver_h2", "1.19", "plain"), ("httpserver_h2", "1.24", "stripped-pie"),
             ("httpserver_h2", "1.26", "plain"), ("httpserver_h2", "1.27", "plain"),
             ("httpserver_xnet", "1.19", "plain"), ("httpserver_xnet", "1.24", "plain"),
             ("httpserver_xnet", "1.27", "plain")]


@pytest.mark.parametrize("fixture,version,variant", H2_MATRIX, ids=[f"{f}-go{v}-{x}" for f, v, x in H2_MATRIX])
def test_end_points_h2_hijack_panic_exact_counts(fixture: str, version: str, variant: str) -> None:
    """Every request that returns from its handler is one span, ended where the handler returned,
    with its status, over HTTP/2 (TLS), HTTP/1.1 (plain and TLS) and hijacked connections; handlers
    that panic yield no span and leave the target serving: the same as with RET probes, which the
    second half checks by running the same requests with the end forced to every RET."""
    from receiver.ebpf_go.gobinary import GoBinary
    from receiver.ebpf_go.probes import nethttp_server
    binary = build_go_fixture(fixture, version, variant)
    gb = GoBinary.open(str(binary))
    assert nethttp_server.end_plan(gb).mode == "emulated"
    h2_status = nethttp_server.h2_status_offsets(gb) != (-1, -1)
    results = {}
    for mode in ("auto", "ret"):
        nethttp_server.END_MODE = mode
        srv = H2Server(binary)
        r, sink = start_receiver({"targets": [{"pid": srv.pid}]})
        try:
            wait_for(lambda: srv.pid in r.processes, 30, "attach")  # noqa: B023
            held = len(our_uprobes(os.getpid()))
            n, want = _drive_h2(srv, 50, h2_status)
            spans = wait_spans(sink, n)
            assert srv.proc.poll() is None
        finally:
            nethttp_server.END_MODE = "auto"
            r.shutdown()
            srv.stop()
        assert len(spans) == n, (mode, len(spans), n)
        got = sorted(((s.attributes["network.protocol.version"], s.attributes["url.path"],
                       s.attributes.get("http.response.status_code")) for _, _, s in spans), key=repr)
        assert got == sorted(want, key=repr), mode
        for _, _, s in spans:
            tls = s.attributes["network.protocol.version"] == "2" or s.attributes["url.path"] == "/status/202"
            assert s.attributes["url.scheme"] == ("https" if tls else "http")
            assert s.start_time_unix_nano <= s.end_time_unix_nano
            assert s.status_code == (STATUS_ERROR if s.attributes.get("http.response.status_code", 0) >= 500
                                     else STATUS_UNSET)
        results[mode] = (held, got)
    assert results["auto"][1] == results["ret"][1]
    # entry, the HTTP/1.x end, one end per HTTP/2 server (2 with x/net): no RET probe
    assert results["auto"][0] == 1 + len(nethttp_server.end_plan(gb).points) == (4 if fixture.endswith("xnet") else 3)


# ---------------------------------------------------------------- no change to the service, clean detach


@pytest.mark.parametrize("attach_as", ["uprobe_multi links", "perf events"])
def test_byte_identical_and_clean_detach(attach_as: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # links where the kernel has them (this one does); perf events, the fallback, on older kernels
    from receiver.ebpf_go import bpfsys
    assert bpfsys.uprobe_multi_supported(), "this platform's 6.18 has uprobe_multi links"
    if attach_as == "perf events":
        monkeypatch.setattr(bpfsys, "_uprobe_multi", False)
    binary = fixture_binary("1.27")
    srv = Server(binary)
    reqs = [b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nabcde",
            b"GET /status/500 HTTP/1.1\r\nHost: x\r\nConnection: close\r\ntraceparent: 00-" +
            TRACE_ID.encode() + b"-" + PARENT_ID.encode() + b"-01\r\n\r\n"]

    def answers() -> list[bytes]:
        return [b"\r\n".join(x for x in srv.raw(q).split(b"\r\n") if not x.startswith(b"Date: ")) for q in reqs]

    try:
        before = answers()
        r, sink = start_receiver({"targets": [{"exe_path": str(binary)}]})
        try:
            wait_for(lambda: srv.pid in r.processes, 30, "attach")
            held = our_uprobes(os.getpid())
            assert len(held) == 3  # entry + the HTTP/1.x and the HTTP/2 end points
            assert all(("fd_type" in h) == (attach_as == "perf events") for h in held), held
            during = answers()
            wait_spans(sink, len(reqs))
        finally:
            r.shutdown()
        assert our_uprobes(os.getpid()) == []
        after = answers()
        assert before == during == after
        assert len(sink.spans()) == len(reqs)
    finally:
        srv.stop()


# ---------------------------------------------------------------- process lifecycle


def test_lifecycle_started_after_exit_restart_and_selection() -> None:
    binary = fixture_binary("1.24")
    gc.collect()
    fds0 = open_fds()
    r, sink = start_receiver({"targets": [{"exe_path": str(binary)}], "program_linger": "2s"})
    try:
        # A target started after the collector, that then exits: traced, then cleaned up.
        srv = Server(binary)
        wait_for(lambda: srv.pid in r.processes, 30, "attach to a late starter")
        srv.request("GET", "/hello")
        wait_spans(sink, 1)
        srv.stop()
        wait_for(lambda: not r.processes and our_uprobes(os.getpid()) == [], 10, "detach after exit")
        assert len(r.binaries) == 1  # programs kept for program_linger, no uprobe attached
        wait_for(lambda: not r.binaries, 10, "programs released after program_linger")

        # Restarted 20 times: each instance is picked up, one span each, from the right pid; the
        # programs compiled for the first instance serve them all (restarts within program_linger).
        pids = []
        compiled = []
        for _ in range(20):
            srv = Server(binary)
            wait_for(lambda: srv.pid in r.processes, 30, "attach to a restarted process")  # noqa: B023
            srv.request("GET", "/hello")
            pids.append(srv.pid)
            compiled.append(id(r.binaries[next(iter(r.binaries))].programs[0].program))
            srv.stop()
        wait_spans(sink, 21)
        assert len(set(compiled)) == 1
        wait_for(lambda: not r.processes and not r.binaries, 10, "cleanup after restarts")
        got = [res["process.pid"] for res, _, _ in sink.spans()[1:]]
        assert sorted(got) == sorted(pids)
        assert our_uprobes(os.getpid()) == []
    finally:
        r.shutdown()
    gc.collect()
    assert open_fds() == fds0

    # Ten processes of one binary, a selector matching five by pid: spans only from those five.
    servers = [Server(binary) for _ in range(10)]
    chosen = [s.pid for s in servers[::2]]
    r, sink = start_receiver({"targets": [{"pid": chosen, "service_name": "chosen", "attributes": {"team": "a"}}],
                              "program_linger": "0s"})
    try:
        wait_for(lambda: set(r.processes) == set(chosen), 30, "attach to the five")
        assert len(r.binaries) == 1  # one program for the binary
        assert len(our_uprobes(os.getpid())) == 5 * 3
        for s in servers:
            s.request("GET", "/hello")
        spans = wait_spans(sink, 5)
        assert sorted(res["process.pid"] for res, _, _ in spans) == sorted(chosen)
        assert all(res["service.name"] == "chosen" and res["team"] == "a" for res, _, _ in spans)
        for s in servers:
            s.stop()
        wait_for(lambda: not r.processes and not r.binaries, 10, "cleanup of the five")
        assert our_uprobes(os.getpid()) == []
    finally:
        r.shutdown()
        for s in servers:
            s.stop()
    gc.collect()
    assert open_fds() == fds0


# ---------------------------------------------------------------- the real CLI


def test_cli_file_exporter(tmp_path: Path) -> None:
    import yaml
    binary = fixture_binary("1.26")
    out = tmp_path / "out.jsonl"
    cfg = {"receivers": {"ebpf_go": {"targets": [{"exe_path": str(binary), "service_name": "cli-shop"}],
                                     "discovery_interval": "200ms"}},
           "exporters": {"file": {"path": str(out)}},
           "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["file"]}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    srv = Server(binary)
    exe = Path(sys.executable).parent / "otelgo-collector"
    col = subprocess.Popen([str(exe), "--config", str(tmp_path / "config.yaml")], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 40
        got: list[Span] = []
        n = 0
        while time.monotonic() < deadline and len(got) < 3:
            srv.request("GET", f"/items/{n}")
            n += 1
            time.sleep(0.3)
            got = [s for doc in json_lines(out) for _, _, s in from_json_dict(doc).iter_spans()]
        assert len(got) >= 3, "no spans in the file exporter's output"
        assert all(s.name == "GET /items/{id}" for s in got)
    finally:
        col.terminate()
        try:
            log = col.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            col.kill()
            log = col.communicate()[0]
        srv.stop()
    assert col.returncode == 0, log[-3000:]
    assert our_uprobes(col.pid) == []


def _unused() -> Iterator[None]:  # keeps the import list honest for type checkers
    yield None
