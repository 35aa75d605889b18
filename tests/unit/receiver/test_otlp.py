"""The otlp receiver: what an OTLP/gRPC client sends reaches the next consumer whole; what it
cannot decode is refused with InvalidArgument; a refusing pipeline is answered as the collector does."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
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
from tests.unit.collector.test_spans_and_graph import make_batch as _make_batch


def make_batch(n: int) -> SpanBatch:
    """The shared test batch, with no all-zero trace_id (its span 0 has one, which OTLP calls invalid)."""
    batch = _make_batch(n)
    for i, (_, _, span) in enumerate(batch.iter_spans()):
        span.trace_id = bytes([i % 255 + 1]) * 16
    return batch


class Consumer:
    def __init__(self) -> None:
        self.batches: list[SpanBatch] = []
        self.error: ConsumerError | None = None

    def consume(self, batch: SpanBatch) -> None:
        if self.error is not None:
            raise self.error
        self.batches.append(batch)


@contextmanager
def started_receiver(**grpc_options: Any) -> Iterator[tuple[Any, Consumer, SelfMetrics, int]]:
    """A started receiver on a free port (`endpoint` may name the host, `{port}` standing for it) and
    a client stub dialling 127.0.0.1."""
    port = free_port()
    endpoint = grpc_options.pop("endpoint", "127.0.0.1:{port}").format(port=port)
    consumer, metrics = Consumer(), SelfMetrics()
    config = factory.config_model.model_validate({"protocols": {"grpc": {"endpoint": endpoint, **grpc_options}}})
    rcv = factory.create(ComponentID.parse("otlp"), config, ComponentTelemetry("receiver", "otlp", metrics), consumer)
    rcv.start(None)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield trace_service_pb2_grpc.TraceServiceStub(channel), consumer, metrics, port
    finally:
        channel.close()
        rcv.shutdown()


@pytest.fixture
def running() -> Iterator[tuple[Any, Consumer, SelfMetrics, int]]:
    with started_receiver() as r:
        yield r


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
    ("trace_id", bytes(16), "invalid span 1 of resource 0: trace_id must not be all zeros"),
    ("span_id", b"\x01" * 16, "invalid span 1 of resource 0: span_id must be 8 bytes, got 16"),
    ("span_id", b"", "invalid span 1 of resource 0: span_id must be 8 bytes, got 0"),
    ("span_id", bytes(8), "invalid span 1 of resource 0: span_id must not be all zeros"),
    ("parent_span_id", b"\x01" * 4, "invalid span 1 of resource 0: parent_span_id must be 8 bytes, got 4"),
    ("link trace_id", b"\x01" * 8, "invalid span 1 of resource 0: link 0 trace_id must be 16 bytes, got 8"),
    ("link span_id", b"", "invalid span 1 of resource 0: link 0 span_id must be 8 bytes, got 0"),
])
def test_ids_of_the_wrong_length_are_refused_counted_and_logged_once(
        running: Any, warnings: Warnings, field: str, value: bytes, problem: str) -> None:
    stub, consumer, metrics, _ = running
    req = to_proto(make_batch(3))
    span = req.resource_spans[0].scope_spans[0].spans[1]
    if field.startswith("link "):
        setattr(span.links[0], field.split()[1], value)
    else:
        setattr(span, field, value)
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details() == problem
    assert consumer.batches == []
    assert counted(metrics, "otelcol_receiver_refused_spans_total") == 9  # every span of each request
    assert counted(metrics, "otelcol_receiver_accepted_spans_total") == 0
    assert warnings.lines == [f"Refused an OTLP request: {problem}"]  # rate-limited: one line per 10 s


def test_the_span_index_counts_across_the_scopes_of_a_resource(running: Any) -> None:
    stub, _, _, _ = running
    req = to_proto(make_batch(2))
    second = req.resource_spans[0].scope_spans.add()
    second.spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 3)
    with pytest.raises(grpc.RpcError) as e:
        stub.Export(req)
    assert e.value.details() == "invalid span 2 of resource 0: span_id must be 8 bytes, got 3"


def test_repeated_refusals_log_one_line_then_say_how_many_were_held_back(
        monkeypatch: pytest.MonkeyPatch, warnings: Warnings) -> None:
    import time

    import receiver.otlp

    monkeypatch.setattr(receiver.otlp, "_REFUSAL_LOG_INTERVAL", 0.3)
    with started_receiver() as (stub, _, metrics, _):
        req = to_proto(make_batch(1))
        req.resource_spans[0].scope_spans[0].spans[0].trace_id = b"short"
        for _ in range(4):
            with pytest.raises(grpc.RpcError):
                stub.Export(req)
        time.sleep(0.35)
        with pytest.raises(grpc.RpcError):
            stub.Export(req)
        assert counted(metrics, "otelcol_receiver_refused_spans_total") == 5
    problem = "Refused an OTLP request: invalid span 0 of resource 0: trace_id must be 16 bytes, got 5"
    assert warnings.lines == [problem, f"{problem} (3 more refused since the last such line, not logged)"]


def test_an_empty_parent_span_id_is_a_root_and_accepted(running: Any) -> None:
    stub, consumer, _, _ = running
    req = to_proto(make_batch(2))
    req.resource_spans[0].scope_spans[0].spans[0].parent_span_id = b""
    stub.Export(req)
    assert consumer.batches[0].span_count() == 2


def test_attributes_nested_too_deep_are_invalid_argument_not_unknown(running: Any, warnings: Warnings) -> None:
    _, consumer, metrics, port = running
    value = _field(0x0A, b"leaf")  # AnyValue{string_value}
    for _ in range(200):  # AnyValue{array_value: ArrayValue{values: [AnyValue...]}}
        value = _field(0x2A, _field(0x0A, value))
    span = _field(0x0A, b"\x01" * 16) + _field(0x12, b"\x02" * 8) + _field(0x2A, b"deep") + \
        _field(0x4A, _field(0x0A, b"k") + _field(0x12, value))
    fine = _field(0x0A, b"\x01" * 16) + _field(0x12, b"\x02" * 8) + _field(0x2A, b"flat")
    request = _field(0x0A, _field(0x12, _field(0x12, fine) + _field(0x12, span)))
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.RpcError) as e:
            export(request)
    problem = ("cannot decode ExportTraceServiceRequest: attribute values nested too deeply (more than 100 "
               "levels of messages, protobuf's limit)")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == problem
    assert warnings.lines == [f"Refused an OTLP request: {problem}"]
    assert consumer.batches == []
    assert counted(metrics, "otelcol_receiver_refused_spans_total") == 2  # both spans of the request


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


def test_a_name_is_refused_when_its_ipv4_address_is_taken() -> None:
    """grpc binds every address of `localhost` and starts if one is free: a collector holding
    127.0.0.1:4317 went unnoticed behind ::1. As Go, we listen on the first IPv4 address only."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = factory.config_model.model_validate({"protocols": {"grpc": {"endpoint": f"localhost:{port}"}}})
        rcv = factory.create(ComponentID.parse("otlp"), config,
                             ComponentTelemetry("receiver", "otlp", SelfMetrics()), Consumer())
        with pytest.raises(UserError) as e:
            rcv.start(None)
    assert str(e.value) == (f"listen tcp localhost:{port}: bind: address already in use; set "
                            "receivers::otlp::protocols::grpc::endpoint to a free host:port")


def test_an_endpoint_without_a_host_listens_on_every_interface() -> None:
    """`:4317` is every interface in Go; grpc itself refuses it ("Failed to bind to address :4317")."""
    with started_receiver(endpoint=":{port}") as (stub, consumer, _, _):
        stub.Export(to_proto(make_batch(1)))
    assert consumer.batches[0].span_count() == 1


def test_an_unknown_host_is_a_one_line_error() -> None:
    config = factory.config_model.model_validate({"protocols": {"grpc": {"endpoint": "no-such-host.invalid:4317"}}})
    rcv = factory.create(ComponentID.parse("otlp"), config, ComponentTelemetry("receiver", "otlp", SelfMetrics()),
                         Consumer())
    with pytest.raises(UserError) as e:
        rcv.start(None)
    assert str(e.value).startswith("listen tcp no-such-host.invalid:4317: lookup no-such-host.invalid: ")
    assert str(e.value).endswith("; set receivers::otlp::protocols::grpc::endpoint to an address of this machine, "
                                 "e.g. localhost:4317")
    assert "\n" not in str(e.value)


def test_max_recv_msg_size_mib_0_is_the_grpc_default_not_zero_bytes() -> None:
    """As in Go's configgrpc, 0 keeps grpc's 4 MiB; it used to refuse every request (RESOURCE_EXHAUSTED)."""
    with started_receiver(max_recv_msg_size_mib=0) as (stub, consumer, _, _):
        stub.Export(to_proto(make_batch(3)))
        big = to_proto(make_batch(1))
        big.resource_spans[0].scope_spans[0].spans[0].name = "x" * (5 << 20)
        with pytest.raises(grpc.RpcError) as e:
            stub.Export(big)
    assert consumer.batches[0].span_count() == 3
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


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
    ({"max_recv_msg_size_mib": -1}, "max_recv_msg_size_mib must be 0 or more, got -1 (0 = the gRPC default)"),
    ({"max_concurrent_streams": -5}, "max_concurrent_streams must be 0 or more, got -5 (0 = the gRPC default)"),
])
def test_options_grpc_core_cannot_honour_are_refused(grpc_options: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        factory.config_model.model_validate({"protocols": {"grpc": grpc_options}})
    assert message in str(e.value)
    # The collector's defaults, written out, are accepted.
    factory.config_model.model_validate({"protocols": {"grpc": {"read_buffer_size": 524288, "write_buffer_size": 0,
                                                                "include_metadata": False}}})
