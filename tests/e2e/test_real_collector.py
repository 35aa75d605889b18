"""Our otlp/otlphttp exporters and probabilistic_sampler against a real OpenTelemetry Collector.

The collector (otlp receiver, probabilistic_sampler, file exporter) is built from
tests/fixtures/otelcol/ with the machine's Go the first time (a minute or two), then cached by content
hash. Also here: the backend-outage story (a Python gRPC backend down for 30 s, then up).
"""

from __future__ import annotations

import base64
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from collector.component import ComponentID
from collector.spans import (
    KIND_CLIENT,
    KIND_SERVER,
    STATUS_ERROR,
    Event,
    Link,
    Resource,
    ResourceSpans,
    Scope,
    ScopeSpans,
    Span,
    SpanBatch,
    to_proto,
)
from collector.telemetry import ComponentTelemetry, SelfMetrics
from exporters.otlp import OTLPConfig, OTLPExporter
from exporters.otlphttp import OTLPHTTPConfig, OTLPHTTPExporter
from processors.probabilistic_sampler import HashSeedSampler
from tests.support.otelcol import RealCollector, build_otelcol, free_port

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def otelcol_binary() -> Path:
    return build_otelcol()


def exporter(kind: str, oc: RealCollector, **over: Any) -> tuple[Any, ComponentTelemetry]:
    t = ComponentTelemetry("exporter", kind, SelfMetrics())
    if kind == "otlp":
        cfg = OTLPConfig.model_validate({"endpoint": f"127.0.0.1:{oc.grpc_port}", "tls": {"insecure": True}, **over})
        e: Any = OTLPExporter(ComponentID(kind), t, cfg)
    else:
        cfg2 = OTLPHTTPConfig.model_validate({"endpoint": f"http://127.0.0.1:{oc.http_port}", **over})
        e = OTLPHTTPExporter(ComponentID(kind), t, cfg2)
    e.start(None)
    return e, t


def sent(t: ComponentTelemetry, family: str = "otelcol_exporter_sent_spans") -> float:
    return t.metrics.registry.get_sample_value(f"{family}_total", {"exporter": t.component_id}) or 0.0


# ------------------------------------------------------------------ OTLP/JSON (file exporter) → our model


def _json_value(v: dict[str, Any]) -> Any:
    if "stringValue" in v:
        return v["stringValue"]
    if "boolValue" in v:
        return v["boolValue"]
    if "intValue" in v:
        return int(v["intValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "bytesValue" in v:
        return base64.b64decode(v["bytesValue"])
    if "arrayValue" in v:
        return [_json_value(x) for x in v["arrayValue"].get("values", [])]
    if "kvlistValue" in v:
        return {kv["key"]: _json_value(kv.get("value", {})) for kv in v["kvlistValue"].get("values", [])}
    return None


def _attrs(items: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {kv["key"]: _json_value(kv.get("value", {})) for kv in items or []}


def _id(text: str | None) -> bytes:
    return bytes.fromhex(text) if text else b""


def from_otlp_json(doc: dict[str, Any]) -> SpanBatch:
    out = []
    for rs in doc.get("resourceSpans", []):
        res = rs.get("resource", {})
        r = ResourceSpans(Resource(_attrs(res.get("attributes")), res.get("droppedAttributesCount", 0)),
                          schema_url=rs.get("schemaUrl", ""))
        for ss in rs.get("scopeSpans", []):
            sc = ss.get("scope", {})
            scope = Scope(sc.get("name", ""), sc.get("version", ""), _attrs(sc.get("attributes")),
                          sc.get("droppedAttributesCount", 0))
            spans = []
            for s in ss.get("spans", []):
                st = s.get("status", {})
                spans.append(Span(
                    _id(s.get("traceId")), _id(s.get("spanId")), s.get("name", ""),
                    parent_span_id=_id(s.get("parentSpanId")), kind=s.get("kind", 0),
                    start_time_unix_nano=int(s.get("startTimeUnixNano", 0)),
                    end_time_unix_nano=int(s.get("endTimeUnixNano", 0)),
                    attributes=_attrs(s.get("attributes")),
                    events=[Event(e.get("name", ""), int(e.get("timeUnixNano", 0)), _attrs(e.get("attributes")),
                                  e.get("droppedAttributesCount", 0)) for e in s.get("events", [])],
                    links=[Link(_id(lk.get("traceId")), _id(lk.get("spanId")), lk.get("traceState", ""),
                                _attrs(lk.get("attributes")), lk.get("flags", 0), lk.get("droppedAttributesCount", 0))
                           for lk in s.get("links", [])],
                    status_code=st.get("code", 0), status_message=st.get("message", ""),
                    trace_state=s.get("traceState", ""), flags=s.get("flags", 0),
                    dropped_attributes_count=s.get("droppedAttributesCount", 0),
                    dropped_events_count=s.get("droppedEventsCount", 0),
                    dropped_links_count=s.get("droppedLinksCount", 0)))
            r.scope_spans.append(ScopeSpans(scope, spans, ss.get("schemaUrl", "")))
        out.append(r)
    return SpanBatch(out)


def rich_batch() -> SpanBatch:
    attrs = {"str": "héllo", "bool": True, "int": -42, "big": 2**62, "double": 3.25, "bytes": b"\x00\xffab",
             "array": ["a", 1, 2.5, False], "map": {"k": "v", "n": 7, "nested": {"x": [1, 2]}}, "empty": ""}
    root = Span(bytes.fromhex("0af7651916cd43dd8448eb211c80319c"), bytes.fromhex("b7ad6b7169203331"), "GET /users/{id}",
                kind=KIND_SERVER, start_time_unix_nano=1_700_000_000_123_456_789,
                end_time_unix_nano=1_700_000_000_223_456_789, attributes=dict(attrs),
                events=[Event("exception", 1_700_000_000_200_000_000, {"exception.message": "boom", "n": 1}, 2),
                        Event("no-attrs", 1_700_000_000_210_000_000)],
                links=[Link(bytes.fromhex("11112222333344445555666677778888"), bytes.fromhex("0102030405060708"),
                            "vendor=a", {"link.kind": "follows"}, flags=1, dropped_attributes_count=1)],
                status_code=STATUS_ERROR, status_message="it failed", trace_state="congo=t61rcWkgMzE",
                flags=1, dropped_attributes_count=3, dropped_events_count=4, dropped_links_count=5)
    child = Span(root.trace_id, bytes.fromhex("00f067aa0ba902b7"), "SELECT users", parent_span_id=root.span_id,
                 kind=KIND_CLIENT, start_time_unix_nano=1_700_000_000_130_000_000,
                 end_time_unix_nano=1_700_000_000_190_000_000, attributes={"db.system": "postgresql"})
    return SpanBatch([
        ResourceSpans(Resource({"service.name": "users", "process.pid": 1234, "host.arch": "amd64"}, 1), [
            ScopeSpans(Scope("otelgo/net/http", "0.1.0", {"scope.attr": True}, 2), [root],
                       "https://opentelemetry.io/schemas/1.26.0"),
            ScopeSpans(Scope("otelgo/database/sql"), [child]),
        ], "https://opentelemetry.io/schemas/1.26.0"),
        ResourceSpans(Resource({"service.name": "other"}), [ScopeSpans(Scope(), [
            Span(bytes(range(16)), bytes(range(8)), "minimal")])]),
    ])


@pytest.mark.parametrize("kind", ["otlp", "otlphttp"])
def test_every_field_survives_the_real_collector(otelcol_binary, tmp_path, kind):
    original = rich_batch()
    with RealCollector(tmp_path) as oc:
        e, t = exporter(kind, oc)
        e.consume(original.copy())
        e.shutdown(10)
        assert sent(t) == 3
        oc.wait_for_spans(3)
        docs = oc.received()
    got = SpanBatch.merge([from_otlp_json(d) for d in docs])
    assert to_proto(got) == to_proto(original)


# ------------------------------------------------------------------ sampler parity


@pytest.mark.parametrize("pct, seed", [(33.3, 22), (10, 0), (0.5, 4312)])
def test_sampler_decisions_equal_the_collectors_for_10000_trace_ids(otelcol_binary, tmp_path, pct, seed):
    rng = random.Random(seed * 1000 + int(pct * 10))
    spans = [Span(rng.randbytes(16), (i + 1).to_bytes(8, "big"), "op") for i in range(10_000)]
    ours = HashSeedSampler(pct, seed)
    expected: dict[bytes, str] = {}
    for s in spans:
        c = s.copy()
        if ours.decide(c)[0]:
            expected[c.span_id] = c.trace_state
    procs = {"probabilistic_sampler": {"sampling_percentage": pct, "hash_seed": seed, "mode": "hash_seed"}}
    with RealCollector(tmp_path, procs) as oc:
        e, t = exporter("otlp", oc)
        for i in range(0, len(spans), 500):
            e.consume(SpanBatch([ResourceSpans(Resource({"service.name": "s"}),
                                               [ScopeSpans(Scope("x"), spans[i:i + 500])])]))
        e.shutdown(30)
        assert sent(t) == 10_000
        deadline = time.monotonic() + 20
        got = {}
        while time.monotonic() < deadline:
            got = {_id(sp["spanId"]): sp.get("traceState", "") for _, _, sp in oc.spans()}
            if len(got) >= len(expected):
                time.sleep(0.5)  # anything more would be a disagreement
                got = {_id(sp["spanId"]): sp.get("traceState", "") for _, _, sp in oc.spans()}
                break
            time.sleep(0.2)
    assert set(got) == set(expected), f"{len(set(got) ^ set(expected))} decisions differ"
    assert got == expected  # the tracestate written (ot=rv:…;th:…) too
    print(f"\nsampler parity pct={pct} seed={seed}: {len(expected)} of 10000 kept by both")


# ------------------------------------------------------------------ throughput


def test_otlp_exporter_throughput_into_the_real_collector(otelcol_binary, tmp_path):
    total, per_batch = 200_000, 1000
    rng = random.Random(1)
    batches = []
    for b in range(total // per_batch):
        spans = [Span(rng.randbytes(16), rng.randbytes(8), "GET /api/items", kind=KIND_SERVER,
                      start_time_unix_nano=1, end_time_unix_nano=2,
                      attributes={"http.request.method": "GET", "http.response.status_code": 200,
                                  "url.path": f"/api/items/{b}"})
                 for _ in range(per_batch)]
        batches.append(SpanBatch([ResourceSpans(Resource({"service.name": "bench"}), [ScopeSpans(Scope("b"), spans)])]))
    with RealCollector(tmp_path) as oc:
        oc.out = tmp_path / "unused"  # the file exporter still writes; we only count sends
        e, t = exporter("otlp", oc)
        t0 = time.perf_counter()
        for b in batches:
            e.consume(b)
        e.shutdown(120)
        elapsed = time.perf_counter() - t0
    assert sent(t) == total
    rate = total / elapsed
    print(f"\notlp exporter → real collector: {total} spans in {elapsed:.2f}s = {rate:,.0f} spans/s "
          f"(batches of {per_batch}, gzip, 10 consumers)")
    assert rate > 5_000


# ------------------------------------------------------------------ backend outage


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_backend_down_30s_then_up_accounts_for_every_span():
    from tests.unit.exporters.backend import Backend

    port = free_port()
    backend = Backend(port)
    t = ComponentTelemetry("exporter", "otlp", SelfMetrics())
    cfg = OTLPConfig.model_validate({
        "endpoint": f"127.0.0.1:{port}", "tls": {"insecure": True}, "timeout": "1s",
        "sending_queue": {"num_consumers": 2, "queue_size": 100},
        "retry_on_failure": {"initial_interval": "500ms", "max_interval": "2s", "max_elapsed_time": "120s"}})
    e = OTLPExporter(ComponentID("otlp"), t, cfg)
    e.start(None)  # type: ignore[arg-type]
    offered = refused = 0
    seq = 0

    def offer(n_batches: int) -> None:
        nonlocal offered, refused, seq
        for _ in range(n_batches):
            b = SpanBatch([ResourceSpans(Resource({"service.name": "outage"}), [ScopeSpans(Scope("o"), [
                Span(seq.to_bytes(16, "big"), (seq * 10 + k + 1).to_bytes(8, "big"), "op") for k in range(10)])])])
            seq += 1
            offered += 10
            try:
                e.consume(b)
            except Exception as err:  # ConsumerError("sending queue is full")
                assert str(err) == "sending queue is full"
                refused += 10

    try:
        offer(20)
        deadline = time.monotonic() + 10
        while sent(t) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend.span_count() == 200
        backend.stop()  # ---- down for 30 s, with traffic flowing at 20 batches/s
        rss0, rss_max, qmax = _rss(), 0, 0
        down_until = time.monotonic() + 30
        while time.monotonic() < down_until:
            offer(1)
            rss_max = max(rss_max, _rss())
            qmax = max(qmax, e.sender.queue_size())
            time.sleep(0.05)
        assert qmax <= 100
        assert refused > 0
        backend = Backend(port)  # ---- up again
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not e.sender.idle():
            time.sleep(0.1)
        e.shutdown(10)
        send_failed = sent(t, "otelcol_exporter_send_failed_spans")
        enqueue_failed = sent(t, "otelcol_exporter_enqueue_failed_spans")
        received_after = backend.span_count()
        ids = [s.span_id for r in backend.requests for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]
        assert len(ids) == len(set(ids)), "a span arrived twice"
        assert enqueue_failed == refused
        assert sent(t) == 200 + received_after  # everything accepted arrived, once
        assert send_failed == 0
        assert sent(t) + send_failed + enqueue_failed == offered  # received = sent + dropped
        assert received_after >= 100 * 10  # the whole queue's worth survived the outage
        print(f"\noutage: offered {offered}, delivered {int(sent(t))}, refused (queue full) {int(enqueue_failed)}, "
              f"failed {int(send_failed)}; queue max {qmax}/100 batches; RSS growth while down "
              f"{(rss_max - rss0) / 2**20:.1f} MiB")
        assert rss_max - rss0 < 64 * 2**20
    finally:
        backend.stop()


# ------------------------------------------------------------------ the whole pipeline, through our CLI


def test_our_collector_pipeline_into_the_real_collector(otelcol_binary, tmp_path):
    """otelgo-collector (otlp → memory_limiter → filter → attributes → resource → probabilistic_sampler →
    batch → otlp) feeding the real collector: the processors' effects arrive."""
    from tests.support.collector import CollectorProcess

    rx_port = free_port()
    with RealCollector(tmp_path) as oc:
        config = {
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{rx_port}"}}}},
            "processors": {
                "memory_limiter": {"check_interval": "1s", "limit_mib": 4000},
                "filter/health": {"traces": {"span": ['attributes["http.route"] == "/healthz"']}},
                "attributes/pii": {"actions": [{"key": "user.email", "action": "hash"},
                                               {"key": "env", "value": "test", "action": "insert"}]},
                "resource": {"attributes": [{"key": "deployment.environment", "value": "ci", "action": "upsert"}]},
                "probabilistic_sampler": {"sampling_percentage": 100},
                "batch": {"timeout": "100ms"},
            },
            "exporters": {"otlp": {"endpoint": f"127.0.0.1:{oc.grpc_port}", "tls": {"insecure": True}}},
            "service": {"pipelines": {"traces": {
                "receivers": ["otlp"],
                "processors": ["memory_limiter", "filter/health", "attributes/pii", "resource",
                               "probabilistic_sampler", "batch"],
                "exporters": ["otlp"]}}},
        }
        with CollectorProcess(config, tmp_path) as ours:
            client = ComponentTelemetry("exporter", "client", SelfMetrics())
            e = OTLPExporter(ComponentID("client"), client, OTLPConfig.model_validate(
                {"endpoint": f"127.0.0.1:{rx_port}", "tls": {"insecure": True}}))
            e.start(None)  # type: ignore[arg-type]
            spans = [Span(i.to_bytes(16, "big"), i.to_bytes(8, "big"), "GET /healthz" if i % 4 == 0 else "GET /x",
                          attributes={"http.route": "/healthz" if i % 4 == 0 else "/x", "user.email": "a@b.c"})
                     for i in range(1, 101)]
            e.consume(SpanBatch([ResourceSpans(Resource({"service.name": "app"}), [ScopeSpans(Scope("s"), spans)])]))
            e.shutdown(10)
            got = oc.wait_for_spans(75)
            time.sleep(0.5)
            got = oc.spans()
            metrics = ours.scrape()
    assert len(got) == 75
    import hashlib

    for res, _, sp in got:
        attrs = _attrs(sp.get("attributes"))
        assert attrs["http.route"] == "/x" and attrs["env"] == "test"
        assert attrs["user.email"] == hashlib.sha1(b"a@b.c").hexdigest()
        assert _attrs(res.get("attributes"))["deployment.environment"] == "ci"
        assert sp["traceState"].startswith("ot=rv:") and sp["traceState"].endswith(";th:0")
    assert 'otelcol_exporter_sent_spans_total{exporter="otlp"} 75.0' in metrics
    assert 'otelcol_processor_filter_spans_filtered_total{filter="filter/health"} 25.0' in metrics
