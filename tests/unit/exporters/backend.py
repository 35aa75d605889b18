"""A Python OTLP/gRPC backend for exporter tests: records requests and metadata, fails on demand."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from collector.component import ComponentID
from collector.spans import Resource, ResourceSpans, Scope, ScopeSpans, Span, SpanBatch
from collector.telemetry import ComponentTelemetry, SelfMetrics

Behaviour = Callable[[Any, grpc.ServicerContext], Any]


class Backend(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, port: int = 0, credentials: grpc.ServerCredentials | None = None) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.behaviour: Behaviour | None = None  # return a response or abort through the context
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                                  options=[("grpc.max_receive_message_length", 64 << 20)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        addr = f"127.0.0.1:{port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(addr)
        else:
            self.port = self.server.add_secure_port(addr, credentials)
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC name
        with self.lock:
            self.metadata.append({k: v for k, v in context.invocation_metadata()})
        if self.behaviour is not None:
            resp = self.behaviour(request, context)
            if resp is not None:
                return resp
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def span_count(self) -> int:
        with self.lock:
            return sum(len(ss.spans) for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans)

    def stop(self) -> None:
        self.server.stop(0).wait()


def telemetry(name: str = "otlp") -> ComponentTelemetry:
    return ComponentTelemetry("exporter", name, SelfMetrics())


def batch(n: int = 1, start: int = 0, service: str = "svc") -> SpanBatch:
    spans = [Span((start + i + 1).to_bytes(16, "big"), (start + i + 1).to_bytes(8, "big"), f"span-{start + i}",
                  attributes={"i": start + i}, start_time_unix_nano=1, end_time_unix_nano=2)
             for i in range(n)]
    return SpanBatch([ResourceSpans(Resource({"service.name": service}), [ScopeSpans(Scope("test"), spans)])])


def metric(t: ComponentTelemetry, family: str) -> float:
    v = t.metrics.registry.get_sample_value(f"{family}_total", {"exporter": t.component_id})
    return v or 0.0


__all__ = ["Backend", "ComponentID", "batch", "metric", "telemetry"]
