"""The span batch model that flows through pipelines, and its OTLP protobuf and JSON forms.

A batch mirrors OTLP's shape (resource → scope → spans) so that conversion is a straight walk.
Spans are plain slotted objects: receivers build them cheaply and exporters convert once per batch.
Ids are raw bytes (16 for traces, 8 for spans; b"" for "no parent").
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1 import common_pb2

AttrValue = Any  # str | bool | int | float | bytes | list[AttrValue] | dict[str, AttrValue] | None

# OTLP Span.SpanKind
KIND_UNSPECIFIED, KIND_INTERNAL, KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = range(6)
KIND_NAMES = {0: "Unspecified", 1: "Internal", 2: "Server", 3: "Client", 4: "Producer", 5: "Consumer"}
# OTLP Status.StatusCode
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
STATUS_NAMES = {0: "Unset", 1: "Ok", 2: "Error"}


class Event:
    __slots__ = ("name", "time_unix_nano", "attributes", "dropped_attributes_count")

    def __init__(self, name: str, time_unix_nano: int, attributes: dict[str, AttrValue] | None = None,
                 dropped_attributes_count: int = 0) -> None:
        self.name = name
        self.time_unix_nano = time_unix_nano
        self.attributes = attributes if attributes is not None else {}
        self.dropped_attributes_count = dropped_attributes_count


class Link:
    __slots__ = ("trace_id", "span_id", "trace_state", "attributes", "flags", "dropped_attributes_count")

    def __init__(self, trace_id: bytes, span_id: bytes, trace_state: str = "",
                 attributes: dict[str, AttrValue] | None = None, flags: int = 0,
                 dropped_attributes_count: int = 0) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.trace_state = trace_state
        self.attributes = attributes if attributes is not None else {}
        self.flags = flags
        self.dropped_attributes_count = dropped_attributes_count


class Span:
    """One span. `events` and `links` are lists, made on first use: most spans have neither, and
    two empty lists per span would double the objects the garbage collector has to walk."""

    __slots__ = (
        "trace_id", "span_id", "parent_span_id", "trace_state", "flags", "name", "kind",
        "start_time_unix_nano", "end_time_unix_nano", "attributes", "_events", "_links",
        "status_code", "status_message", "dropped_attributes_count", "dropped_events_count",
        "dropped_links_count",
    )

    def __init__(self, trace_id: bytes, span_id: bytes, name: str, *, parent_span_id: bytes = b"",
                 kind: int = KIND_INTERNAL, start_time_unix_nano: int = 0, end_time_unix_nano: int = 0,
                 attributes: dict[str, AttrValue] | None = None, events: list[Event] | None = None,
                 links: list[Link] | None = None, status_code: int = STATUS_UNSET,
                 status_message: str = "", trace_state: str = "", flags: int = 0,
                 dropped_attributes_count: int = 0, dropped_events_count: int = 0,
                 dropped_links_count: int = 0) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.trace_state = trace_state
        self.flags = flags
        self.name = name
        self.kind = kind
        self.start_time_unix_nano = start_time_unix_nano
        self.end_time_unix_nano = end_time_unix_nano
        self.attributes = attributes if attributes is not None else {}
        self._events = events  # None: no list made yet (the same as an empty one)
        self._links = links
        self.status_code = status_code
        self.status_message = status_message
        self.dropped_attributes_count = dropped_attributes_count
        self.dropped_events_count = dropped_events_count
        self.dropped_links_count = dropped_links_count

    @property
    def events(self) -> list[Event]:
        if self._events is None:
            self._events = []
        return self._events

    @events.setter
    def events(self, value: list[Event]) -> None:
        self._events = value

    @property
    def links(self) -> list[Link]:
        if self._links is None:
            self._links = []
        return self._links

    @links.setter
    def links(self, value: list[Link]) -> None:
        self._links = value

    def copy(self) -> Span:
        s = Span.__new__(Span)
        for k in Span.__slots__:
            setattr(s, k, getattr(self, k))
        s.attributes = dict(self.attributes)
        s._events = list(self._events) if self._events else None
        s._links = list(self._links) if self._links else None
        return s


def make_span(trace_id: bytes, span_id: bytes, name: str, parent_span_id: bytes, kind: int,
              start_time_unix_nano: int, end_time_unix_nano: int, attributes: dict[str, AttrValue],
              status_code: int, flags: int) -> Span:
    """Span(...) for receivers' per-event loops: positional, the rest at defaults (~2x cheaper)."""
    s = _new_span(Span)
    s.trace_id = trace_id
    s.span_id = span_id
    s.parent_span_id = parent_span_id
    s.trace_state = ""
    s.flags = flags
    s.name = name
    s.kind = kind
    s.start_time_unix_nano = start_time_unix_nano
    s.end_time_unix_nano = end_time_unix_nano
    s.attributes = attributes
    s._events = None
    s._links = None
    s.status_code = status_code
    s.status_message = ""
    s.dropped_attributes_count = 0
    s.dropped_events_count = 0
    s.dropped_links_count = 0
    return s


_new_span = Span.__new__


class Scope:
    __slots__ = ("name", "version", "attributes", "dropped_attributes_count")

    def __init__(self, name: str = "", version: str = "", attributes: dict[str, AttrValue] | None = None,
                 dropped_attributes_count: int = 0) -> None:
        self.name = name
        self.version = version
        self.attributes = attributes if attributes is not None else {}
        self.dropped_attributes_count = dropped_attributes_count


class ScopeSpans:
    __slots__ = ("scope", "spans", "schema_url")

    def __init__(self, scope: Scope, spans: list[Span] | None = None, schema_url: str = "") -> None:
        self.scope = scope
        self.spans = spans if spans is not None else []
        self.schema_url = schema_url


class Resource:
    __slots__ = ("attributes", "dropped_attributes_count")

    def __init__(self, attributes: dict[str, AttrValue] | None = None, dropped_attributes_count: int = 0) -> None:
        self.attributes = attributes if attributes is not None else {}
        self.dropped_attributes_count = dropped_attributes_count


class ResourceSpans:
    __slots__ = ("resource", "scope_spans", "schema_url")

    def __init__(self, resource: Resource, scope_spans: list[ScopeSpans] | None = None,
                 schema_url: str = "") -> None:
        self.resource = resource
        self.scope_spans = scope_spans if scope_spans is not None else []
        self.schema_url = schema_url


class SpanBatch:
    """What moves between components: spans grouped by resource and scope."""

    __slots__ = ("resource_spans",)

    def __init__(self, resource_spans: list[ResourceSpans] | None = None) -> None:
        self.resource_spans = resource_spans if resource_spans is not None else []

    def span_count(self) -> int:
        return sum(len(ss.spans) for rs in self.resource_spans for ss in rs.scope_spans)

    def iter_spans(self) -> Iterator[tuple[ResourceSpans, ScopeSpans, Span]]:
        for rs in self.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    yield rs, ss, span

    def copy(self) -> SpanBatch:
        """A copy deep enough for a mutating consumer: containers and spans, not attribute values."""
        return SpanBatch([
            ResourceSpans(Resource(dict(rs.resource.attributes), rs.resource.dropped_attributes_count),
                          [ScopeSpans(ss.scope, [s.copy() for s in ss.spans], ss.schema_url)
                           for ss in rs.scope_spans], rs.schema_url)
            for rs in self.resource_spans])

    def filter_spans(self, keep: Any) -> SpanBatch:
        """A batch holding the spans for which keep(resource_spans, scope_spans, span) is true."""
        out: list[ResourceSpans] = []
        for rs in self.resource_spans:
            sss = []
            for ss in rs.scope_spans:
                kept = [s for s in ss.spans if keep(rs, ss, s)]
                if kept:
                    sss.append(ScopeSpans(ss.scope, kept, ss.schema_url))
            if sss:
                out.append(ResourceSpans(rs.resource, sss, rs.schema_url))
        return SpanBatch(out)

    @staticmethod
    def merge(batches: list[SpanBatch]) -> SpanBatch:
        out: list[ResourceSpans] = []
        for b in batches:
            out.extend(b.resource_spans)
        return SpanBatch(out)

    def split(self, max_spans: int) -> list[SpanBatch]:
        """Split into batches of at most max_spans spans, keeping resource/scope grouping."""
        if max_spans <= 0 or self.span_count() <= max_spans:
            return [self]
        result: list[SpanBatch] = []
        cur: list[ResourceSpans] = []
        n = 0
        for rs in self.resource_spans:
            for ss in rs.scope_spans:
                spans = ss.spans
                i = 0
                while i < len(spans):
                    take = spans[i:i + (max_spans - n)]
                    i += len(take)
                    if cur and cur[-1].resource is rs.resource:
                        cur[-1].scope_spans.append(ScopeSpans(ss.scope, take, ss.schema_url))
                    else:
                        cur.append(ResourceSpans(rs.resource, [ScopeSpans(ss.scope, take, ss.schema_url)],
                                                 rs.schema_url))
                    n += len(take)
                    if n >= max_spans:
                        result.append(SpanBatch(cur))
                        cur, n = [], 0
        if cur:
            result.append(SpanBatch(cur))
        return result


# ---------------------------------------------------------------- OTLP protobuf


def _any_value(v: AttrValue) -> common_pb2.AnyValue:
    out = common_pb2.AnyValue()
    _fill_any(out, v)
    return out


def _fill_any(out: common_pb2.AnyValue, v: AttrValue) -> None:
    # bool before int: bool is an int in Python.
    if isinstance(v, str):
        out.string_value = v
    elif isinstance(v, bool):
        out.bool_value = v
    elif isinstance(v, int):
        out.int_value = v
    elif isinstance(v, float):
        out.double_value = v
    elif isinstance(v, bytes | bytearray):
        out.bytes_value = bytes(v)
    elif isinstance(v, list | tuple):
        arr = out.array_value
        arr.SetInParent()
        for item in v:
            _fill_any(arr.values.add(), item)
    elif isinstance(v, dict):
        kvl = out.kvlist_value
        kvl.SetInParent()
        for k, item in v.items():
            kv = kvl.values.add()
            kv.key = k
            _fill_any(kv.value, item)
    elif v is None:
        pass
    else:
        out.string_value = str(v)


def _fill_attrs(repeated: Any, attrs: dict[str, AttrValue]) -> None:
    for k, v in attrs.items():
        kv = repeated.add()
        kv.key = k
        _fill_any(kv.value, v)


def _from_any(v: common_pb2.AnyValue) -> AttrValue:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_from_any(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _from_any(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def _from_attrs(repeated: Any) -> dict[str, AttrValue]:
    return {kv.key: _from_any(kv.value) for kv in repeated}


def to_proto(batch: SpanBatch) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    for rs in batch.resource_spans:
        prs = req.resource_spans.add()
        _fill_attrs(prs.resource.attributes, rs.resource.attributes)
        prs.resource.dropped_attributes_count = rs.resource.dropped_attributes_count
        prs.schema_url = rs.schema_url
        for ss in rs.scope_spans:
            pss = prs.scope_spans.add()
            pss.scope.name = ss.scope.name
            pss.scope.version = ss.scope.version
            _fill_attrs(pss.scope.attributes, ss.scope.attributes)
            pss.scope.dropped_attributes_count = ss.scope.dropped_attributes_count
            pss.schema_url = ss.schema_url
            for s in ss.spans:
                ps = pss.spans.add()
                ps.trace_id = s.trace_id
                ps.span_id = s.span_id
                if s.parent_span_id:
                    ps.parent_span_id = s.parent_span_id
                if s.trace_state:
                    ps.trace_state = s.trace_state
                if s.flags:
                    ps.flags = s.flags
                ps.name = s.name
                ps.kind = s.kind  # type: ignore[assignment]
                ps.start_time_unix_nano = s.start_time_unix_nano
                ps.end_time_unix_nano = s.end_time_unix_nano
                _fill_attrs(ps.attributes, s.attributes)
                ps.dropped_attributes_count = s.dropped_attributes_count
                for e in s.events:
                    pe = ps.events.add()
                    pe.name = e.name
                    pe.time_unix_nano = e.time_unix_nano
                    _fill_attrs(pe.attributes, e.attributes)
                    pe.dropped_attributes_count = e.dropped_attributes_count
                ps.dropped_events_count = s.dropped_events_count
                for lk in s.links:
                    pl = ps.links.add()
                    pl.trace_id = lk.trace_id
                    pl.span_id = lk.span_id
                    pl.trace_state = lk.trace_state
                    _fill_attrs(pl.attributes, lk.attributes)
                    pl.dropped_attributes_count = lk.dropped_attributes_count
                    if lk.flags:
                        pl.flags = lk.flags
                ps.dropped_links_count = s.dropped_links_count
                if s.status_code or s.status_message:
                    ps.status.code = s.status_code  # type: ignore[assignment]
                    ps.status.message = s.status_message
    return req


def from_proto(req: ExportTraceServiceRequest) -> SpanBatch:
    out: list[ResourceSpans] = []
    for prs in req.resource_spans:
        rs = ResourceSpans(Resource(_from_attrs(prs.resource.attributes), prs.resource.dropped_attributes_count),
                           schema_url=prs.schema_url)
        for pss in prs.scope_spans:
            scope = Scope(pss.scope.name, pss.scope.version, _from_attrs(pss.scope.attributes),
                          pss.scope.dropped_attributes_count)
            spans = []
            for ps in pss.spans:
                spans.append(Span(
                    ps.trace_id, ps.span_id, ps.name, parent_span_id=ps.parent_span_id, kind=ps.kind,
                    start_time_unix_nano=ps.start_time_unix_nano, end_time_unix_nano=ps.end_time_unix_nano,
                    attributes=_from_attrs(ps.attributes),
                    events=[Event(e.name, e.time_unix_nano, _from_attrs(e.attributes), e.dropped_attributes_count)
                            for e in ps.events],
                    links=[Link(lk.trace_id, lk.span_id, lk.trace_state, _from_attrs(lk.attributes), lk.flags,
                                lk.dropped_attributes_count) for lk in ps.links],
                    status_code=ps.status.code, status_message=ps.status.message,
                    trace_state=ps.trace_state, flags=ps.flags,
                    dropped_attributes_count=ps.dropped_attributes_count,
                    dropped_events_count=ps.dropped_events_count, dropped_links_count=ps.dropped_links_count))
            rs.scope_spans.append(ScopeSpans(scope, spans, pss.schema_url))
        out.append(rs)
    return SpanBatch(out)


# ---------------------------------------------------------------- OTLP/JSON
# The OTLP/JSON mapping: lowerCamelCase keys, ids as hex, 64-bit integers as strings, enums as ints.


def _json_any(v: AttrValue) -> dict[str, Any]:
    if isinstance(v, str):
        return {"stringValue": v}
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    if isinstance(v, bytes | bytearray):
        return {"bytesValue": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, list | tuple):
        return {"arrayValue": {"values": [_json_any(x) for x in v]}}
    if isinstance(v, dict):
        return {"kvlistValue": {"values": _json_attrs(v)}}
    if v is None:
        return {}
    return {"stringValue": str(v)}


def _json_attrs(attrs: dict[str, AttrValue]) -> list[dict[str, Any]]:
    return [{"key": k, "value": _json_any(v)} for k, v in attrs.items()]


def to_json_dict(batch: SpanBatch) -> dict[str, Any]:
    rss = []
    for rs in batch.resource_spans:
        sss = []
        for ss in rs.scope_spans:
            spans = []
            for s in ss.spans:
                d: dict[str, Any] = {
                    "traceId": s.trace_id.hex(),
                    "spanId": s.span_id.hex(),
                }
                if s.trace_state:
                    d["traceState"] = s.trace_state
                if s.parent_span_id:
                    d["parentSpanId"] = s.parent_span_id.hex()
                if s.flags:
                    d["flags"] = s.flags
                d["name"] = s.name
                d["kind"] = s.kind
                d["startTimeUnixNano"] = str(s.start_time_unix_nano)
                d["endTimeUnixNano"] = str(s.end_time_unix_nano)
                if s.attributes:
                    d["attributes"] = _json_attrs(s.attributes)
                if s.dropped_attributes_count:
                    d["droppedAttributesCount"] = s.dropped_attributes_count
                if s.events:
                    d["events"] = [{"timeUnixNano": str(e.time_unix_nano), "name": e.name,
                                    **({"attributes": _json_attrs(e.attributes)} if e.attributes else {})}
                                   for e in s.events]
                if s.links:
                    d["links"] = [{"traceId": lk.trace_id.hex(), "spanId": lk.span_id.hex(),
                                   **({"traceState": lk.trace_state} if lk.trace_state else {}),
                                   **({"attributes": _json_attrs(lk.attributes)} if lk.attributes else {})}
                                  for lk in s.links]
                status: dict[str, Any] = {}
                if s.status_message:
                    status["message"] = s.status_message
                if s.status_code:
                    status["code"] = s.status_code
                d["status"] = status
                spans.append(d)
            scope: dict[str, Any] = {}
            if ss.scope.name:
                scope["name"] = ss.scope.name
            if ss.scope.version:
                scope["version"] = ss.scope.version
            if ss.scope.attributes:
                scope["attributes"] = _json_attrs(ss.scope.attributes)
            entry: dict[str, Any] = {"scope": scope, "spans": spans}
            if ss.schema_url:
                entry["schemaUrl"] = ss.schema_url
            sss.append(entry)
        rentry: dict[str, Any] = {"resource": {"attributes": _json_attrs(rs.resource.attributes)}
                                  if rs.resource.attributes else {}, "scopeSpans": sss}
        if rs.schema_url:
            rentry["schemaUrl"] = rs.schema_url
        rss.append(rentry)
    return {"resourceSpans": rss}


def to_json_line(batch: SpanBatch) -> str:
    return json.dumps(to_json_dict(batch), separators=(",", ":"))


def _from_json_any(d: dict[str, Any]) -> AttrValue:
    if not d:
        return None
    (k, v), = d.items()
    if k == "intValue":
        return int(v)
    if k == "bytesValue":
        return base64.b64decode(v)
    if k == "arrayValue":
        return [_from_json_any(x) for x in v.get("values", [])]
    if k == "kvlistValue":
        return {kv["key"]: _from_json_any(kv.get("value", {})) for kv in v.get("values", [])}
    if k == "doubleValue":
        return float(v)
    return v


def _from_json_attrs(lst: list[dict[str, Any]] | None) -> dict[str, AttrValue]:
    return {kv["key"]: _from_json_any(kv.get("value", {})) for kv in (lst or [])}


def from_json_dict(doc: dict[str, Any]) -> SpanBatch:
    """Parse one OTLP/JSON ExportTraceServiceRequest (as the file exporter writes it)."""
    out: list[ResourceSpans] = []
    for rsd in doc.get("resourceSpans", []):
        rs = ResourceSpans(Resource(_from_json_attrs(rsd.get("resource", {}).get("attributes"))),
                           schema_url=rsd.get("schemaUrl", ""))
        for ssd in rsd.get("scopeSpans", []):
            sc = ssd.get("scope", {})
            scope = Scope(sc.get("name", ""), sc.get("version", ""), _from_json_attrs(sc.get("attributes")))
            spans = []
            for d in ssd.get("spans", []):
                st = d.get("status", {})
                spans.append(Span(
                    bytes.fromhex(d.get("traceId", "")), bytes.fromhex(d.get("spanId", "")), d.get("name", ""),
                    parent_span_id=bytes.fromhex(d.get("parentSpanId", "")), kind=int(d.get("kind", 0)),
                    start_time_unix_nano=int(d.get("startTimeUnixNano", 0)),
                    end_time_unix_nano=int(d.get("endTimeUnixNano", 0)),
                    attributes=_from_json_attrs(d.get("attributes")),
                    events=[Event(e.get("name", ""), int(e.get("timeUnixNano", 0)),
                                  _from_json_attrs(e.get("attributes"))) for e in d.get("events", [])],
                    links=[Link(bytes.fromhex(lk["traceId"]), bytes.fromhex(lk["spanId"]),
                                lk.get("traceState", ""), _from_json_attrs(lk.get("attributes")))
                           for lk in d.get("links", [])],
                    status_code=int(st.get("code", 0)), status_message=st.get("message", ""),
                    trace_state=d.get("traceState", ""), flags=int(d.get("flags", 0))))
            rs.scope_spans.append(ScopeSpans(scope, spans, ssd.get("schemaUrl", "")))
        out.append(rs)
    return SpanBatch(out)
