"""The otlp receiver: what an OTLP/gRPC client sends reaches the next consumer whole; what it
cannot decode is refused with InvalidArgument; a refusing pipeline is answered as the collector does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from collector.component import ComponentID
from collector.errors import ConsumerError
from collector.otlp_encode import OTLPEncoder
from collector.spans import SpanBatch, to_proto
from collector.telemetry import ComponentTelemetry, SelfMetrics
from receiver.otlp import factory
from tests.support.collector import free_port
from tests.unit.collector.test_otlp_decode import dump
from tests.unit.collector.test_spans_and_graph import make_batch


class Consumer:
    def __init__(self) -> None:
        self.batches: list[SpanBatch] = []
        self.error: ConsumerError | None = None

    def consume(self, batch: SpanBatch) -> None:
        if self.error is not None:
            raise self.error
        self.batches.append(batch)


@pytest.fixture
def running() -> Iterator[tuple[Any, Consumer, SelfMetrics, int]]:
    port = free_port()
    consumer, metrics = Consumer(), SelfMetrics()
    config = factory.config_model.model_validate({"protocols": {"grpc": {"endpoint": f"127.0.0.1:{port}"}}})
    rcv = factory.create(ComponentID.parse("otlp"), config, ComponentTelemetry("receiver", "otlp", metrics), consumer)
    rcv.start(None)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield trace_service_pb2_grpc.TraceServiceStub(channel), consumer, metrics, port
    finally:
        channel.close()
        rcv.shutdown()


def counted(metrics: SelfMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"receiver": "otlp", "transport": "grpc"}) or 0.0


def test_spans_arrive_whole_and_come_back_out_the_same(running: Any) -> None:
    stub, consumer, metrics, _ = running
    req = to_proto(make_batch(5))
    resp = stub.Export(req)
    assert isinstance(resp, ExportTraceServiceResponse) and not resp.HasField("partial_success")
    (got,) = consumer.batches
    assert dump(got) == dump(make_batch(5))
    # otlp → otlp: the exporter's encoding of what was received is the message that was sent.
    assert ExportTraceServiceRequest.FromString(OTLPEncoder().encode(got)) == req
    assert counted(metrics, "otelcol_receiver_accepted_spans_total") == 5


def test_gzip_request(running: Any) -> None:
    stub, consumer, _, _ = running
    stub.Export(to_proto(make_batch(3)), compression=grpc.Compression.Gzip)
    assert consumer.batches[0].span_count() == 3


def test_undecodable_request_is_invalid_argument(running: Any) -> None:
    _, consumer, metrics, port = running
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.RpcError) as e:
            export(b"\x0a\x03\x12\x05\x0a")  # a ScopeSpans whose length runs past its ResourceSpans
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ExportTraceServiceRequest" in (e.value.details() or "")
    assert consumer.batches == []
    assert counted(metrics, "otelcol_receiver_accepted_spans_total") == 0


def test_refusing_pipeline_is_unavailable_or_invalid_argument_and_counted(running: Any) -> None:
    stub, consumer, metrics, _ = running
    consumer.error = ConsumerError("sending queue is full")
    with pytest.raises(grpc.RpcError) as e:
        stub.Export(to_proto(make_batch(2)))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    consumer.error = ConsumerError("bad data", permanent=True)
    with pytest.raises(grpc.RpcError) as e:
        stub.Export(to_proto(make_batch(2)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert counted(metrics, "otelcol_receiver_refused_spans_total") == 4
    assert counted(metrics, "otelcol_receiver_accepted_spans_total") == 0


def test_empty_request_is_answered(running: Any) -> None:
    stub, consumer, _, _ = running
    assert stub.Export(ExportTraceServiceRequest()) == ExportTraceServiceResponse()
    assert consumer.batches == []

