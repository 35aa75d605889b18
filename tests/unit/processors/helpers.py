"""Small builders for processor tests."""

from __future__ import annotations

from typing import Any

from collector.component import ComponentID
from collector.spans import KIND_INTERNAL, Resource, ResourceSpans, Scope, ScopeSpans, Span, SpanBatch
from collector.telemetry import ComponentTelemetry, SelfMetrics


class Sink:
    def __init__(self) -> None:
        self.batches: list[SpanBatch] = []

    def consume(self, batch: SpanBatch) -> None:
        self.batches.append(batch)

    def spans(self) -> list[Span]:
        return [s for b in self.batches for _, _, s in b.iter_spans()]


def span(name: str = "op", attrs: dict[str, Any] | None = None, kind: int = KIND_INTERNAL, tid: int = 1,
         **kw: Any) -> Span:
    return Span(tid.to_bytes(16, "big"), tid.to_bytes(8, "big"), name, attributes=dict(attrs or {}), kind=kind, **kw)


def one(s: Span, service: str = "svc", resource: dict[str, Any] | None = None, scope: str = "lib",
        version: str = "1.0") -> SpanBatch:
    res = {"service.name": service, **(resource or {})}
    return SpanBatch([ResourceSpans(Resource(res), [ScopeSpans(Scope(scope, version), [s])])])


def make(module: Any, cfg: dict[str, Any], name: str) -> tuple[Any, Sink, ComponentTelemetry]:
    sink = Sink()
    t = ComponentTelemetry("processor", name, SelfMetrics())
    config = module.factory.config_model.model_validate(cfg)
    p = module.factory.create(ComponentID.parse(name), config, t, sink)
    return p, sink, t
