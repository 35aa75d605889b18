"""gin routes on net/http server spans, end to end: tests/fixtures/go/ginapp (a real gin service from
the module proxy) traced by the ebpf_go receiver in-process, over gin releases v1.7 to the newest,
Go 1.21-1.27, plain, stripped and PIE builds.

What a user checks: the span is named `{method} {route}` with gin's own template in `http.route`
(parameters, wildcards, group prefixes), a request that matches no route keeps the method-only name
and no `http.route` (also on a keep-alive connection right after a routed request), over HTTP/1.1
and HTTP/2 (h2c, Go >= 1.24), AbortWithStatus(500)
is an Error span, an internal redirect carries the route that served, and a client call from a
handler is the child of the gin span. Where the route cannot be read (Go 1.19's write barrier
branches out of the assignment), the plain net/http spans come out unchanged and the reason
is logged once.
"""

from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path

import pytest

from collector.spans import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, STATUS_UNSET, Span
from receiver.ebpf_go.gobinary import GoBinary
from receiver.ebpf_go.probes.routes import route_plans
from tests.e2e.test_ebpf_http_server import start_receiver, wait_spans
from tests.support.ci import needs_root
from tests.support.collector import wait_for
from tests.support.gobuild import build_go_fixture
from tests.support.goserver import Server

pytestmark = [*needs_root(), pytest.mark.timeout(300)]

GIN = "github.com/gin-gonic/gin"
SCOPE = "otelgo-collector/net/http"
# (gin version or None for the fixture's go.mod, Go, build)
MATRIX = [("v1.7.7", "1.21", "plain"), ("v1.9.1", "1.22", "stripped"), ("v1.10.1", "1.24", "pie"),
          ("v1.11.0", "1.25", "stripped-pie"), (None, "1.26", "stripped"), (None, "1.27", "plain")]


def ginapp(gin: str | None, go: str, variant: str) -> Path:
    return build_go_fixture("ginapp", go, variant, modules={GIN: gin} if gin else None)


def request(method: str, path: str, host: str, close: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "User-Agent: e2e-client/1.0"]
    if method == "POST":
        lines.append("Content-Length: 0")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def statuses(resp: bytes) -> list[int]:
    """The status of each response in `resp` (bodies carry no CRLF at their end: found anywhere)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", resp)]


# (method, path, status, span name, http.route); the last two go over one keep-alive connection
CASES: list[tuple[str, str, int, str, str | None]] = [
    ("GET", "/items/42", 200, "GET /items/:id", "/items/:id"),
    ("POST", "/items", 201, "POST /items", "/items"),
    ("GET", "/static/css/site.css", 200, "GET /static/*filepath", "/static/*filepath"),
    ("GET", "/api/v1/users/7/orders", 200, "GET /api/v1/users/:uid/orders", "/api/v1/users/:uid/orders"),
    ("GET", "/abort", 500, "GET /abort", "/abort"),
    ("GET", "/nowhere", 404, "GET", None),
    ("GET", "/redirect", 200, "GET /items/:id", "/items/:id"),
    ("GET", "/items/1", 200, "GET /items/:id", "/items/:id"),
    ("DELETE", "/items/1", 404, "DELETE", None),
]


# over HTTP/2 without TLS (the fixture built with Go >= 1.24): (path, status, name, route)
H2C_CASES: list[tuple[str, int, str, str | None]] = [
    ("/items/5", 200, "GET /items/:id", "/items/:id"),
    ("/nowhere", 404, "GET", None),
    ("/api/v1/users/3/orders", 200, "GET /api/v1/users/:uid/orders", "/api/v1/users/:uid/orders"),
]


def h2c(addr: str, paths: list[str]) -> list[str]:
    """HTTP/2 with prior knowledge, one curl (and connection) per path, in turn: `<http_version> <code>`
    each (curl 7.88 gets an empty reply on a reused prior-knowledge connection, with or without us)."""
    out = []
    for p in paths:
        args = ["curl", "-s", "--http2-prior-knowledge", "--max-time", "20", "-o", "/dev/null",
                "-w", "%{http_version} %{http_code}", f"http://{addr}{p}"]
        out.append(subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip())
    return out


@pytest.mark.parametrize("gin,go,variant", MATRIX, ids=[f"gin{g or '-gomod'}-go{v}-{x}" for g, v, x in MATRIX])
def test_gin_routes(gin: str | None, go: str, variant: str) -> None:
    binary = ginapp(gin, go, variant)
    [plan] = route_plans(GoBinary.open(binary))
    assert plan.addr and plan.version == (gin or "v1.12.0"), plan
    srv = Server(binary)
    with_h2c = tuple(int(x) for x in go.split(".")) >= (1, 24)
    r, sink = start_receiver({"targets": [{"pid": srv.pid}]})
    try:
        wait_for(lambda: srv.pid in r.processes, 30, "attach")
        host = srv.addr
        for method, path, status, _n, _r in CASES[:-2]:
            assert statuses(srv.raw(request(method, path, host))) == [status], (method, path)
        # keep-alive: the same connection's goroutine serves both; the second matches no route
        (m1, p1, s1, _, _), (m2, p2, s2, _, _) = CASES[-2:]
        assert statuses(srv.raw(request(m1, p1, host, close=False) + request(m2, p2, host))) == [s1, s2]
        n = len(CASES)
        if with_h2c:   # the handler runs on the HTTP/2 server's handler goroutine: the same keying
            assert h2c(host, [p for p, *_ in H2C_CASES]) == [f"2 {st}" for _, st, _, _ in H2C_CASES]
            n += len(H2C_CASES)
        spans = [s for _, scope, s in wait_spans(sink, n) if scope == SCOPE]
        assert len(spans) == n, [s.name for s in spans]
        spans.sort(key=lambda s: s.start_time_unix_nano)
        for s, (method, path, status, name, route) in zip(spans, CASES, strict=False):
            a = s.attributes
            assert (s.name, s.kind, a.get("http.route"), a["http.request.method"], a["http.response.status_code"]) \
                == (name, KIND_SERVER, route, method, status), (method, path, a)
            assert s.status_code == (STATUS_ERROR if status >= 500 else STATUS_UNSET)
            assert a["url.path"] == ("/items/7" if path == "/redirect" else path)  # the redirect rewrote it
            assert a["network.protocol.version"] == "1.1"
        for s, (path, status, name, route) in zip(spans[len(CASES):], H2C_CASES if with_h2c else [], strict=True):
            a = s.attributes
            assert (s.name, a.get("http.route"), a["url.path"], a["http.response.status_code"],
                    a["network.protocol.version"]) == (name, route, path, status, "2"), a
    finally:
        r.shutdown()
        srv.stop()


def test_gin_client_call_is_the_child_of_the_route_span() -> None:
    binary = ginapp(None, "system", "plain")
    srv = Server(binary)
    r, sink = start_receiver({"targets": [{"pid": srv.pid}]})
    try:
        wait_for(lambda: srv.pid in r.processes, 30, "attach")
        resp = srv.raw(request("GET", f"/call?url=http://{srv.addr}/items/9", srv.addr))
        assert statuses(resp) == [200] and resp.endswith(b"item 9"), resp
        spans = [s for _, _, s in wait_spans(sink, 3)]
        assert len(spans) == 3, [s.name for s in spans]
        by_name: dict[str, list[Span]] = {}
        for s in spans:
            by_name.setdefault(s.name, []).append(s)
        [outer], [client], [inner] = by_name["GET /call"], by_name["GET"], by_name["GET /items/:id"]
        assert (outer.kind, client.kind, inner.kind) == (KIND_SERVER, KIND_CLIENT, KIND_SERVER)
        assert outer.attributes["http.route"] == "/call" and inner.attributes["http.route"] == "/items/:id"
        assert client.parent_span_id == outer.span_id and client.trace_id == outer.trace_id
        assert inner.parent_span_id == client.span_id and inner.trace_id == outer.trace_id
    finally:
        r.shutdown()
        srv.stop()


def test_route_not_placeable_keeps_plain_spans_and_says_why_once(caplog: pytest.LogCaptureFixture) -> None:
    """Go 1.19 puts the write barrier of a pointer store out of line: the assignment of
    gin.Context.fullPath branches away before its pointer word is stored (the barrier stores it
    there), so no point after it runs on every path. The net/http spans stay as they were."""
    binary = ginapp("v1.7.7", "1.19", "plain")
    [plan] = route_plans(GoBinary.open(binary))
    assert plan.addr == 0 and "leaves the assignment" in plan.reason, plan
    srv, srv2 = Server(binary), Server(binary)   # two processes of one binary: said once
    caplog.set_level(logging.INFO)
    r, sink = start_receiver({"targets": [{"pid": [srv.pid, srv2.pid]}]})
    try:
        wait_for(lambda: srv.pid in r.processes and srv2.pid in r.processes, 30, "attach")
        for path in ("/items/1", "/items/2", "/nowhere"):
            srv.raw(request("GET", path, srv.addr))
        srv2.raw(request("GET", "/items/3", srv2.addr))
        spans = [s for _, _, s in wait_spans(sink, 4)]
        assert sorted((s.name, s.attributes.get("http.route"), s.attributes["http.response.status_code"])
                      for s in spans) == [("GET", None, 200)] * 3 + [("GET", None, 404)]
    finally:
        r.shutdown()
        srv.stop()
        srv2.stop()
    said = [m for m in caplog.messages if "gin v1.7.7 found, its routes are not read" in m]
    assert len(said) == 1, said
