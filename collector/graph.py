"""Pipelines → component instances, wired by plain synchronous calls.

As in the collector: one receiver or exporter instance per id, shared by every pipeline that names
it (fan-out from a receiver, fan-in to an exporter); processors are instantiated per pipeline, so a
batch processor's buffer belongs to one pipeline. The graph knows no component by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from collector.component import (
    Component,
    ComponentID,
    Consumer,
    Exporter,
    Extension,
    Host,
    Kind,
    Processor,
    Receiver,
)
from collector.config import Config
from collector.errors import ConsumerError
from collector.spans import SpanBatch
from collector.telemetry import ComponentTelemetry, SelfMetrics


class FanOut:
    """Hands one batch to several consumers; a mutating consumer gets its own copy."""

    def __init__(self, consumers: list[Consumer]) -> None:
        self.consumers = consumers
        # The last mutating consumer may take the original when nobody after it reads it.
        self._needs_copy = [getattr(c, "mutates_data", False) for c in consumers]
        self.mutates_data = False

    def consume(self, batch: SpanBatch) -> None:
        if len(self.consumers) == 1:
            self.consumers[0].consume(batch)
            return
        first_error: ConsumerError | None = None
        for c, copy in zip(self.consumers, self._needs_copy, strict=True):
            try:
                c.consume(batch.copy() if copy else batch)
            except ConsumerError as e:
                first_error = first_error or e
        if first_error is not None:
            raise first_error


class _CountIncoming:
    """Counts otelcol_processor_incoming_items in front of a processor."""

    def __init__(self, proc: Processor, metrics: SelfMetrics) -> None:
        self.proc = proc
        self.mutates_data = proc.mutates_data
        self._inc = metrics.processor_incoming.labels(processor=str(proc.id), otel_signal="traces").inc

    def consume(self, batch: SpanBatch) -> None:
        self._inc(batch.span_count())
        self.proc.consume(batch)


class _CountOutgoing:
    """Counts otelcol_processor_outgoing_items behind a processor."""

    def __init__(self, pid: ComponentID, next_consumer: Consumer, metrics: SelfMetrics) -> None:
        self.next = next_consumer
        self.mutates_data = getattr(next_consumer, "mutates_data", False)
        self._inc = metrics.processor_outgoing.labels(processor=str(pid), otel_signal="traces").inc

    def consume(self, batch: SpanBatch) -> None:
        self._inc(batch.span_count())
        self.next.consume(batch)


@dataclass
class PipelineInstance:
    id: str
    head: Consumer
    processors: list[Processor] = field(default_factory=list)


class Graph:
    def __init__(self, config: Config, metrics: SelfMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.extensions: dict[ComponentID, Extension] = {}
        self.exporters: dict[ComponentID, Exporter] = {}
        self.receivers: dict[ComponentID, Receiver] = {}
        self.pipelines: list[PipelineInstance] = []
        self._build()

    def _telemetry(self, kind: Kind, cid: ComponentID) -> ComponentTelemetry:
        return ComponentTelemetry(kind.value, str(cid), self.metrics)

    def _build(self) -> None:
        cfg = self.config
        for eid in cfg.extensions:
            spec = cfg.spec(Kind.EXTENSION, eid)
            self.extensions[eid] = cast(Extension, spec.factory.create(eid, spec.config, self._telemetry(Kind.EXTENSION, eid)))
        used_exporters = {e for p in cfg.pipelines for e in p.exporters}
        for xid in sorted(used_exporters):
            spec = cfg.spec(Kind.EXPORTER, xid)
            self.exporters[xid] = cast(Exporter, spec.factory.create(xid, spec.config, self._telemetry(Kind.EXPORTER, xid)))
        heads_by_receiver: dict[ComponentID, list[Consumer]] = {}
        for p in cfg.pipelines:
            nxt: Consumer = FanOut([self.exporters[x] for x in p.exporters])
            procs: list[Processor] = []
            for pid in reversed(p.processors):
                spec = cfg.spec(Kind.PROCESSOR, pid)
                proc = cast(Processor, spec.factory.create(pid, spec.config, self._telemetry(Kind.PROCESSOR, pid),
                                                           _CountOutgoing(pid, nxt, self.metrics)))
                procs.insert(0, proc)
                nxt = _CountIncoming(proc, self.metrics)
            self.pipelines.append(PipelineInstance(p.id, nxt, procs))
            for rid in p.receivers:
                heads_by_receiver.setdefault(rid, []).append(nxt)
        for rid in sorted(heads_by_receiver):
            spec = cfg.spec(Kind.RECEIVER, rid)
            self.receivers[rid] = cast(Receiver, spec.factory.create(
                rid, spec.config, self._telemetry(Kind.RECEIVER, rid), FanOut(heads_by_receiver[rid])))

    def start_order(self) -> list[tuple[str, Component]]:
        """Extensions, exporters, processors (back to front), then receivers."""
        out: list[tuple[str, Component]] = [("extension", e) for e in self.extensions.values()]
        out += [("exporter", x) for x in self.exporters.values()]
        for p in self.pipelines:
            out += [("processor", proc) for proc in reversed(p.processors)]
        out += [("receiver", r) for r in self.receivers.values()]
        return out

    def stop_order(self) -> list[tuple[str, Component]]:
        """Receivers first so nothing new arrives; processors front to back so held data drains."""
        out: list[tuple[str, Component]] = [("receiver", r) for r in self.receivers.values()]
        for p in self.pipelines:
            out += [("processor", proc) for proc in p.processors]
        out += [("exporter", x) for x in self.exporters.values()]
        out += [("extension", e) for e in reversed(list(self.extensions.values()))]
        return out

    def get_extension(self, id: ComponentID) -> Any:
        return self.extensions.get(id)


__all__ = ["Graph", "FanOut", "Host"]
