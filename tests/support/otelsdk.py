"""Send spans with the OpenTelemetry Python SDK's real OTLP/gRPC exporter, and keep what was sent."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def send_traces(endpoint: str, n_traces: int, service: str = "sdk-client",
                children: int = 2) -> list[ReadableSpan]:
    """n_traces traces of 1 + children spans each, with attributes of every type, events, links, status."""
    memory = InMemorySpanExporter()
    tp = TracerProvider(resource=Resource.create({"service.name": service, "deployment.environment": "test"}))
    tp.add_span_processor(SimpleSpanProcessor(memory))
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True),
                                             max_export_batch_size=256, schedule_delay_millis=50))
    tracer = tp.get_tracer("e2e.scope", "1.2.3")
    prev_ctx = None
    for i in range(n_traces):
        with tracer.start_as_current_span(
                f"root-{i}", kind=trace.SpanKind.SERVER,
                attributes={"str": "v", "int": i, "float": 1.5, "bool": True, "strs": ["a", "b"],
                            "ints": [1, 2, 3]}) as root:
            root.add_event("started", {"step": 1})
            for c in range(children):
                links = [trace.Link(prev_ctx, {"link.kind": "previous"})] if prev_ctx else []
                with tracer.start_as_current_span(f"child-{c}", kind=trace.SpanKind.CLIENT, links=links) as ch:
                    if c == children - 1:
                        ch.set_status(trace.Status(trace.StatusCode.ERROR, "failed on purpose"))
            prev_ctx = root.get_span_context()
    tp.force_flush()
    tp.shutdown()
    return list(memory.get_finished_spans())
