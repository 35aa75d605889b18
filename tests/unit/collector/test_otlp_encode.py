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
