"""The direct OTLP encoder writes exactly the message that the protobuf classes would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from collector.otlp_encode import OTLPEncoder
from collector.spans import (
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
from tests.unit.collector.test_spans_and_graph import make_batch


def same(batch: SpanBatch, encoder: OTLPEncoder | None = None) -> None:
    data = (encoder or OTLPEncoder()).encode(batch)
    assert ExportTraceServiceRequest.FromString(data) == to_proto(batch)


def test_every_field_type() -> None:
    same(make_batch(5))


def test_edges_empty_values_negative_ints_nested_and_big_numbers() -> None:
    s = Span(b"\xff" * 16, b"\x01" * 8, "", kind=0, start_time_unix_nano=2**63 + 5, end_time_unix_nano=0,
             attributes={"empty": "", "zero": 0, "neg": -1, "min": -(2**63), "f0": 0.0, "false": False,
                         "nested": [[1, "a"], {"k": [True, None]}], "emptylist": [], "emptymap": {},
                         "unicode": "ünïcødé ✓", "big": 2**40, "bytes": b""},
             events=[Event("", 0), Event("e", 7, {"k": -3}, dropped_attributes_count=2)],
             links=[Link(b"\x02" * 16, b"\x03" * 8, flags=0x101, dropped_attributes_count=1)],
             status_message="only a message", flags=0x301, dropped_attributes_count=300,
             dropped_events_count=1, dropped_links_count=20000)
    batch = SpanBatch([
        ResourceSpans(Resource({}), [ScopeSpans(Scope(), [])]),
        ResourceSpans(Resource({"service.name": "x"}, dropped_attributes_count=3),
                      [ScopeSpans(Scope("n", "v", {"a": 1}, 4), [s], "https://schema/1")], "https://schema/r")])
    same(batch)


def test_cache_keeps_true_and_one_apart() -> None:
    enc = OTLPEncoder(cache_size=2)
    for v in (True, 1, 1.0, "1", True, 1):
        same(SpanBatch([ResourceSpans(Resource({"k": v}), [ScopeSpans(Scope(), [
            Span(b"\x01" * 16, b"\x01" * 8, "s", attributes={"k": v})])])]), enc)


scalars = st.one_of(st.text(max_size=20), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                    st.floats(allow_nan=False), st.binary(max_size=10))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=10), values, max_size=6), st.text(max_size=30),
       st.integers(0, 5), st.integers(0, 2**64 - 1))
def test_random_spans_encode_like_protobuf(attrs: dict, name: str, kind: int, start: int) -> None:  # type: ignore[type-arg]
    same(SpanBatch([ResourceSpans(Resource(attrs), [ScopeSpans(Scope(name), [
        Span(b"\x0a" * 16, b"\x0b" * 8, name, kind=kind, start_time_unix_nano=start, attributes=attrs)])])]))


def test_zero_and_negative_zero_floats_keep_their_sign() -> None:
    enc = OTLPEncoder()
    for v in (0.0, -0.0, 0.0, -0.0):
        batch = SpanBatch([ResourceSpans(Resource(), [ScopeSpans(Scope(), [
            Span(b"\x01" * 16, b"\x01" * 8, "s", attributes={"k": v})])])])
        data = enc.encode(batch)
        assert data == OTLPEncoder().encode(batch)
        value = ExportTraceServiceRequest.FromString(data).resource_spans[0].scope_spans[0].spans[0] \
            .attributes[0].value.double_value
        assert str(value) == str(v)


def test_caches_start_afresh_past_their_size() -> None:
    enc = OTLPEncoder(cache_size=3)
    for i in range(20):
        same(SpanBatch([ResourceSpans(Resource({"r": i % 5}), [ScopeSpans(Scope(f"s{i % 4}"), [
            Span(b"\x01" * 16, b"\x01" * 8, f"n{i % 7}", kind=i % 6, status_code=i % 3, status_message=f"m{i % 2}",
                 flags=i % 4, attributes={"k": i % 5, "b": i % 2 == 0, "f": i / 3})])])]), enc)


ids = st.one_of(st.binary(min_size=16, max_size=16), st.binary(max_size=20))
short_ids = st.one_of(st.binary(min_size=8, max_size=8), st.binary(max_size=10))
attr_dicts = st.dictionaries(st.text(max_size=8), values, max_size=5)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
events = st.builds(Event, st.text(max_size=8), u64, attr_dicts, u32)
links = st.builds(Link, ids, short_ids, st.text(max_size=8), attr_dicts, u32, u32)
spans = st.builds(
    Span, ids, short_ids, st.text(max_size=12), parent_span_id=short_ids, kind=st.integers(0, 5),
    start_time_unix_nano=u64, end_time_unix_nano=u64, attributes=attr_dicts,
    events=st.lists(events, max_size=3), links=st.lists(links, max_size=2), status_code=st.integers(0, 2),
    status_message=st.text(max_size=8), trace_state=st.text(max_size=8), flags=u32,
    dropped_attributes_count=u32, dropped_events_count=u32, dropped_links_count=u32)
resources = st.builds(Resource, attr_dicts, u32)
scopes = st.builds(Scope, st.text(max_size=8), st.text(max_size=8), attr_dicts, u32)
shared_encoder = OTLPEncoder(cache_size=64)  # shared by every example: caches filled, hit and restarted


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(resources, st.lists(st.tuples(scopes, st.lists(spans, max_size=4), st.text(max_size=5)),
                                              max_size=3), st.text(max_size=5)), max_size=3))
def test_random_batches_with_events_links_status_encode_like_protobuf(layout: list) -> None:  # type: ignore[type-arg]
    # Resources and scopes shared between entries, as after the batch processor's merge.
    rss = []
    for res, sss, url in layout:
        rss.append(ResourceSpans(res, [ScopeSpans(sc, sp, su) for sc, sp, su in sss], url))
    if rss:
        rss.append(ResourceSpans(rss[0].resource, [ScopeSpans(ss.scope, ss.spans[:1]) for ss in rss[0].scope_spans]))
    batch = SpanBatch(rss)
    same(batch, shared_encoder)
    assert shared_encoder.encode(batch) == OTLPEncoder().encode(batch)
