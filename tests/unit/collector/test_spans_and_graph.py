"""The batch model's OTLP round trips, the batch processor's triggers, and the graph's fan-out."""

from __future__ import annotations

import json
import threading
import time

from collector.component import ComponentID
from collector.errors import ConsumerError
from collector.graph import FanOut
from collector.spans import (
    KIND_CLIENT,
    STATUS_ERROR,
    Event,
    Link,
    Resource,
    ResourceSpans,
    Scope,
    ScopeSpans,
    Span,
    SpanBatch,
    from_json_dict,
    from_proto,
    to_json_dict,
    to_proto,
)
from collector.telemetry import ComponentTelemetry, SelfMetrics
from processors.batch import BatchProcessor
from processors.batch import Config as BatchConfig

ATTRS = {"s": "x", "i": -(2**62), "f": 0.25, "b": False, "by": b"\x00\xff", "arr": ["a", 1, True],
         "map": {"k": "v", "n": 2}}


def make_batch(n: int, service: str = "svc") -> SpanBatch:
    spans = [Span(bytes([i % 256]) * 16, (i + 1).to_bytes(8, "big"), f"span-{i}", parent_span_id=b"\x01" * 8,
                  kind=KIND_CLIENT, start_time_unix_nano=1_700_000_000_000_000_000 + i,
                  end_time_unix_nano=1_700_000_000_000_000_500 + i, attributes=dict(ATTRS),
                  events=[Event("e", 1_700_000_000_000_000_100, {"k": 1})],
                  links=[Link(b"\x02" * 16, b"\x03" * 8, "a=b", {"l": "x"})],
                  status_code=STATUS_ERROR, status_message="bad", trace_state="k=v")
             for i in range(n)]
    return SpanBatch([ResourceSpans(Resource({"service.name": service}),
                                    [ScopeSpans(Scope("scope", "1.0", {"sa": 1}), spans)])])


def snapshot(batch: SpanBatch) -> object:
    return to_json_dict(batch)


def test_proto_round_trip_keeps_every_field() -> None:
    b = make_batch(3)
    back = from_proto(to_proto(b))
    assert snapshot(back) == snapshot(b)
    _, _, s = next(back.iter_spans())
    assert s.attributes == ATTRS


def test_json_round_trip_and_otlp_json_shape() -> None:
    b = make_batch(2)
    doc = json.loads(json.dumps(to_json_dict(b)))
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == "00" * 16 and span["spanId"] == "0000000000000001"
    assert span["startTimeUnixNano"] == "1700000000000000000"  # 64-bit ints as strings
    assert {"key": "i", "value": {"intValue": str(-(2**62))}} in span["attributes"]
    assert snapshot(from_json_dict(doc)) == snapshot(b)


def test_split_and_merge_keep_grouping() -> None:
    b = SpanBatch.merge([make_batch(5, "a"), make_batch(4, "b")])
    parts = b.split(4)
    assert [p.span_count() for p in parts] == [4, 4, 1]
    names = [(rs.resource.attributes["service.name"], s.name) for p in parts for rs, _, s in p.iter_spans()]
    assert names == [(rs.resource.attributes["service.name"], s.name) for rs, _, s in b.iter_spans()]


class Collect:
    def __init__(self, mutates: bool = False, fail: bool = False) -> None:
        self.batches: list[SpanBatch] = []
        self.mutates_data = mutates
        self.fail = fail

    def consume(self, batch: SpanBatch) -> None:
        if self.fail:
            raise ConsumerError("down")
        if self.mutates_data:
            for _, _, s in batch.iter_spans():
                s.attributes["mutated"] = True
        self.batches.append(batch)


def test_fan_out_copies_for_mutating_consumers_and_reports_errors() -> None:
    plain, mutating, failing = Collect(), Collect(mutates=True), Collect(fail=True)
    fan = FanOut([mutating, failing, plain])
    b = make_batch(2)
    try:
        fan.consume(b)
        raise AssertionError("expected ConsumerError")
    except ConsumerError:
        pass
    assert plain.batches[0] is b and "mutated" not in next(b.iter_spans())[2].attributes
    assert next(mutating.batches[0].iter_spans())[2].attributes["mutated"] is True


def batch_proc(out: Collect, **cfg: object) -> BatchProcessor:
    p = BatchProcessor(ComponentID("batch"), BatchConfig.model_validate(cfg),
                       ComponentTelemetry("processor", "batch", SelfMetrics()), out)
    p.start(None)  # type: ignore[arg-type]
    return p


def test_batch_processor_size_trigger_and_max_split() -> None:
    out = Collect()
    p = batch_proc(out, send_batch_size=10, send_batch_max_size=10, timeout="10s")
    for _ in range(3):
        p.consume(make_batch(4))  # 4, 8, 12 → one send of 12 split into 10 + 2
    deadline = time.monotonic() + 5
    while len(out.batches) < 2 and time.monotonic() < deadline:  # sent from the processor's thread
        time.sleep(0.01)
    assert [b.span_count() for b in out.batches] == [10, 2]
    p.shutdown()
    assert [b.span_count() for b in out.batches] == [10, 2]


def test_batch_processor_sends_from_its_thread_with_bounded_backpressure() -> None:
    """A slow next consumer holds the processor's thread, not the caller; after MAX_READY full
    batches wait, consume() blocks until one leaves; everything arrives once, in order."""
    from processors.batch import MAX_READY

    release = threading.Event()
    got: list[int] = []
    threads: list[str] = []

    class Slow:
        def consume(self, batch: SpanBatch) -> None:
            threads.append(threading.current_thread().name)
            release.wait(10)
            got.append(batch.span_count())

    p = BatchProcessor(ComponentID("batch"), BatchConfig.model_validate({"send_batch_size": 1, "timeout": "10s"}),
                       ComponentTelemetry("processor", "batch", SelfMetrics()), Slow())  # type: ignore[arg-type]
    p.start(None)  # type: ignore[arg-type]
    for n in range(1, MAX_READY + 2):  # one held by the slow consumer, MAX_READY waiting: none blocks
        p.consume(make_batch(n))
    blocked = threading.Thread(target=p.consume, args=(make_batch(MAX_READY + 2),))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive()   # the ready queue is full: the caller waits (bounded memory)
    assert got == []            # nothing was sent from a caller's thread
    release.set()
    blocked.join(5)
    assert not blocked.is_alive()
    p.shutdown()
    assert got == list(range(1, MAX_READY + 3))
    assert set(threads) == {"batch-batch"}


def test_batch_processor_timeout_trigger() -> None:
    out = Collect()
    p = batch_proc(out, send_batch_size=1000, timeout="50ms")
    p.consume(make_batch(3))
    p.consume(make_batch(2))
    deadline = time.monotonic() + 2
    while not out.batches and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [b.span_count() for b in out.batches] == [5]
    p.shutdown()


def test_batch_processor_shutdown_flushes() -> None:
    out = Collect()
    p = batch_proc(out, send_batch_size=1000, timeout="60s")
    p.consume(make_batch(7))
    assert out.batches == []
    p.shutdown()
    assert [b.span_count() for b in out.batches] == [7]


def test_graph_counts_each_processor_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """incoming/outgoing items are counted by the graph around every processor, exactly once."""
    from collector import config as configmod
    from collector.graph import Graph
    from collector.registry import load_factories

    raw = {
        "receivers": {"otlp": {}},
        "processors": {"filter/drop": {"spans": {"exclude": {"match_type": "strict", "span_names": ["span-1"]}}},
                       "attributes": {"actions": [{"key": "k", "value": "v", "action": "insert"}]}},
        "exporters": {"file": {"path": str(tmp_path / "x.jsonl")}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": ["filter/drop", "attributes"],
                                             "exporters": ["file"]}}},
    }
    cfg = configmod.build_config(raw, load_factories())
    metrics = SelfMetrics()
    graph = Graph(cfg, metrics)
    graph.pipelines[0].head.consume(make_batch(4))  # span-0 .. span-3; filter drops span-1
    get = metrics.registry.get_sample_value
    assert get("otelcol_processor_incoming_items_total", {"processor": "filter/drop", "otel_signal": "traces"}) == 4
    assert get("otelcol_processor_outgoing_items_total", {"processor": "filter/drop", "otel_signal": "traces"}) == 3
    assert get("otelcol_processor_incoming_items_total", {"processor": "attributes", "otel_signal": "traces"}) == 3
    assert get("otelcol_processor_outgoing_items_total", {"processor": "attributes", "otel_signal": "traces"}) == 3


def test_span_events_and_links_are_lists_made_on_first_use() -> None:
    s = Span(b"\x01" * 16, b"\x02" * 8, "s")
    assert s.events == [] and s.links == []
    s.events.append(Event("e", 1))
    s.links.append(Link(b"\x03" * 16, b"\x04" * 8))
    assert [e.name for e in s.events] == ["e"] and len(s.links) == 1
    c = s.copy()
    c.events.append(Event("f", 2))
    assert [e.name for e in s.events] == ["e"] and [e.name for e in c.events] == ["e", "f"]
    empty = Span(b"\x01" * 16, b"\x02" * 8, "t").copy()
    empty.links.append(Link(b"\x03" * 16, b"\x04" * 8))
    assert len(empty.links) == 1
    s.events = []
    assert s.events == [] and snapshot(SpanBatch([ResourceSpans(Resource(), [ScopeSpans(Scope(), [s])])]))


def test_make_span_sets_every_slot_like_the_constructor() -> None:
    from collector.spans import make_span
    want = Span(b"\x01" * 16, b"\x02" * 8, "n", parent_span_id=b"\x03" * 8, kind=2, start_time_unix_nano=1,
                end_time_unix_nano=2, attributes={"a": 1}, status_code=2, flags=0x301)
    got = make_span(b"\x01" * 16, b"\x02" * 8, "n", b"\x03" * 8, 2, 1, 2, {"a": 1}, 2, 0x301)
    assert [getattr(got, k) for k in Span.__slots__] == [getattr(want, k) for k in Span.__slots__]
