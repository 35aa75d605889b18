"""`debug` exporter (also accepted as the old `logging`): write spans to the log, for people reading them."""

from __future__ import annotations

import sys
import threading
import time
from typing import Literal, TextIO

from pydantic import Field

from collector.component import ComponentConfig, ComponentID, Exporter, Factory, Kind
from collector.spans import KIND_NAMES, STATUS_NAMES, AttrValue, SpanBatch
from collector.telemetry import ComponentTelemetry


class Config(ComponentConfig):
    verbosity: Literal["basic", "normal", "detailed"] = Field(
        "basic", description="basic: counts per batch; normal: a line per span; detailed: every field")
    sampling_initial: int = Field(2, description="batches logged each second before sampling starts")
    sampling_thereafter: int = Field(1, description="then log every n-th batch of that second")
    use_internal_logger: bool = Field(True, description="false: write to standard output instead of the log")


def _fmt_value(v: AttrValue) -> str:
    if isinstance(v, str):
        return f"Str({v})"
    if isinstance(v, bool):
        return f"Bool({str(v).lower()})"
    if isinstance(v, int):
        return f"Int({v})"
    if isinstance(v, float):
        return f"Double({v})"
    if isinstance(v, bytes | bytearray):
        return f"Bytes({bytes(v).hex()})"
    if isinstance(v, list | tuple):
        return "Slice([" + ", ".join(_plain(x) for x in v) + "])"
    if isinstance(v, dict):
        return "Map({" + ", ".join(f"{k}:{_plain(x)}" for k, x in v.items()) + "})"
    return "Empty()"


def _plain(v: AttrValue) -> str:
    return v if isinstance(v, str) else repr(v)


def _flat(attrs: dict[str, AttrValue]) -> str:
    return " ".join(f"{k}={_plain(v)}" for k, v in attrs.items())


def _ts(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 1_000_000_000:09d} +0000 UTC"


def render(batch: SpanBatch, verbosity: str) -> str:
    lines: list[str] = []
    if verbosity == "normal":
        for i, rs in enumerate(batch.resource_spans):
            lines.append(f"ResourceTraces #{i} {_flat(rs.resource.attributes)}".rstrip())
            for j, ss in enumerate(rs.scope_spans):
                lines.append(f"ScopeTraces #{j} {ss.scope.name} {ss.scope.version}".rstrip())
                for s in ss.spans:
                    lines.append(f"{s.name} {s.trace_id.hex()} {s.span_id.hex()} {_flat(s.attributes)}".rstrip())
        return "\n".join(lines)
    for i, rs in enumerate(batch.resource_spans):
        lines.append(f"ResourceSpans #{i}")
        lines.append(f"Resource SchemaURL: {rs.schema_url}")
        if rs.resource.attributes:
            lines.append("Resource attributes:")
            lines += [f"     -> {k}: {_fmt_value(v)}" for k, v in rs.resource.attributes.items()]
        for j, ss in enumerate(rs.scope_spans):
            lines.append(f"ScopeSpans #{j}")
            lines.append(f"ScopeSpans SchemaURL: {ss.schema_url}")
            lines.append(f"InstrumentationScope {ss.scope.name} {ss.scope.version}".rstrip())
            for k, s in enumerate(ss.spans):
                lines += [
                    f"Span #{k}",
                    f"    Trace ID       : {s.trace_id.hex()}",
                    f"    Parent ID      : {s.parent_span_id.hex()}",
                    f"    ID             : {s.span_id.hex()}",
                    f"    Name           : {s.name}",
                    f"    Kind           : {KIND_NAMES.get(s.kind, str(s.kind))}",
                    f"    Start time     : {_ts(s.start_time_unix_nano)}",
                    f"    End time       : {_ts(s.end_time_unix_nano)}",
                    f"    Status code    : {STATUS_NAMES.get(s.status_code, str(s.status_code))}",
                    f"    Status message : {s.status_message}",
                ]
                if s.attributes:
                    lines.append("Attributes:")
                    lines += [f"     -> {a}: {_fmt_value(v)}" for a, v in s.attributes.items()]
                for n, e in enumerate(s.events):
                    lines += [f"SpanEvent #{n}", f"     -> Name: {e.name}", f"     -> Timestamp: {_ts(e.time_unix_nano)}"]
                    lines += [f"     -> {a}: {_fmt_value(v)}" for a, v in e.attributes.items()]
                for n, lk in enumerate(s.links):
                    lines += [f"SpanLink #{n}", f"     -> Trace ID: {lk.trace_id.hex()}", f"     -> ID: {lk.span_id.hex()}"]
    return "\n".join(lines)


class DebugExporter(Exporter):
    def __init__(self, id: ComponentID, config: Config, telemetry: ComponentTelemetry,
                 stream: TextIO | None = None) -> None:
        super().__init__(id, telemetry)
        self.config = config
        self._stream = stream
        self._lock = threading.Lock()
        self._second = 0
        self._in_second = 0
        self._sent = telemetry.metrics.exporter_sent.labels(exporter=str(id))

    def _sampled(self) -> bool:
        """Like zap's sampler: the first `sampling_initial` per second, then every `thereafter`-th."""
        now = int(time.monotonic())
        with self._lock:
            if now != self._second:
                self._second, self._in_second = now, 0
            self._in_second += 1
            n = self._in_second
        c = self.config
        return n <= c.sampling_initial or (c.sampling_thereafter > 0 and (n - c.sampling_initial) % c.sampling_thereafter == 0)

    def consume(self, batch: SpanBatch) -> None:
        n = batch.span_count()
        if self._sampled():
            summary = {"resource spans": len(batch.resource_spans), "spans": n}
            body = "" if self.config.verbosity == "basic" else render(batch, self.config.verbosity)
            if self.config.use_internal_logger and self._stream is None:
                self.telemetry.logger.info("Traces" + ("\n" + body if body else ""), extra=summary)
            else:
                out = self._stream or sys.stdout
                with self._lock:
                    out.write(f"Traces {summary}\n" + (body + "\n" if body else ""))
                    out.flush()
        self._sent.inc(n)


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry) -> DebugExporter:
    return DebugExporter(id, config, telemetry)


factory = Factory(type="debug", kind=Kind.EXPORTER, config_model=Config, create=_create, stability="development",
                  aliases=("logging",), description="writes spans to the log (basic, normal or detailed)")
