"""The direct OTLP decoder reads a request into exactly the batch that protobuf + from_proto would."""

from __future__ import annotations

import math
from typing import Any

import pytest
from google.protobuf.message import DecodeError as ProtobufDecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from collector.otlp_decode import DecodeError, OTLPDecoder, count_spans
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
    from_proto,
    to_proto,
)
from tests.unit.collector.test_otlp_encode import resources, scopes, spans
from tests.unit.collector.test_spans_and_graph import make_batch


def dump(x: Any) -> Any:
    """Every field of a batch, recursively, with the Python type of every value (1 and True differ)."""
    if isinstance(x, SpanBatch | ResourceSpans | ScopeSpans | Resource | Scope | Span | Event | Link):
        slots = [s for s in type(x).__slots__ if not s.startswith("_")]
        if isinstance(x, Span):
            slots += ["events", "links"]
        return (type(x).__name__, tuple((s, dump(getattr(x, s))) for s in slots))
    if isinstance(x, list):
        return ("list", tuple(dump(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, dump(v)) for k, v in x.items()))
    if isinstance(x, float):
        return ("float", repr(x))  # keeps -0.0 and 0.0 apart, and nan equal to itself
    return (type(x).__name__, x)


def reference(data: bytes) -> SpanBatch:
    return from_proto(ExportTraceServiceRequest.FromString(data))


def same(data: bytes, decoder: OTLPDecoder | None = None) -> SpanBatch:
    got = (decoder or OTLPDecoder()).decode(data)
    assert dump(got) == dump(reference(data))
    return got


def test_every_field_type() -> None:
    same(to_proto(make_batch(5)).SerializeToString())


def test_edges_empty_values_negative_ints_nested_long_ids_and_big_numbers() -> None:
    s = Span(b"\xff" * 200, b"\x01" * 130, "", kind=0, start_time_unix_nano=2**63 + 5, end_time_unix_nano=0,
             parent_span_id=b"\x07" * 129, trace_state="k=v,a=b",
             attributes={"empty": "", "zero": 0, "neg": -1, "min": -(2**63), "f0": 0.0, "fneg0": -0.0,
                         "inf": math.inf, "nan": math.nan, "false": False, "none": None,
                         "nested": [[1, "a"], {"k": [True, None]}], "emptylist": [], "emptymap": {},
                         "unicode": "ünïcødé ✓", "big": 2**40, "bytes": b"", "bin": b"\x00\xff",
                         "long": "x" * 300},
             events=[Event("", 0), Event("e", 7, {"k": -3}, dropped_attributes_count=2)],
             links=[Link(b"\x02" * 16, b"\x03" * 8, "ts=1", {"l": 1.5}, flags=0x101, dropped_attributes_count=1)],
             status_code=2, status_message="only a message", flags=0x301, dropped_attributes_count=300,
             dropped_events_count=1, dropped_links_count=20000)
    only_start = Span(b"\x01" * 16, b"\x02" * 8, "last field is the start time", start_time_unix_nano=9)
    only_end = Span(b"\x01" * 16, b"\x02" * 8, "end only", end_time_unix_nano=9, kind=5)
    batch = SpanBatch([
        ResourceSpans(Resource({}), [ScopeSpans(Scope(), [])]),
        ResourceSpans(Resource({"service.name": "x"}, dropped_attributes_count=3),
                      [ScopeSpans(Scope("n", "v", {"a": 1}, 4), [s, only_start, only_end], "https://schema/1")],
                      "https://schema/r")])
    same(to_proto(batch).SerializeToString())
    same(OTLPEncoder().encode(batch))


def test_fields_in_any_order_unknown_fields_and_unknown_enum_values() -> None:
    req = to_proto(make_batch(2))
    ps = req.resource_spans[0].scope_spans[0].spans[0]
    ps.kind = 9  # type: ignore[assignment]  # not a SpanKind this build knows: kept as the number
    ps.status.code = 7  # type: ignore[assignment]
    # Unknown fields of every wire type at every level (a newer OTLP's fields): skipped.
    unknown = (_varint(99 << 3 | 0) + b"\x05" + _varint(98 << 3 | 1) + b"\x00" * 8
               + _varint(97 << 3 | 2) + b"\x03abc" + _varint(96 << 3 | 5) + b"\x00" * 4)
    for msg in (req, req.resource_spans[0], req.resource_spans[0].resource, req.resource_spans[0].scope_spans[0],
                req.resource_spans[0].scope_spans[0].scope, ps, ps.events[0], ps.links[0], ps.status,
                ps.attributes[0], ps.attributes[0].value):
        msg.MergeFromString(unknown)
    data = req.SerializeToString()
    got = same(data)
    assert got.resource_spans[0].scope_spans[0].spans[0].kind == 9
    # The same span with its fields written in reverse order (protobuf allows any order).
    body = ExportTraceServiceRequest()
    rev = body.resource_spans.add().scope_spans.add().spans.add()
    rev.CopyFrom(ps)
    span_bytes = b"".join(reversed(_fields(rev.SerializeToString())))
    ss = b"\x12" + _varint(len(span_bytes)) + span_bytes
    rs = b"\x12" + _varint(len(ss)) + ss
    data = b"\x0a" + _varint(len(rs)) + rs
    same(data)


def test_repeated_scalar_fields_last_wins_and_status_merges() -> None:
    # name twice, kind twice, status twice (message then code): protobuf keeps the last of each
    # scalar and merges the two Status messages.
    span = (b"\x0a\x10" + b"\x01" * 16 + b"\x12\x08" + b"\x02" * 8 + b"\x2a\x01a" + b"\x2a\x01b" + b"\x30\x01\x30\x03"
            + b"\x7a\x04\x12\x02hi" + b"\x7a\x02\x18\x02")
    ss = b"\x12" + _varint(len(span)) + span
    rs = b"\x12" + _varint(len(ss)) + ss
    got = same(b"\x0a" + _varint(len(rs)) + rs)
    s = got.resource_spans[0].scope_spans[0].spans[0]
    assert (s.name, s.kind, s.status_code, s.status_message) == ("b", 3, 2, "hi")


def test_key_values_in_every_shape() -> None:
    """KeyValues as other encoders may write them: value before key, a field twice, an empty value,
    two fields of the value's oneof, long keys and values (two-byte lengths), non-minimal varints;
    read by a fresh decoder (cache misses) and by a warm one (hits)."""
    def kv(body: bytes) -> bytes:
        return b"\x4a" + _varint(len(body)) + body

    def s_(tag: int, text: bytes) -> bytes:
        return bytes([tag]) + _varint(len(text)) + text

    any_str = s_(0x12, s_(0x0A, b"v"))
    attrs = [
        kv(s_(0x0A, b"k") + any_str), kv(any_str + s_(0x0A, b"rev")), kv(s_(0x0A, b"twice") + s_(0x0A, b"k2") + any_str),
        kv(s_(0x0A, b"empty") + b"\x12\x00"), kv(s_(0x0A, b"novalue")),
        kv(s_(0x0A, b"both") + s_(0x12, s_(0x0A, b"x") + b"\x18\x05")),
        kv(s_(0x0A, b"k" * 127 + b"\x12") + s_(0x12, s_(0x0A, b"v" * 15))),
        kv(s_(0x0A, b"long" * 40) + s_(0x12, s_(0x0A, "é".encode() * 100))),
        kv(s_(0x0A, b"bool2") + b"\x12\x03\x10\x81\x00"),  # true as a two-byte varint
        kv(s_(0x0A, b"len2") + b"\x12\x84\x00\x0a\x02hi"),  # the value's length as a two-byte varint
        kv(s_(0x0A, b"neg") + b"\x12\x0b\x18" + b"\xff" * 9 + b"\x01"),
        kv(s_(0x0A, b"d") + b"\x12\x09\x21" + b"\x00" * 7 + b"\x80"),
        kv(s_(0x0A, b"b") + s_(0x12, s_(0x3A, b"\x00" * 200))),
        kv(s_(0x0A, b"f") + b"\x12\x02\x10\x00"),
    ]
    span = b"\x0a\x10" + b"\x01" * 16 + b"\x12\x08" + b"\x02" * 8 + b"".join(attrs)
    ss = b"\x12" + _varint(len(span)) + span
    rs = b"\x12" + _varint(len(ss)) + ss
    data = b"\x0a" + _varint(len(rs)) + rs
    warm = OTLPDecoder()
    for dec in (OTLPDecoder(), warm, warm):
        got = same(data, dec)
    assert got.resource_spans[0].scope_spans[0].spans[0].attributes["both"] == 5


def test_list_and_map_values_are_never_shared_between_spans() -> None:
    batch = SpanBatch([ResourceSpans(Resource(), [ScopeSpans(Scope(), [
        Span(b"\x01" * 16, bytes([i]) * 8, "s", attributes={"l": [1, 2], "m": {"k": "v"}, "s": "x"})
        for i in range(2)])])])
    got = OTLPDecoder().decode(OTLPEncoder().encode(batch))
    a, b = got.resource_spans[0].scope_spans[0].spans
    assert a.attributes == b.attributes
    a.attributes["l"].append(3)
    a.attributes["m"]["k2"] = "w"
    assert b.attributes == {"l": [1, 2], "m": {"k": "v"}, "s": "x"}


def test_caches_start_afresh_past_their_size() -> None:
    dec = OTLPDecoder(cache_size=3)
    for i in range(20):
        batch = SpanBatch([ResourceSpans(Resource({"r": i % 5}), [ScopeSpans(Scope(f"s{i % 4}"), [
            Span(b"\x01" * 16, b"\x01" * 8, f"n{i % 7}", kind=i % 6, attributes={"k": i % 5, "b": i % 2 == 0,
                                                                                   "f": i / 3, "t": True, "one": 1})
        ])])])
        same(to_proto(batch).SerializeToString(), dec)


def test_every_prefix_decodes_or_fails_as_protobuf_does() -> None:
    """Truncated requests: where protobuf refuses, DecodeError; where the prefix is itself a valid
    message (cut at a field boundary), the same batch."""
    data = to_proto(make_batch(2)).SerializeToString()
    dec = OTLPDecoder()
    for n in range(len(data)):
        cut = data[:n]
        try:
            want = reference(cut)
        except ProtobufDecodeError:
            with pytest.raises(DecodeError):
                dec.decode(cut)
            continue
        assert dump(dec.decode(cut)) == dump(want), n


def test_invalid_utf8_and_bad_wire_types_are_refused() -> None:
    good = Span(b"\x01" * 16, b"\x02" * 8, "é")
    data = OTLPEncoder().encode(SpanBatch([ResourceSpans(Resource(), [ScopeSpans(Scope(), [good])])]))
    bad_utf8 = data.replace("é".encode(), b"\xc3\x28")
    group = data + b"\x0b"  # field 1, wire type 3 (start group): not in OTLP
    overlong = data + b"\x08" + b"\xff" * 10 + b"\x01"  # an 11-byte varint
    for bad in (bad_utf8, group, overlong):
        with pytest.raises(ProtobufDecodeError):
            ExportTraceServiceRequest.FromString(bad)
        with pytest.raises(DecodeError):
            OTLPDecoder().decode(bad)


shared_decoder = OTLPDecoder(cache_size=64)  # shared by every example: caches filled, hit and restarted


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(resources, st.lists(st.tuples(scopes, st.lists(spans, max_size=4), st.text(max_size=5)),
                                              max_size=3), st.text(max_size=5)), max_size=3))
def test_random_batches_decode_like_protobuf(layout: list) -> None:  # type: ignore[type-arg]
    batch = SpanBatch([ResourceSpans(res, [ScopeSpans(sc, sp, su) for sc, sp, su in sss], url)
                       for res, sss, url in layout])
    data = to_proto(batch).SerializeToString()
    got = same(data, shared_decoder)
    # otlp → otlp: what the receiver decoded, the exporter writes back byte for byte.
    assert OTLPEncoder().encode(got) == data or ExportTraceServiceRequest.FromString(
        OTLPEncoder().encode(got)) == ExportTraceServiceRequest.FromString(data)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _fields(buf: bytes) -> list[bytes]:
    """A message's encoded fields, each as its bytes (tag and value)."""
    out, i = [], 0
    while i < len(buf):
        start = i
        tag = 0
        shift = 0
        while True:
            b = buf[i]
            i += 1
            tag |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        wire = tag & 7
        if wire == 0:
            while buf[i] >= 0x80:
                i += 1
            i += 1
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            ln = shift = 0
            while True:
                b = buf[i]
                i += 1
                ln |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
            i += ln
        out.append(buf[start:i])
    return out


def _f(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _varint(len(body)) + body


_IDS = _f(0x0A, b"\x01" * 16) + _f(0x12, b"\x02" * 8)
# Where a KeyValue can sit, each a different number of messages below the request.
_ATTRIBUTE_PLACES = {
    "resource": lambda kv: _f(0x0A, _f(0x0A, _f(0x0A, kv))),
    "scope": lambda kv: _f(0x0A, _f(0x12, _f(0x0A, _f(0x1A, kv)))),
    "span": lambda kv: _f(0x0A, _f(0x12, _f(0x12, _IDS + _f(0x4A, kv)))),
    "event": lambda kv: _f(0x0A, _f(0x12, _f(0x12, _IDS + _f(0x5A, _f(0x1A, kv))))),
    "link": lambda kv: _f(0x0A, _f(0x12, _f(0x12, _IDS + _f(0x6A, _f(0x22, kv))))),
}


@pytest.mark.parametrize("place", sorted(_ATTRIBUTE_PLACES))
@pytest.mark.parametrize("leaf", [_f(0x0A, b"x"), b"", _f(0x2A, b""), _f(0x32, _f(0x0A, _f(0x0A, b"k")))],
                         ids=["string", "empty", "empty-array", "kv-without-value"])
@pytest.mark.parametrize("container", ["array", "kvlist"])
def test_nesting_is_refused_exactly_where_protobuf_refuses_it(place: str, leaf: bytes, container: str) -> None:
    """protobuf (upb) refuses messages nested more than 100 deep; so does the decoder, with a DecodeError
    (the receiver answers InvalidArgument), not a RecursionError."""
    value, refused = leaf, []
    for levels in range(1, 52):
        value = (_f(0x2A, _f(0x0A, value)) if container == "array"
                 else _f(0x32, _f(0x0A, _f(0x0A, b"k") + _f(0x12, value))))
        data = _ATTRIBUTE_PLACES[place](_f(0x0A, b"k") + _f(0x12, value))
        try:
            reference(data)
        except ProtobufDecodeError:
            with pytest.raises(DecodeError, match=r"^attribute values nested too deeply \(more than 100 levels "
                                                  r"of messages, protobuf's limit\)$"):
                OTLPDecoder().decode(data)
            refused.append(levels)
            continue
        same(data)
    assert refused and refused == list(range(refused[0], 52))  # the limit is reached, and stays reached


def test_count_spans_reads_only_the_structure() -> None:
    data = OTLPEncoder().encode(make_batch(5))
    assert count_spans(data) == 5
    assert count_spans(data[:-3]) <= 5  # a truncated request counts what can be found
    assert count_spans(b"\xff") == 0
