"""`otlp` receiver: OTLP/gRPC TraceService/Export into the pipelines."""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from pydantic import Field, model_validator

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Host, Kind, Receiver
from collector.configtypes import Endpoint
from collector.errors import ConsumerError, UserError
from collector.spans import from_proto
from collector.telemetry import ComponentTelemetry


class GRPCServerConfig(ComponentConfig):
    endpoint: Endpoint = Field("localhost:4317", description="host:port to listen on for OTLP/gRPC")
    max_recv_msg_size_mib: int = Field(4, description="largest accepted request")
    max_concurrent_streams: int = Field(0, description="0 = gRPC default")
    read_buffer_size: int = Field(524288, description="accepted for compatibility")
    write_buffer_size: int = Field(0, description="accepted for compatibility")
    include_metadata: bool = Field(False, description="accepted for compatibility")


class Protocols(ComponentConfig):
    grpc: GRPCServerConfig | None = Field(None, description="OTLP/gRPC server")
    http: dict[str, Any] | None = Field(None, description="not supported yet (refused)")

    @model_validator(mode="after")
    def _check(self) -> Protocols:
        if self.http is not None:
            raise ValueError("http: OTLP/HTTP is not supported by this receiver yet; use protocols::grpc")
        if self.grpc is None:
            raise ValueError("must specify at least one protocol when using the OTLP receiver "
                             "(protocols: {grpc: {endpoint: localhost:4317}})")
        return self


class Config(ComponentConfig):
    protocols: Protocols = Protocols(grpc=GRPCServerConfig())


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's name
        return self.receiver.export(request, context)


class OTLPReceiver(Receiver):
    def __init__(self, id: ComponentID, config: Config, telemetry: ComponentTelemetry,
                 next_consumer: Consumer) -> None:
        super().__init__(id, telemetry, next_consumer)
        self.config = config
        self._server: grpc.Server | None = None
        m = telemetry.metrics
        self._accepted = m.receiver_accepted.labels(receiver=str(id), transport="grpc")
        self._refused = m.receiver_refused.labels(receiver=str(id), transport="grpc")

    def export(self, request: Any, context: grpc.ServicerContext) -> Any:
        batch = from_proto(request)
        n = batch.span_count()
        if n:
            try:
                self.next_consumer.consume(batch)
            except ConsumerError as e:
                self._refused.inc(n)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT if e.permanent else grpc.StatusCode.UNAVAILABLE,
                              str(e))
            self._accepted.inc(n)
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self, host: Host) -> None:
        g = self.config.protocols.grpc
        assert g is not None
        opts = [("grpc.max_receive_message_length", g.max_recv_msg_size_mib * 1024 * 1024)]
        if g.max_concurrent_streams:
            opts.append(("grpc.max_concurrent_streams", g.max_concurrent_streams))
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"otlp-{self.id}"),
                             options=opts)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        try:
            port = server.add_insecure_port(g.endpoint)
        except RuntimeError:
            port = 0
        if port == 0:
            raise UserError(f"listen tcp {g.endpoint}: address in use or not available; "
                            f"set receivers::{self.id}::protocols::grpc::endpoint to a free host:port")
        server.start()
        self._server = server
        self.telemetry.logger.info("Starting GRPC server", extra={"endpoint": g.endpoint})

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            # Stop accepting, let in-flight Export calls finish.
            self._server.stop(grace=min(timeout, 5.0)).wait(timeout)
            self._server = None


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry, next_consumer: Consumer) -> OTLPReceiver:
    return OTLPReceiver(id, config, telemetry, next_consumer)


factory = Factory(type="otlp", kind=Kind.RECEIVER, config_model=Config, create=_create, stability="beta",
                  description="OTLP/gRPC trace receiver (TraceService/Export)")
