"""Serialized OTLP ExportTraceServiceRequest → SpanBatch, read straight from the protobuf wire format.

The otlp receiver's hot path. Parsing with protobuf (upb) is cheap, but walking the parsed message
from Python makes a wrapper object per field read: ~6.6 µs per span for an HTTP span with 7
attributes (benchmarks/README.md). Here one plain loop per span reads the fields from the bytes;
each attribute's encoded KeyValue is looked up in a cache of decoded (key, value) pairs (a
receiver's spans repeat the same pairs endlessly), as are span names. Lists and maps inside
attributes are decoded afresh each time (they are mutable, never shared between spans).

The result is what `collector.spans.from_proto(ExportTraceServiceRequest.FromString(data))` gives
(tests/unit/collector/test_otlp_decode.py), and bad input raises DecodeError where protobuf would
refuse it: truncated fields, a length past its message's end, invalid UTF-8 in a string, groups,
attribute values nested deeper than protobuf's limit (100 messages below the request). Unknown fields
are skipped, as protobuf does.
"""

from __future__ import annotations

import struct

from collector.spans import (
    KIND_UNSPECIFIED,
    STATUS_UNSET,
    AttrValue,
    Event,
    Link,
    Resource,
    ResourceSpans,
    Scope,
    ScopeSpans,
    Span,
    SpanBatch,
)


class DecodeError(ValueError):
    """The request is not a valid ExportTraceServiceRequest."""


_unpack_q = struct.Struct("<Q").unpack_from
_unpack_d = struct.Struct("<d").unpack_from
_unpack_i = struct.Struct("<I").unpack_from
_unpack_times = struct.Struct("<QBQ").unpack_from  # start (7), the end's tag, end (8): the usual layout
_new_span = Span.__new__

_U64 = 1 << 64
_I64_MIN = 1 << 63

# upb's default decode depth: messages nested more than this far below the request are refused. Only
# attribute values (arrays, kvlists) nest freely, so only their decoders count depth; the numbers
# below are where each KeyValue sits (request = 0).
_MAX_DEPTH = 100
_DEPTH_RESOURCE_KV, _DEPTH_SCOPE_KV, _DEPTH_SPAN_KV, _DEPTH_EVENT_KV, _DEPTH_LINK_KV = 3, 4, 4, 5, 5


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """The varint at buf[i] and the index after it."""
    b = buf[i]
    if b < 0x80:
        return b, i + 1
    n, shift = b & 0x7F, 7
    while True:
        i += 1
        b = buf[i]
        n |= (b & 0x7F) << shift
        if b < 0x80:
            if shift > 63:
                raise DecodeError("varint longer than 10 bytes")
            return n & (_U64 - 1), i + 1
        shift += 7


def _int64(n: int) -> int:
    return n - _U64 if n >= _I64_MIN else n


def _int32(n: int) -> int:
    n &= 0xFFFFFFFF
    return n - (1 << 32) if n >= 1 << 31 else n


def _skip(buf: bytes, i: int, wire: int) -> int:
    """The index after an unknown field's value."""
    if wire == 0:
        return _varint(buf, i)[1]
    if wire == 1:
        return i + 8
    if wire == 2:
        ln, i = _varint(buf, i)
        return i + ln
    if wire == 5:
        return i + 4
    raise DecodeError(f"unsupported wire type {wire}")


def _text(buf: bytes, i: int, end: int) -> str:
    if end > len(buf):
        raise DecodeError("string past the end of the message")
    try:
        return buf[i:end].decode()
    except UnicodeDecodeError:
        raise DecodeError("string field holds invalid UTF-8") from None


def _check(i: int, end: int, what: str) -> None:
    if i != end:
        raise DecodeError(f"{what}: field runs past the end of its message")


def _too_deep() -> DecodeError:
    return DecodeError(f"attribute values nested too deeply (more than {_MAX_DEPTH} levels of messages, "
                       "protobuf's limit)")


def _any_value(buf: bytes, i: int, end: int, depth: int) -> AttrValue:
    """An AnyValue message `depth` messages below the request (so are the functions below)."""
    if depth > _MAX_DEPTH:
        raise _too_deep()
    value: AttrValue = None
    while i < end:
        tag, i = _varint(buf, i)
        if tag == 0x0A:  # string_value
            ln, i = _varint(buf, i)
            value = _text(buf, i, i + ln)
            i += ln
        elif tag == 0x10:  # bool_value
            n, i = _varint(buf, i)
            value = n != 0
        elif tag == 0x18:  # int_value
            n, i = _varint(buf, i)
            value = _int64(n)
        elif tag == 0x21:  # double_value
            value = _unpack_d(buf, i)[0]
            i += 8
        elif tag == 0x2A:  # array_value { repeated AnyValue values = 1 }
            ln, i = _varint(buf, i)
            value = _array(buf, i, i + ln, depth + 1)
            i += ln
        elif tag == 0x32:  # kvlist_value { repeated KeyValue values = 1 }
            ln, i = _varint(buf, i)
            value = _kvlist(buf, i, i + ln, depth + 1)
            i += ln
        elif tag == 0x3A:  # bytes_value
            ln, i = _varint(buf, i)
            value = buf[i:i + ln]
            i += ln
        else:
            i = _skip(buf, i, tag & 7)
    _check(i, end, "AnyValue")
    return value


def _array(buf: bytes, i: int, end: int, depth: int) -> list[AttrValue]:
    if depth > _MAX_DEPTH:
        raise _too_deep()
    out: list[AttrValue] = []
    while i < end:
        tag, i = _varint(buf, i)
        if tag == 0x0A:
            ln, i = _varint(buf, i)
            out.append(_any_value(buf, i, i + ln, depth + 1))
            i += ln
        else:
            i = _skip(buf, i, tag & 7)
    _check(i, end, "ArrayValue")
    return out


def _kvlist(buf: bytes, i: int, end: int, depth: int) -> dict[str, AttrValue]:
    if depth > _MAX_DEPTH:
        raise _too_deep()
    out: dict[str, AttrValue] = {}
    while i < end:
        tag, i = _varint(buf, i)
        if tag == 0x0A:
            ln, i = _varint(buf, i)
            k, v = _key_value(buf, i, i + ln, depth + 1)
            out[k] = v
            i += ln
        else:
            i = _skip(buf, i, tag & 7)
    _check(i, end, "KeyValueList")
    return out


def _key_value(buf: bytes, i: int, end: int, depth: int) -> tuple[str, AttrValue]:
    if depth > _MAX_DEPTH:
        raise _too_deep()
    key, value = "", None
    while i < end:
        tag, i = _varint(buf, i)
        if tag == 0x0A:
            ln, i = _varint(buf, i)
            key = _text(buf, i, i + ln)
            i += ln
        elif tag == 0x12:
            ln, i = _varint(buf, i)
            value = _any_value(buf, i, i + ln, depth + 1)
            i += ln
        else:
            i = _skip(buf, i, tag & 7)
    _check(i, end, "KeyValue")
    return key, value


def _usual_key_value(raw: bytes) -> tuple[str, AttrValue] | None:
    """A KeyValue in the shape every encoder writes (key, then a value of one scalar field, lengths
    under 128), read without a loop; None for any other shape. Attributes that are new in every span
    (ids, paths with ids in them) all come this way, so it must not cost much more than protobuf."""
    n = len(raw)
    if n < 4 or raw[0] != 0x0A or raw[1] >= 0x80:
        return None
    j = 2 + raw[1]
    if j + 2 > n or raw[j] != 0x12 or raw[j + 1] != n - j - 2 or raw[j + 1] >= 0x80:
        return None
    try:
        key = raw[2:j].decode()
        j += 2
        if j == n:
            return key, None
        t = raw[j]
        if t == 0x0A:
            if j + 1 < n and raw[j + 1] == n - j - 2 and raw[j + 1] < 0x80:
                return key, raw[j + 2:].decode()
        elif t == 0x18:
            v, e = _varint(raw, j + 1)
            if e == n:
                return key, v - _U64 if v >= _I64_MIN else v
        elif t == 0x21:
            if j + 9 == n:
                return key, _unpack_d(raw, j + 1)[0]
        elif t == 0x10:
            if j + 2 == n and raw[j + 1] < 0x80:
                return key, raw[j + 1] != 0
        elif t == 0x3A:
            if j + 1 < n and raw[j + 1] == n - j - 2 and raw[j + 1] < 0x80:
                return key, raw[j + 2:]
    except UnicodeDecodeError:
        raise DecodeError("string field holds invalid UTF-8") from None
    return None


class OTLPDecoder:
    """Decodes requests. Keeps the decoded form of recent KeyValues (by their bytes) whose value is
    immutable, and of span names. Safe to share between the receiver's threads (a cache miss racing
    another computes the same value twice)."""

    def __init__(self, cache_size: int = 50_000) -> None:
        self._cache_size = cache_size
        self._kv: dict[bytes, tuple[str, AttrValue]] = {}
        self._names: dict[bytes, str] = {}

    def _kv_miss(self, raw: bytes, depth: int) -> tuple[str, AttrValue]:
        """A KeyValue (`depth` messages below the request) not in the cache. Only scalars are cached,
        and their depth never nears the limit, so a cached answer is right at any depth."""
        kv = _usual_key_value(raw)
        if kv is None:
            kv = _key_value(raw, 0, len(raw), depth)
            if isinstance(kv[1], list | dict):
                return kv
        if len(self._kv) >= self._cache_size:
            self._kv.clear()
        self._kv[raw] = kv
        return kv

    def _name_miss(self, raw: bytes) -> str:
        name = _text(raw, 0, len(raw))
        if len(self._names) >= self._cache_size:
            self._names.clear()
        self._names[raw] = name
        return name

    def _attributes(self, buf: bytes, i: int, attrs: dict[str, AttrValue], depth: int) -> int:
        """One KeyValue field's value at buf[i] into attrs; the index after it. (A length past the
        message's end is caught by the caller's end check: the cache maps bytes to their decoding,
        right whatever those bytes are.)"""
        ln, i = _varint(buf, i)
        raw = buf[i:i + ln]
        kv = self._kv.get(raw)
        if kv is None:
            kv = self._kv_miss(raw, depth)
        attrs[kv[0]] = kv[1]
        return i + ln

    def decode(self, data: bytes) -> SpanBatch:
        """The SpanBatch of a serialized ExportTraceServiceRequest; DecodeError if it is not one."""
        try:
            return self._request(bytes(data))
        except (IndexError, struct.error) as e:
            raise DecodeError(f"truncated message ({e})") from None

    def _request(self, buf: bytes) -> SpanBatch:
        out: list[ResourceSpans] = []
        i, end = 0, len(buf)
        while i < end:
            tag, i = _varint(buf, i)
            if tag == 0x0A:
                ln, i = _varint(buf, i)
                out.append(self._resource_spans(buf, i, i + ln))
                i += ln
            else:
                i = _skip(buf, i, tag & 7)
        _check(i, end, "ExportTraceServiceRequest")
        return SpanBatch(out)

    def _resource_spans(self, buf: bytes, i: int, end: int) -> ResourceSpans:
        rs = ResourceSpans(Resource())
        while i < end:
            tag, i = _varint(buf, i)
            if tag == 0x0A:  # resource
                ln, i = _varint(buf, i)
                self._resource(buf, i, i + ln, rs.resource)
                i += ln
            elif tag == 0x12:  # scope_spans
                ln, i = _varint(buf, i)
                rs.scope_spans.append(self._scope_spans(buf, i, i + ln))
                i += ln
            elif tag == 0x1A:  # schema_url
                ln, i = _varint(buf, i)
                rs.schema_url = _text(buf, i, i + ln)
                i += ln
            else:
                i = _skip(buf, i, tag & 7)
        _check(i, end, "ResourceSpans")
        return rs

    def _resource(self, buf: bytes, i: int, end: int, r: Resource) -> None:
        while i < end:
            tag, i = _varint(buf, i)
            if tag == 0x0A:
                i = self._attributes(buf, i, r.attributes, _DEPTH_RESOURCE_KV)
            elif tag == 0x10:
                n, i = _varint(buf, i)
                r.dropped_attributes_count = n & 0xFFFFFFFF
            else:
                i = _skip(buf, i, tag & 7)
        _check(i, end, "Resource")

    def _scope_spans(self, buf: bytes, i: int, end: int) -> ScopeSpans:
        ss = ScopeSpans(Scope())
        spans = ss.spans
        span = self._span
        while i < end:
            tag, i = _varint(buf, i)
            if tag == 0x12:  # spans
                ln, i = _varint(buf, i)
                spans.append(span(buf, i, i + ln))
                i += ln
            elif tag == 0x0A:  # scope
                ln, i = _varint(buf, i)
                self._scope(buf, i, i + ln, ss.scope)
                i += ln
            elif tag == 0x1A:  # schema_url
                ln, i = _varint(buf, i)
                ss.schema_url = _text(buf, i, i + ln)
                i += ln
            else:
                i = _skip(buf, i, tag & 7)
        _check(i, end, "ScopeSpans")
        return ss

    def _scope(self, buf: bytes, i: int, end: int, sc: Scope) -> None:
        while i < end:
            tag, i = _varint(buf, i)
            if tag == 0x0A:
                ln, i = _varint(buf, i)
                sc.name = _text(buf, i, i + ln)
                i += ln
            elif tag == 0x12:
                ln, i = _varint(buf, i)
                sc.version = _text(buf, i, i + ln)
                i += ln
            elif tag == 0x1A:
                i = self._attributes(buf, i, sc.attributes, _DEPTH_SCOPE_KV)
            elif tag == 0x20:
                n, i = _varint(buf, i)
                sc.dropped_attributes_count = n & 0xFFFFFFFF
            else:
                i = _skip(buf, i, tag & 7)
        _check(i, end, "InstrumentationScope")

    def _span(self, buf: bytes, i: int, end: int) -> Span:
        """One Span message, buf[i:end]. The hot loop: fields in the order encoders write them."""
        s = _new_span(Span)
        s.trace_id = s.span_id = s.parent_span_id = b""
        s.trace_state = s.name = s.status_message = ""
        s.flags = s.start_time_unix_nano = s.end_time_unix_nano = 0
        s.kind = KIND_UNSPECIFIED
        s.status_code = STATUS_UNSET
        s.dropped_attributes_count = s.dropped_events_count = s.dropped_links_count = 0
        s._events = s._links = None
        attrs: dict[str, AttrValue] = {}
        s.attributes = attrs
        kv_get, kv_miss = self._kv.get, self._kv_miss
        while i < end:
            tag = buf[i]
            i += 1
            if tag == 0x4A:  # attributes: KeyValue
                ln = buf[i]
                i += 1
                if ln >= 0x80:
                    ln, i = _varint(buf, i - 1)
                j = i + ln
                raw = buf[i:j]
                kv = kv_get(raw)
                if kv is None:
                    kv = kv_miss(raw, _DEPTH_SPAN_KV)
                attrs[kv[0]] = kv[1]
                i = j
            elif tag == 0x0A and buf[i] < 0x80:  # trace_id
                ln = buf[i]
                s.trace_id = buf[i + 1:i + 1 + ln]
                i += 1 + ln
            elif tag == 0x12 and buf[i] < 0x80:  # span_id
                ln = buf[i]
                s.span_id = buf[i + 1:i + 1 + ln]
                i += 1 + ln
            elif tag == 0x2A:  # name
                ln, i = _varint(buf, i)
                j = i + ln
                raw = buf[i:j]
                name = self._names.get(raw)
                s.name = name if name is not None else self._name_miss(raw)
                i = j
            elif tag == 0x30:  # kind
                n, i = _varint(buf, i)
                s.kind = n if n < 0x80 else _int32(n)
            elif tag == 0x39 and i + 17 <= end:  # start_time_unix_nano, usually followed by the end time
                start, nxt, stop = _unpack_times(buf, i)
                s.start_time_unix_nano = start
                if nxt == 0x41:
                    s.end_time_unix_nano = stop
                    i += 17
                else:
                    i += 8
            elif tag == 0x41:  # end_time_unix_nano
                s.end_time_unix_nano = _unpack_q(buf, i)[0]
                i += 8
            elif tag == 0x22 and buf[i] < 0x80:  # parent_span_id
                ln = buf[i]
                s.parent_span_id = buf[i + 1:i + 1 + ln]
                i += 1 + ln
            elif tag == 0x7A:  # status
                ln, i = _varint(buf, i)
                self._status(buf, i, i + ln, s)
                i += ln
            else:
                i = self._span_rare(buf, i - 1, end, s)
        _check(i, end, "Span")
        return s

    def _span_rare(self, buf: bytes, i: int, end: int, s: Span) -> int:
        """The Span fields few spans have (and long ids); the index after the field at buf[i]."""
        tag, i = _varint(buf, i)
        if tag in (0x0A, 0x12, 0x22):  # an id of 128 bytes or more (length in a long varint)
            ln, i = _varint(buf, i)
            raw = buf[i:i + ln]
            if tag == 0x0A:
                s.trace_id = raw
            elif tag == 0x12:
                s.span_id = raw
            else:
                s.parent_span_id = raw
            return i + ln
        if tag == 0x1A:  # trace_state
            ln, i = _varint(buf, i)
            s.trace_state = _text(buf, i, i + ln)
            return i + ln
        if tag == (16 << 3) | 5:  # flags
            s.flags = _unpack_i(buf, i)[0]
            return i + 4
        if tag == 0x50:
            n, i = _varint(buf, i)
            s.dropped_attributes_count = n & 0xFFFFFFFF
            return i
        if tag == 0x5A:  # events
            ln, i = _varint(buf, i)
            s.events.append(self._event(buf, i, i + ln))
            return i + ln
        if tag == 0x60:
            n, i = _varint(buf, i)
            s.dropped_events_count = n & 0xFFFFFFFF
            return i
        if tag == 0x6A:  # links
            ln, i = _varint(buf, i)
            s.links.append(self._link(buf, i, i + ln))
            return i + ln
        if tag == 0x70:
            n, i = _varint(buf, i)
            s.dropped_links_count = n & 0xFFFFFFFF
            return i
        if tag == 0x39:  # start time at the end of the message (no room for the usual layout)
            s.start_time_unix_nano = _unpack_q(buf, i)[0]
            return i + 8
        return _skip(buf, i, tag & 7)

    def _status(self, buf: bytes, i: int, end: int, s: Span) -> None:
        while i < end:
            tag, i = _varint(buf, i)
            if tag == 0x12:
                ln, i = _varint(buf, i)
                s.status_message = _text(buf, i, i + ln)
                i += ln
            elif tag == 0x18:
                n, i = _varint(buf, i)
                s.status_code = _int32(n)
            else:
                i = _skip(buf, i, tag & 7)
        _check(i, end, "Status")

    def _event(self, buf: bytes, i: int, end: int) -> Event:
        e = Event("", 0)
        while i < end:
            tag, i = _varint(buf, i)
            if tag == 0x09:
                e.time_unix_nano = _unpack_q(buf, i)[0]
                i += 8
            elif tag == 0x12:
                ln, i = _varint(buf, i)
                e.name = _text(buf, i, i + ln)
                i += ln
            elif tag == 0x1A:
                i = self._attributes(buf, i, e.attributes, _DEPTH_EVENT_KV)
            elif tag == 0x20:
                n, i = _varint(buf, i)
                e.dropped_attributes_count = n & 0xFFFFFFFF
            else:
                i = _skip(buf, i, tag & 7)
        _check(i, end, "Span.Event")
        return e

    def _link(self, buf: bytes, i: int, end: int) -> Link:
        lk = Link(b"", b"")
        while i < end:
            tag, i = _varint(buf, i)
            if tag == 0x0A:
                ln, i = _varint(buf, i)
                lk.trace_id = buf[i:i + ln]
                i += ln
            elif tag == 0x12:
                ln, i = _varint(buf, i)
                lk.span_id = buf[i:i + ln]
                i += ln
            elif tag == 0x1A:
                ln, i = _varint(buf, i)
                lk.trace_state = _text(buf, i, i + ln)
                i += ln
            elif tag == 0x22:
                i = self._attributes(buf, i, lk.attributes, _DEPTH_LINK_KV)
            elif tag == 0x28:
                n, i = _varint(buf, i)
                lk.dropped_attributes_count = n & 0xFFFFFFFF
            elif tag == 0x35:
                lk.flags = _unpack_i(buf, i)[0]
                i += 4
            else:
                i = _skip(buf, i, tag & 7)
        _check(i, end, "Span.Link")
        return lk


def count_spans(data: bytes) -> int:
    """How many Span fields a request holds, read without decoding them: what an undecodable request
    is counted as refused. Stops quietly where the message stops making sense."""
    buf = bytes(data)
    n = 0
    try:
        for rs_start, rs_end in _fields_of(buf, 0, len(buf), 0x0A):  # resource_spans
            for ss_start, ss_end in _fields_of(buf, rs_start, rs_end, 0x12):  # scope_spans
                n += sum(1 for _ in _fields_of(buf, ss_start, ss_end, 0x12))  # spans
    except (IndexError, DecodeError):
        pass
    return n


def _fields_of(buf: bytes, i: int, end: int, want: int) -> list[tuple[int, int]]:
    """(start, end) of each length-delimited field with tag `want` in buf[i:end]."""
    out: list[tuple[int, int]] = []
    end = min(end, len(buf))
    while i < end:
        tag, i = _varint(buf, i)
        if tag == want:
            ln, i = _varint(buf, i)
            if i + ln > end:
                raise DecodeError("field past the end of its message")
            out.append((i, i + ln))
            i += ln
        else:
            i = _skip(buf, i, tag & 7)
    return out
