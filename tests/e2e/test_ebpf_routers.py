"""echo, chi and gorilla/mux routes on net/http server spans, end to end: tests/fixtures/go/echoapp,
chiapp and muxapp (real services on the framework from the module proxy) traced by the ebpf_go
receiver in-process, over releases in which the template's field moved (echo's context.path: +16
before v4.12, +80 in v4.12, +88 from v4.13), Go 1.21-1.27, plain, stripped and PIE builds.

What a user checks: the span is named `{method} {route}` with the framework's own template in
`http.route` (parameters, wildcards, group prefixes, chi's nested and mounted routers joined as
chi's RoutePattern() joins them, mux sub-routers), a request that matches no route keeps the
method-only name and no `http.route` (also on a keep-alive connection right after a routed
request), and a 500 is an Error span. `inspect` names the framework and its version, and the point
it reads at. The probe points themselves differ by framework: after the assignment (chi), at the
write barrier's check between the two words (echo: the function returns right after them) and
before the pointer store (mux: the code after it is a join of other paths).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collector.spans import KIND_SERVER, STATUS_ERROR, STATUS_UNSET
from receiver.ebpf_go.gobinary import GoBinary
from receiver.ebpf_go.probes.routes import route_plans
from tests.e2e.test_ebpf_gin import request, statuses
from tests.e2e.test_ebpf_http_server import start_receiver, wait_spans
from tests.support.ci import needs_root
from tests.support.collector import run_cli, wait_for
from tests.support.gobuild import build_go_fixture
from tests.support.goserver import Server

pytestmark = [*needs_root(), pytest.mark.timeout(300)]

SCOPE = "otelgo-collector/net/http"
Case = tuple[str, str, int, str, "str | None"]   # method, path, status, span name, http.route

FRAMEWORKS: dict[str, dict[str, object]] = {
    "echo": {
        "fixture": "echoapp", "module": "github.com/labstack/echo/v4", "newest": "v4.16.5",
        "matrix": [("v4.11.4", "1.21", "plain"), ("v4.12.0", "1.22", "stripped"),
                   (None, "1.26", "stripped-pie")],
        "cases": [
            ("GET", "/users/42", 200, "GET /users/:id", "/users/:id"),
            ("POST", "/users", 201, "POST /users", "/users"),
            ("GET", "/static/css/site.css", 200, "GET /static/*", "/static/*"),
            ("GET", "/api/v1/users/7/orders", 200, "GET /api/v1/users/:uid/orders", "/api/v1/users/:uid/orders"),
            ("GET", "/fail", 500, "GET /fail", "/fail"),
            ("GET", "/nowhere", 404, "GET", None),
            ("GET", "/users/1", 200, "GET /users/:id", "/users/:id"),
            ("GET", "/nowhere/else", 404, "GET", None),
        ],
    },
    "chi": {
        "fixture": "chiapp", "module": "github.com/go-chi/chi/v5", "newest": "v5.5.0",
        "matrix": [("v5.0.12", "1.21", "plain"), ("v5.2.3", "1.22", "stripped"), (None, "1.27", "pie")],
        "cases": [
            ("GET", "/users/42", 200, "GET /users/{id}", "/users/{id}"),
            ("POST", "/users", 201, "POST /users", "/users"),
            ("GET", "/static/css/site.css", 200, "GET /static/*", "/static/*"),
            ("GET", "/api/v1/users/7/orders", 200, "GET /api/v1/users/{uid}/orders", "/api/v1/users/{uid}/orders"),
            ("GET", "/admin/stats", 200, "GET /admin/stats", "/admin/stats"),
            # the mount matched, the mounted router did not: chi's RoutePattern() is the mount's
            ("GET", "/admin/nope", 404, "GET /admin/*", "/admin/*"),
            ("GET", "/fail", 500, "GET /fail", "/fail"),
            ("GET", "/nowhere", 404, "GET", None),
            ("GET", "/users/1", 200, "GET /users/{id}", "/users/{id}"),
            ("GET", "/nowhere/else", 404, "GET", None),
        ],
    },
    "mux": {
        "fixture": "muxapp", "module": "github.com/gorilla/mux", "newest": "v1.8.1",
        "matrix": [("v1.7.4", "1.21", "stripped"), ("v1.8.0", "1.24", "pie"), (None, "1.27", "stripped-pie")],
        "cases": [
            ("GET", "/users/42", 200, "GET /users/{id}", "/users/{id}"),
            ("POST", "/users", 201, "POST /users", "/users"),
            ("GET", "/static/css/site.css", 200, "GET /static/", "/static/"),
            ("GET", "/api/v1/users/7/orders", 200, "GET /api/v1/users/{uid}/orders", "/api/v1/users/{uid}/orders"),
            ("GET", "/fail", 500, "GET /fail", "/fail"),
            ("GET", "/nowhere", 404, "GET", None),
            ("DELETE", "/users/3", 405, "DELETE", None),     # the path matched, no route did
            ("GET", "/users/1", 200, "GET /users/{id}", "/users/{id}"),
            ("GET", "/nowhere/else", 404, "GET", None),
        ],
    },
}
MATRIX = [(fw, mod, go, variant) for fw, spec in FRAMEWORKS.items()
          for mod, go, variant in spec["matrix"]]  # type: ignore[attr-defined]


def app(framework: str, version: str | None, go: str, variant: str) -> Path:
    spec = FRAMEWORKS[framework]
    mods = {str(spec["module"]): version} if version else None
    return build_go_fixture(str(spec["fixture"]), go, variant, modules=mods)


@pytest.mark.parametrize("framework,version,go,variant", MATRIX,
                         ids=[f"{f}{v or '-gomod'}-go{g}-{x}" for f, v, g, x in MATRIX])
def test_framework_routes(framework: str, version: str | None, go: str, variant: str) -> None:
    spec = FRAMEWORKS[framework]
    binary = app(framework, version, go, variant)
    [plan] = route_plans(GoBinary.open(binary))
    assert plan.addr and plan.source.framework == framework, plan
    assert plan.version == (version or spec["newest"]), plan
    cases: list[Case] = spec["cases"]  # type: ignore[assignment]
    srv = Server(binary)
    r, sink = start_receiver({"targets": [{"pid": srv.pid}]})
    try:
        wait_for(lambda: srv.pid in r.processes, 30, "attach")
        host = srv.addr
        for method, path, status, _n, _r in cases[:-2]:
            assert statuses(srv.raw(request(method, path, host))) == [status], (method, path)
        # keep-alive: the same connection's goroutine serves both; the second matches no route
        (m1, p1, s1, _, _), (m2, p2, s2, _, _) = cases[-2:]
        assert statuses(srv.raw(request(m1, p1, host, close=False) + request(m2, p2, host))) == [s1, s2]
        spans = [s for _, scope, s in wait_spans(sink, len(cases)) if scope == SCOPE]
        assert len(spans) == len(cases), [s.name for s in spans]
        spans.sort(key=lambda s: s.start_time_unix_nano)
        for s, (method, path, status, name, route) in zip(spans, cases, strict=True):
            a = s.attributes
            assert (s.name, s.kind, a.get("http.route"), a["http.request.method"], a["url.path"],
                    a["http.response.status_code"]) == (name, KIND_SERVER, route, method, path, status), a
            assert s.status_code == (STATUS_ERROR if status >= 500 else STATUS_UNSET)
    finally:
        r.shutdown()
        srv.stop()


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_inspect_names_the_framework_its_version_and_point(framework: str) -> None:
    spec = FRAMEWORKS[framework]
    binary = app(framework, None, "1.26", "stripped")
    [plan] = route_plans(GoBinary.open(binary))
    out = run_cli("inspect", str(binary))
    assert out.returncode == 0, out.stderr
    line = f"routes: {framework} {spec['newest']}: read at {plan.addr:#x}: "
    assert line in out.stdout, out.stdout
    rep = json.loads(run_cli("inspect", str(binary), "--json").stdout)
    (srv,) = [i for i in rep["instrumentations"] if i["probe"] == "net_http_server"]
    assert srv["routes"] == [{"framework": framework, "module": spec["module"], "version": spec["newest"],
                              "attach": True, "addr": plan.addr, "reason": plan.reason}]
