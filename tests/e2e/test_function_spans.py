"""Function spans (receivers::ebpf_go::functions) through `otelgo-collector --config`, on the real
funcapp fixture (tests/fixtures/go/funcapp), plain and stripped PIE: the exact INTERNAL spans with
their names, attributes and parents (under the request's server span, above the HTTP client span
they make), generic instances, recursion past the depth bound, a panic, a goroutine that outlives
its request, min_duration and the rate limit in BPF with their self-metrics, the one-line warnings
for functions that cannot be traced, the program's answers unchanged, and nothing left in it after
the collector stops."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.spans import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER, STATUS_ERROR, STATUS_UNSET, Span
from receiver.ebpf_go.gobinary import GoBinary
from receiver.ebpf_go.probes.functions import PROBE, Options, expand
from receiver.ebpf_go.probes.spec import Build
from tests.e2e.test_ebpf_database_sql import _read_spans, metric_values, wait_instrumented
from tests.support.collector import CollectorProcess
from tests.support.gobuild import build_go_fixture
from tests.support.held import uprobes_held

GO_VERSION = "1.24"
needs_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason="needs root and eBPF")
SCOPE = "otelgo-collector/function"

FUNCTIONS: list[dict[str, Any]] = [
    {"symbol": "main.lookupItem"},
    {"symbol": "example.com/funcapp/store.(*Store).*", "attributes": {"component": "store"}},
    {"symbol": "main.Max"},
    {"symbol": "main.down"},
    {"symbol": "main.mustPositive"},
    {"symbol": "main.background"},
    {"symbol": "main.sleepFor", "min_duration": "2ms"},
    {"symbol": "main.tick", "max_spans_per_second": 10},
    {"symbol": "main.viaValue"},
    {"symbol": "main.tiny"},
    {"symbol": "main.nope"},
    {"symbol": "runtime.mallocgc"},
]


class Downstream(http.server.BaseHTTPRequestHandler):
    """What store.(*Store).Get fetches: 200 and the path back (not traced: Python)."""

    def do_GET(self) -> None:   # noqa: N802
        body = f"item at {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def downstream() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Downstream)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


class FuncApp:
    def __init__(self, binary: Path, downstream: str) -> None:
        self.proc = subprocess.Popen([str(binary), "-downstream", downstream], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        assert line.startswith("listening "), line
        self.addr, self.pid = line.split()[1], self.proc.pid

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://{self.addr}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


# (path, status, body) of every request, in order: what funcapp answers, traced or not
REQUESTS = [("/item?id=7", 200, "item at /item/7"), ("/max?n=9&s=z", 200, "9 z"), ("/deep?n=20", 200, "20"),
            ("/panic", 500, "negative: -1\n"), ("/async", 200, "started"), ("/sleep?ms=0", 200, "slept"),
            ("/sleep?ms=5", 200, "slept"), ("/loop?n=50", 200, "50"), ("/indirect", 200, "42"),
            ("/tiny", 200, "6")]
SERVER_SPANS = len(REQUESTS)
# item: lookupItem, Get, Put (+ a client span); max: 2; deep: 16 of 21; panic 1; async 1; sleep 1 of 2;
# loop 10 of 50; indirect 1
FUNCTION_SPANS = 3 + 2 + 16 + 1 + 1 + 1 + 10 + 1


def _config(out: Path, binary: Path, pid: int) -> dict[str, Any]:
    return {
        "receivers": {"ebpf_go": {"targets": [{"exe_path": str(binary), "pid": [pid]}], "functions": FUNCTIONS,
                                  "bpf_cache_dir": ""}},
        "exporters": {"file": {"path": str(out), "flush_interval": "50ms"}},
        "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["file"]}}},
    }


def _children(spans: list[Span], parent: Span) -> list[Span]:
    return sorted((s for s in spans if s.parent_span_id == parent.span_id), key=lambda s: s.start_time_unix_nano)


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("variant", ["plain", "stripped-pie"])
def test_function_spans(variant: str, downstream: str, tmp_path: Path) -> None:
    binary = build_go_fixture("funcapp", GO_VERSION, variant)
    app = FuncApp(binary, downstream)
    out = tmp_path / "spans.jsonl"
    col = CollectorProcess(_config(out, binary, app.pid), tmp_path)
    try:
        wait_instrumented(col, app.pid, ("net_http_server", "functions", "net_http_client"))
        answers = [(p, *app.get(p)) for p, _, _ in REQUESTS]
        time.sleep(0.3)                      # /async's goroutine ends 150 ms after its request
        deadline = time.monotonic() + 20
        while len(_read_spans(out)) < SERVER_SPANS + FUNCTION_SPANS + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.2)                      # any span beyond (there must be none); the counters' next read
        metrics = metric_values(col.scrape())
        assert uprobes_held(col.proc.pid), "the collector holds no uprobe while tracing"
    finally:
        code = col.stop()
    try:
        assert answers == REQUESTS, "funcapp answered differently while traced"
        log = col.log()
        assert code == 0, log[-3000:]
        assert "function main.tiny: not traced: inlined into every caller" in log
        assert "function main.nope: not traced: no such function in the binary" in log
        assert "function runtime.mallocgc: not traced: the Go runtime and its internals are not traced" in log
        # nothing left in the program: every probed instruction is its own byte again
        gb = GoBinary.open(binary)
        build = Build("", 16, 1, options={"functions": PROBE.options_from(_receiver_config())})
        for addr, _fn in PROBE.extra_points(gb, build):
            with open(f"/proc/{app.pid}/mem", "rb") as mem:
                mem.seek(addr + (_load_bias(app.pid, gb) if gb.is_pie else 0))
                assert mem.read(1) != b"\xcc", hex(addr)
    finally:
        app.stop()

    got = [(scope, sp) for _res, scope, sp in _read_spans(out)]
    spans = [sp for _, sp in got]
    by_path: dict[str, list[Span]] = {}
    for sp in sorted((sp for sp in spans if sp.kind == KIND_SERVER), key=lambda s: s.start_time_unix_nano):
        by_path.setdefault(str(sp.attributes["url.path"]), []).append(sp)
    functions = [sp for scope, sp in got if scope == SCOPE]
    assert sum(len(v) for v in by_path.values()) == SERVER_SPANS
    assert len(functions) == FUNCTION_SPANS, sorted(s.name for s in functions)
    assert len(spans) == SERVER_SPANS + FUNCTION_SPANS + 1      # + the client span of /item
    assert all(s.kind == KIND_INTERNAL for s in functions)
    server = {p: v[0] for p, v in by_path.items()}
    server["/sleep0"], server["/sleep1"] = by_path["/sleep"]

    def only(parent: Span, name: str) -> Span:
        (s,) = [c for c in _children(spans, parent) if c.name == name]
        assert s.trace_id == parent.trace_id
        assert parent.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano
        return s

    # /item: server -> lookupItem -> (*Store).Get -> HTTP client; lookupItem -> (*Store).Put
    item = server["/item"]
    lookup = only(item, "main.lookupItem")
    assert lookup.attributes == {"code.function.name": "main.lookupItem"} and lookup.status_code == STATUS_UNSET
    get = only(lookup, "store.(*Store).Get")
    put = only(lookup, "store.(*Store).Put")
    assert get.attributes == {"code.function.name": "example.com/funcapp/store.(*Store).Get", "component": "store"}
    assert put.attributes == {"code.function.name": "example.com/funcapp/store.(*Store).Put", "component": "store"}
    assert get.end_time_unix_nano <= put.start_time_unix_nano
    assert lookup.end_time_unix_nano <= item.end_time_unix_nano
    (client,) = _children(spans, get)
    assert client.kind == KIND_CLIENT and client.attributes["http.response.status_code"] == 200
    assert get.start_time_unix_nano <= client.start_time_unix_nano <= client.end_time_unix_nano <= get.end_time_unix_nano

    # /max: two instances of one generic function, named as Go prints them
    maxes = _children(spans, server["/max"])
    assert [m.name for m in maxes] == ["main.Max[...]", "main.Max[...]"]
    assert all(m.attributes == {"code.function.name": "main.Max[...]"} for m in maxes)

    # /deep: 16 nested calls traced (the depth bound), each the parent of the next
    chain, parent = [], server["/deep"]
    while True:
        kids = [c for c in _children(spans, parent) if c.name == "main.down"]
        if not kids:
            break
        (parent,) = kids
        chain.append(parent)
    assert len(chain) == 16
    assert all(a.start_time_unix_nano <= b.start_time_unix_nano and b.end_time_unix_nano <= a.end_time_unix_nano
               for a, b in zip(chain, chain[1:], strict=False))

    # /panic: the function's span ends with Error; the server answered 500
    boom = only(server["/panic"], "main.mustPositive")
    assert boom.status_code == STATUS_ERROR and boom.status_message == "panic"

    # /async: a goroutine started in the request, its span outlives the server span
    bg = only(server["/async"], "main.background")
    assert bg.end_time_unix_nano > server["/async"].end_time_unix_nano
    assert bg.end_time_unix_nano - bg.start_time_unix_nano >= 150_000_000

    # min_duration 2ms: the 0 ms call dropped in BPF, the 5 ms one kept
    assert _children(spans, server["/sleep0"]) == []
    slept = only(server["/sleep1"], "main.sleepFor")
    assert slept.end_time_unix_nano - slept.start_time_unix_nano >= 5_000_000

    # max_spans_per_second 10: 10 spans of 50 calls
    assert [t.name for t in _children(spans, server["/loop"])] == ["main.tick"] * 10
    only(server["/indirect"], "main.viaValue")
    assert _children(spans, server["/tiny"]) == []

    def m(name: str, function: str, **labels: str) -> float:
        return metrics.get((name, tuple(sorted({"function": function, **labels}.items()))), 0.0)

    assert m("otelgo_ebpf_function_calls_total", "main.tick") == 50
    assert m("otelgo_ebpf_function_spans_total", "main.tick") == 10
    assert m("otelgo_ebpf_function_spans_dropped_total", "main.tick", reason="rate_limit") == 40
    assert m("otelgo_ebpf_function_calls_total", "main.down") == 21
    assert m("otelgo_ebpf_function_spans_dropped_total", "main.down", reason="depth") == 5
    assert m("otelgo_ebpf_function_spans_dropped_total", "main.sleepFor", reason="min_duration") == 1
    assert m("otelgo_ebpf_function_spans_total", "main.Max[...]") == 2


def _receiver_config() -> Any:
    from receiver.ebpf_go.config import EbpfGoConfig
    return EbpfGoConfig.model_validate({"functions": FUNCTIONS})


def _load_bias(pid: int, gb: GoBinary) -> int:
    from receiver.ebpf_go.gobinary.itabs import load_bias
    return load_bias(pid, gb)


def test_expansion_of_the_config(tmp_path: Path) -> None:
    """What `functions:` names in funcapp: globs over a package's methods (closures and defer wrappers
    left out), both instances of a generic function, and a reason for each function left out."""
    gb = GoBinary.open(build_go_fixture("funcapp", GO_VERSION, "stripped-pie"))
    ex = expand(gb, PROBE.options_from(_receiver_config()))
    assert [t.name for t in ex.targets] == [
        "main.lookupItem", "store.(*Store).Get", "store.(*Store).Put", "main.Max[...]", "main.Max[...]",
        "main.down", "main.mustPositive", "main.background", "main.sleepFor", "main.tick", "main.viaValue"]
    assert dict(ex.skipped) == {
        "main.tiny": "inlined into every caller: no call of it is left to probe (mark it //go:noinline)",
        "main.nope": "no such function in the binary",
        "runtime.mallocgc": "the Go runtime and its internals are not traced"}
    capped = expand(gb, Options(PROBE.options_from(_receiver_config()).functions, max_functions=3))
    assert len(capped.targets) == 3
    assert [t.name for t in capped.targets] == ["main.lookupItem", "store.(*Store).Get", "store.(*Store).Put"]
    assert ("main.Max[go.shape.int]", "beyond max_functions (3)") in capped.skipped


def test_inspect_functions_shows_the_receivers_points() -> None:
    """`inspect --functions`: each function's span name and points, the very points the receiver
    attaches for that config; what is not traced, with the reason."""
    import json

    from tests.support.collector import run_cli
    binary = build_go_fixture("funcapp", GO_VERSION, "stripped-pie")
    p = run_cli("inspect", str(binary), "--functions", "main.step", "--functions", "main.tick",
                "--functions", "main.tiny")
    assert p.returncode == 0, p.stderr
    assert '[x] main.step' in p.stdout and "starts at its 1 call(s); ends after its 1 call(s)" in p.stdout
    assert "ends at its 1 RET(s) (single-stepped: a branch at" in p.stdout
    assert "[ ] main.tiny: inlined into every caller" in p.stdout
    rep = json.loads(run_cli("inspect", str(binary), "--json", "--functions", "main.step",
                             "--functions", "main.tick").stdout)
    shown = [(pt["addr"], pt["program"]) for t in rep["function_spans"]["traced"] for pt in t["points"]]
    gb = GoBinary.open(binary)
    from receiver.ebpf_go.probes.functions import FunctionSpec
    build = Build("", 16, 1, options={"functions": Options((FunctionSpec("main.step"), FunctionSpec("main.tick")))})
    assert shown == PROBE.extra_points(gb, build)
    assert [t["emulated"] for t in rep["function_spans"]["traced"]] == [True, False]
    (fs,) = [i for i in rep["instrumentations"] if i["probe"] == "functions"]
    assert fs["applies"]
    plain = json.loads(run_cli("inspect", str(binary), "--json").stdout)
    (fs,) = [i for i in plain["instrumentations"] if i["probe"] == "functions"]
    assert not fs["applies"] and "receivers::ebpf_go::functions" in fs["reason"]


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("fixture,version", [("dbapp", "1.24"), ("grpcapp", "system")])
@pytest.mark.parametrize("sampler", [None, {"type": "parentbased_traceidratio", "ratio": 0.05}],
                         ids=["no-sampler", "sampler"])
def test_every_probe_loads_with_goroutine_spans(fixture: str, version: str, sampler: dict[str, Any] | None) -> None:
    """A binary with function spans: the servers write g_spans, the HTTP and gRPC clients and
    database/sql look there first. Every probe's program of such a binary compiles with that (and
    with head sampling, whose unsampled spans write no record) and every one of its functions
    passes the kernel's verifier."""
    import dataclasses
    import shutil

    from receiver.ebpf_go import preflight
    from receiver.ebpf_go.bpfprogram import load_program
    from receiver.ebpf_go.images import ImageStore
    from receiver.ebpf_go.probes import PROBES
    from receiver.ebpf_go.sampler import SamplerConfig, sampler_flags
    from tests.support.bpffs import make_pin_dir

    gb = GoBinary.open(build_go_fixture(fixture, version))
    wanted = [p for p in PROBES if p.present(gb)]
    assert {"net_http_server", "database_sql"} <= {p.name for p in wanted} if fixture == "dbapp" else \
        {"grpc_server", "grpc_client"} <= {p.name for p in wanted}
    pin = make_pin_dir(f"otelgo-test-gspans-{os.getpid()}")
    store = ImageStore(None)
    try:
        ksrc = preflight.find_kernel_headers("auto")[0]
        for pr in wanted:
            build = dataclasses.replace(Build(pin, 1024, 16), g_spans=True, ctx_readers=True,
                                        sampler=tuple(sampler_flags(SamplerConfig.model_validate(sampler)
                                                                    if sampler else None)))
            flags = pr.cflags(gb, build)
            assert "-DG_SPANS=1" in flags and ("-DSAMPLER=1" in flags) == bool(sampler)
            prog = load_program(store.submit(pr.source, flags, ksrc).result(), pin)
            try:
                for fn in prog.bpf.image.functions:
                    prog.bpf.load_func(fn)
                assert {"g_spans", "unsampled"} <= set(prog.bpf.maps), pr.name
            finally:
                prog.bpf.close()
    finally:
        store.close()
        shutil.rmtree(pin, ignore_errors=True)
