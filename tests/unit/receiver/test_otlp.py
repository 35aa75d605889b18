"""The otlp receiver: what an OTLP/gRPC client sends reaches the next consumer whole; what it
cannot decode is refused with InvalidArgument; a refusing pipeline is answered as the collector does."""

from __future__ import annotations

import logging
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
from collector.errors import ConsumerError, UserError
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



def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _varint(len(body)) + body


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings() -> Iterator[Warnings]:
    h = Warnings()
    log = logging.getLogger("otelgo.receiver.otlp")
    log.addHandler(h)
    try:
        yield h
    finally:
        log.removeHandler(h)


@pytest.mark.parametrize("field, value, problem", [
    ("trace_id", b"abc", "invalid span 1 of resource 0: trace_id must be 16 bytes, got 3"),
    ("trace_id", b"", "invalid span 1 of resource 0: trace_id must be 16 bytes, got 0"),
    ("span_id", b"\x01" * 16, "invalid span 1 of resource 0: span_id must be 8 bytes, got 16"),
    ("parent_span_id", b"\x01" * 4, "invalid span 1 of resource 0: parent_span_id must be 8 bytes, got 4"),
])
def test_ids_of_the_wrong_length_are_refused_counted_and_logged_once(
        running: Any, warnings: Warnings, field: str, value: bytes, problem: str) -> None:
    stub, consumer, metrics, _ = running
    req = to_proto(make_batch(3))
    setattr(req.resource_spans[0].scope_spans[0].spans[1], field, value)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details() == problem
    assert consumer.batches == []
    assert counted(metrics, "otelcol_receiver_refused_spans_total") == 9  # every span of each request
    assert counted(metrics, "otelcol_receiver_accepted_spans_total") == 0
    assert warnings.lines == [f"Refused an OTLP request: {problem}"]  # rate-limited: one line per 10 s


def test_an_empty_parent_span_id_is_a_root_and_accepted(running: Any) -> None:
    stub, consumer, _, _ = running
    req = to_proto(make_batch(2))
    req.resource_spans[0].scope_spans[0].spans[0].parent_span_id = b""
    stub.Export(req)
    assert consumer.batches[0].span_count() == 2


def test_attributes_nested_too_deep_are_invalid_argument_not_unknown(running: Any, warnings: Warnings) -> None:
    _, consumer, metrics, port = running
    value = _field(0x0A, b"leaf")  # AnyValue{string_value}
    for _ in range(3000):  # AnyValue{array_value: ArrayValue{values: [AnyValue...]}}
        value = _field(0x2A, _field(0x0A, value))
    span = _field(0x0A, b"\x01" * 16) + _field(0x12, b"\x02" * 8) + _field(0x2A, b"deep") + \
        _field(0x4A, _field(0x0A, b"k") + _field(0x12, value))
    request = _field(0x0A, _field(0x12, _field(0x12, span)))
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.RpcError) as e:
            export(request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "cannot decode ExportTraceServiceRequest: attribute values nested too deeply"
    assert warnings.lines == ["Refused an OTLP request: cannot decode ExportTraceServiceRequest: attribute "
                              "values nested too deeply"]
    assert consumer.batches == []


def test_a_port_in_use_is_refused_not_shared(running: Any) -> None:
    """gRPC's default SO_REUSEPORT let a second collector start and take half the connections."""
    _, _, _, port = running
    config = factory.config_model.model_validate({"protocols": {"grpc": {"endpoint": f"127.0.0.1:{port}"}}})
    second = factory.create(ComponentID.parse("otlp/second"), config,
                            ComponentTelemetry("receiver", "otlp/second", SelfMetrics()), Consumer())
    with pytest.raises(UserError) as e:
        second.start(None)
    assert str(e.value) == (f"listen tcp 127.0.0.1:{port}: bind: address already in use; set "
                            "receivers::otlp/second::protocols::grpc::endpoint to a free host:port")


def test_the_collector_exits_1_when_its_otlp_port_is_taken(tmp_path: Any) -> None:
    import socket
    import subprocess

    import yaml

    from tests.support.collector import BINARY

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = {"receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{port}"}}}},
               "exporters": {"debug": {}},
               "service": {"telemetry": {"metrics": {"level": "none"}},
                           "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["debug"]}}}}
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        r = subprocess.run([str(BINARY), "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    errors = [ln.split("\t")[3] for ln in r.stderr.splitlines() if "\terror\t" in ln]
    assert errors == [f'failed to start "otlp" receiver: listen tcp 127.0.0.1:{port}: bind: address already in '
                      "use; set receivers::otlp::protocols::grpc::endpoint to a free host:port"]
    assert "Everything is ready" not in r.stderr


@pytest.mark.parametrize("grpc_options, message", [
    ({"read_buffer_size": 1024}, "read_buffer_size is not supported by this receiver"),
    ({"write_buffer_size": 65536}, "write_buffer_size is not supported by this receiver"),
    ({"include_metadata": True}, "include_metadata: true is not supported"),
])
def test_options_grpc_core_cannot_honour_are_refused(grpc_options: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        factory.config_model.model_validate({"protocols": {"grpc": grpc_options}})
    assert message in str(e.value)
    # The collector's defaults, written out, are accepted.
    factory.config_model.model_validate({"protocols": {"grpc": {"read_buffer_size": 524288, "write_buffer_size": 0,
                                                                "include_metadata": False}}})
