"""Our tail_sampling processor against contrib's (v0.161.0, built into tests/fixtures/otelcol), the
same spans in the same order into both, one pipeline per policy case, and the same spans out.

Both collectors run the same config: two OTLP/gRPC receivers, and per case a pipeline
`[otlp, otlp/2] -> tail_sampling/<case> -> file/<case>`. The spans of each trace are spread over
requests and receivers, and their arrival spans each phase of a trace's life:
  A  every trace's first part (resource `svc-a`, receiver otlp), then its second part (resource
     `svc-b`, receiver otlp/2), one request per part, all within decision_wait;
  B  after the decisions, one late span per trace: it follows its trace's decision (through the
     decision caches in the `cache` case, through the decided trace in memory elsewhere; in the
     `num_traces` case most traces were evicted and their late spans start traces of their own);
  C  fresh traces, then both collectors are stopped at once: the pending traces are decided and
     written at shutdown (and dropped where drop_pending_traces_on_shutdown).
What is compared per case: the (trace id, span id) pairs each file exporter wrote. The cases are
chosen to be deterministic in contrib (no rate limit reached, no eviction order within a request).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from collector.spans import (
    KIND_CLIENT,
    KIND_SERVER,
    Resource,
    ResourceSpans,
    Scope,
    ScopeSpans,
    Span,
    SpanBatch,
    to_proto,
)
from tests.support.collector import CollectorProcess, free_port, json_lines
from tests.support.otelcol import RealCollector, build_otelcol

pytestmark = pytest.mark.timeout(900)

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
DECISION_WAIT = "4s"
ROUTES = ["/items/:id", "/cart", "/health", "/admin/users", "/admin/audit"]
VENDORS = ["", "vendor=abc", "vendor=xyz,other=1", "vendor=abc,other=2", "BAD KEY=1"]


def _string(key: str, values: list[str], **kw: Any) -> dict[str, Any]:
    return {"type": "string_attribute", "string_attribute": {"key": key, "values": values, **kw}}


CASES: dict[str, dict[str, Any]] = {
    "always": {"policies": [{"name": "all", "type": "always_sample"}]},
    "latency": {"policies": [{"name": "slow", "type": "latency", "latency": {"threshold_ms": 150}}]},
    "latency_band": {"policies": [{"name": "band", "type": "latency",
                                   "latency": {"threshold_ms": 60, "upper_threshold_ms": 200}}]},
    "status": {"policies": [{"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}]},
    "status_ok": {"policies": [{"name": "ok", "type": "status_code", "status_code": {"status_codes": ["OK"]}}]},
    "probabilistic": {"policies": [{"name": "p30", "type": "probabilistic",
                                    "probabilistic": {"sampling_percentage": 30}}]},
    "probabilistic_salt": {"policies": [{"name": "p12", "type": "probabilistic",
                                         "probabilistic": {"hash_salt": "otelgo", "sampling_percentage": 12.5}}]},
    "string": {"policies": [{"name": "routes", **_string("http.route", ["/items/:id", "/cart"])}]},
    "string_regex": {"policies": [{"name": "admin", **_string("http.route", ["^/admin/a", "alth$"],
                                                              enabled_regex_matching=True)}]},
    "string_invert": {"policies": [{"name": "not-health", **_string("http.route", ["/health"], invert_match=True)}]},
    "string_resource": {"policies": [{"name": "prod", **_string("deployment.environment", ["prod"])}]},
    "numeric": {"policies": [{"name": "4xx", "type": "numeric_attribute", "numeric_attribute": {
        "key": "http.response.status_code", "min_value": 400, "max_value": 499}}]},
    "numeric_min": {"policies": [{"name": "5xx", "type": "numeric_attribute", "numeric_attribute": {
        "key": "http.response.status_code", "min_value": 500}}]},
    "numeric_invert": {"policies": [{"name": "not-2xx", "type": "numeric_attribute", "numeric_attribute": {
        "key": "http.response.status_code", "min_value": 200, "max_value": 299, "invert_match": True}}]},
    "boolean": {"policies": [{"name": "hit", "type": "boolean_attribute",
                              "boolean_attribute": {"key": "cache.hit", "value": True}}]},
    "boolean_invert": {"policies": [{"name": "no-hit", "type": "boolean_attribute",
                                     "boolean_attribute": {"key": "cache.hit", "value": True, "invert_match": True}}]},
    "span_count": {"policies": [{"name": "big", "type": "span_count", "span_count": {"min_spans": 5}}]},
    "span_count_band": {"policies": [{"name": "mid", "type": "span_count",
                                      "span_count": {"min_spans": 3, "max_spans": 4}}]},
    "trace_state": {"policies": [{"name": "abc", "type": "trace_state",
                                  "trace_state": {"key": "vendor", "values": ["abc"]}}]},
    "and": {"policies": [{"name": "item-errors", "type": "and", "and": {"and_sub_policy": [
        {"name": "e", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
        {"name": "r", **_string("http.route", ["/items/:id"])}]}}]},
    "and_not": {"policies": [{"name": "slow-not-health", "type": "and", "and": {"and_sub_policy": [
        {"name": "n", "type": "not", "not": {"not_sub_policy": {"name": "h", **_string("http.route", ["/health"])}}},
        {"name": "s", "type": "latency", "latency": {"threshold_ms": 100}}]}}]},
    "drop": {"policies": [
        {"name": "all", "type": "always_sample"},
        {"name": "no-health", "type": "drop", "drop": {"drop_sub_policy": [{"name": "h", **_string("http.route", ["/health"])}]}}]},
    "ottl": {"policies": [{"name": "ottl", "type": "ottl_condition", "ottl_condition": {"span": [
        'attributes["http.route"] == "/cart"', 'name == "db.query" and status.code == STATUS_CODE_ERROR']}}]},
    "composite": {"policies": [{"name": "comp", "type": "composite", "composite": {
        "max_total_spans_per_second": 1000000, "policy_order": ["errors", "some"],
        "composite_sub_policy": [
            {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
            {"name": "some", "type": "probabilistic", "probabilistic": {"sampling_percentage": 20}}],
        "rate_allocation": [{"policy": "errors", "percent": 50}, {"policy": "some", "percent": 50}]}}]},
    "several": {"policies": [
        {"name": "p10", "type": "probabilistic", "probabilistic": {"sampling_percentage": 10}},
        {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}]},
    "rate_limiting": {"policies": [{"name": "rated-errors", "type": "and", "and": {"and_sub_policy": [
        {"name": "e", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
        {"name": "rate", "type": "rate_limiting", "rate_limiting": {"spans_per_second": 1000000}}]}}]},
    "first_match": {"sample_on_first_match": True, "policies": [
        {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
        {"name": "p25", "type": "probabilistic", "probabilistic": {"sampling_percentage": 25}}]},
    "cache": {"decision_cache": {"sampled_cache_size": 10000, "non_sampled_cache_size": 10000},
              "policies": [{"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}]},
    "num_traces": {"num_traces": 50, "policies": [{"name": "all", "type": "always_sample"}]},
    "drop_pending": {"drop_pending_traces_on_shutdown": True,
                     "policies": [{"name": "all", "type": "always_sample"}]},
}


def _span(rng: random.Random, tid: bytes, parent: bytes, start: int, name: str, route: str) -> Span:
    dur = rng.choice([5, 40, 80, 120, 180, 260, 400]) * 1_000_000
    attrs: dict[str, Any] = {"http.route": route if rng.random() < 0.8 else rng.choice(ROUTES)}
    if rng.random() < 0.7:
        attrs["http.response.status_code"] = rng.choice([200, 200, 204, 404, 429, 500, 503])
    if rng.random() < 0.1:
        attrs["http.response.status_code"] = "500"          # a string: a numeric policy reads 0
    if rng.random() < 0.5:
        attrs["cache.hit"] = rng.random() < 0.5
    return Span(tid, rng.randbytes(8), name, parent_span_id=parent, kind=rng.choice([KIND_SERVER, KIND_CLIENT]),
                start_time_unix_nano=start, end_time_unix_nano=start + dur, attributes=attrs,
                status_code=rng.choice([0, 0, 1, 2]), trace_state=rng.choice(VENDORS))


def make_traces(rng: random.Random, n: int) -> list[list[Span]]:
    traces = []
    base = 1_700_000_000_000_000_000
    for _ in range(n):
        tid = rng.randbytes(16)
        route = rng.choice(ROUTES)
        root = _span(rng, tid, b"", base + rng.randrange(10**9), f"GET {route}", route)
        spans = [root]
        for _ in range(rng.randrange(0, 6)):
            spans.append(_span(rng, tid, root.span_id, root.start_time_unix_nano + rng.randrange(50_000_000),
                               rng.choice(["db.query", "GET", "cache.get"]), route))
        traces.append(spans)
    return traces


def _request(spans: list[Span], service: str, env: str) -> bytes:
    batch = SpanBatch([ResourceSpans(Resource({"service.name": service, "deployment.environment": env}),
                                     [ScopeSpans(Scope("otelgo-test"), spans)])])
    return bytes(to_proto(batch).SerializeToString())


def _config(ports: tuple[int, int], out_dir: Path, real_http: int | None) -> dict[str, Any]:
    grpc_a: dict[str, Any] = {"grpc": {"endpoint": f"127.0.0.1:{ports[0]}"}}
    if real_http:
        grpc_a["http"] = {"endpoint": f"127.0.0.1:{real_http}"}
    procs = {f"tail_sampling/{c}": {"decision_wait": DECISION_WAIT, **cfg} for c, cfg in CASES.items()}
    exps = {f"file/{c}": {"path": str(out_dir / f"{c}.jsonl"), "flush_interval": "100ms"} for c in CASES}
    return {
        "receivers": {"otlp": {"protocols": grpc_a}, "otlp/2": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{ports[1]}"}}}},
        "processors": procs, "exporters": exps,
        "service": {"pipelines": {f"traces/{c}": {"receivers": ["otlp", "otlp/2"], "processors": [f"tail_sampling/{c}"],
                                                  "exporters": [f"file/{c}"]} for c in CASES}},
    }


def _written(path: Path) -> set[tuple[str, str]]:
    out = set()
    for doc in json_lines(path) if path.exists() else []:
        for rs in doc.get("resourceSpans", []):
            for ss in rs.get("scopeSpans", []):
                for sp in ss.get("spans", []):
                    out.add((sp["traceId"], sp["spanId"]))
    return out


def test_tail_sampling_keeps_what_contribs_keeps(tmp_path: Path) -> None:
    build_otelcol()
    rng = random.Random(20)
    traces = make_traces(rng, 240)
    fresh = make_traces(rng, 40)
    late = [[_span(rng, t[0].trace_id, t[0].span_id, t[0].start_time_unix_nano + 1_000_000, "late", "/cart")]
            for t in traces]
    ours_dir, real_dir = tmp_path / "ours", tmp_path / "real"
    ours_dir.mkdir()
    real_dir.mkdir()
    ours_ports = (free_port(), free_port())
    real = RealCollector(real_dir)
    real_ports = (real.grpc_port, free_port())
    real_cfg = _config(real_ports, real_dir, real.http_port)
    real_cfg["service"]["telemetry"] = {"metrics": {"level": "none"}}
    real.config.write_text(yaml.safe_dump(real_cfg))
    real.start()
    ours = CollectorProcess(_config(ours_ports, ours_dir, None), tmp_path)
    chans = {ports: [grpc.insecure_channel(f"127.0.0.1:{p}") for p in ports] for ports in (ours_ports, real_ports)}
    try:
        for ports in (ours_ports, real_ports):
            for c in chans[ports]:
                grpc.channel_ready_future(c).result(timeout=30)

        def send(part: int, spans: list[Span], service: str, env: str) -> None:
            body = _request(spans, service, env)
            for ports in (ours_ports, real_ports):
                chans[ports][part].unary_unary(EXPORT)(body, timeout=10)

        t0 = time.monotonic()
        for i, t in enumerate(traces):                       # phase A: first parts, then second parts
            cut = max(1, len(t) // 2)
            send(0, t[:cut], "svc-a", "prod" if i % 3 == 0 else "staging")
        for t in traces:
            cut = max(1, len(t) // 2)
            if t[cut:]:
                send(1, t[cut:], "svc-b", "staging")
        took = time.monotonic() - t0
        assert took < 3.0, f"phase A took {took:.1f}s: spans of one trace would straddle its decision"
        time.sleep(max(0.0, 4.0 + 1.0 + 1.5 - (time.monotonic() - t0)))   # decision_wait + a tick + margin
        for t in late:                                        # phase B: late spans
            send(1, t, "svc-b", "staging")
        for t in fresh:                                       # phase C: pending at shutdown
            send(0, t, "svc-a", "prod")
    finally:
        for cs in chans.values():
            for c in cs:
                c.close()
        code = ours.stop()
        real.stop()
    assert code == 0, ours.log()[-3000:]
    total = sum(len(t) for t in traces + fresh + late)
    report = []
    for case in CASES:
        got, want = _written(ours_dir / f"{case}.jsonl"), _written(real_dir / f"{case}.jsonl")
        assert got == want, (case, len(got), len(want), sorted(got ^ want)[:5])
        report.append(f"{case}: {len(want)}")
        if case not in ("always",):
            assert 0 < len(want) < total or case == "drop_pending", (case, len(want), total)
    assert len(_written(real_dir / "always.jsonl")) == total
    assert len(_written(real_dir / "drop_pending.jsonl")) == total - sum(len(t) for t in fresh)
    print(f"\nspans kept of {total}, both collectors: " + ", ".join(report))
