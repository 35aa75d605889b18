"""`otlp` receiver: OTLP/gRPC TraceService/Export into the pipelines.

Requests arrive as bytes (no protobuf objects) and are read into span batches by
`collector.otlp_decode.OTLPDecoder`; a request that is not a valid ExportTraceServiceRequest is
answered InvalidArgument, as the OTLP specification asks for data that cannot be decoded.
"""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
from pydantic import Field, model_validator

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Host, Kind, Receiver
from collector.configtypes import Endpoint
from collector.errors import ConsumerError, UserError
from collector.otlp_decode import DecodeError, OTLPDecoder
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


_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
_EMPTY_RESPONSE = b""  # ExportTraceServiceResponse with no partial_success: zero bytes on the wire


class OTLPReceiver(Receiver):
    def __init__(self, id: ComponentID, config: Config, telemetry: ComponentTelemetry,
                 next_consumer: Consumer) -> None:
        super().__init__(id, telemetry, next_consumer)
        self.config = config
        self._server: grpc.Server | None = None
        m = telemetry.metrics
        self._accepted = m.receiver_accepted.labels(receiver=str(id), transport="grpc")
        self._refused = m.receiver_refused.labels(receiver=str(id), transport="grpc")
        self._decoder = OTLPDecoder()

    def export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """TraceService/Export: the serialized request in, the serialized response out."""
        try:
            batch = self._decoder.decode(request)
        except DecodeError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode ExportTraceServiceRequest: {e}")
        n = batch.span_count()
        if n:
            try:
                self.next_consumer.consume(batch)
            except ConsumerError as e:
                self._refused.inc(n)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT if e.permanent else grpc.StatusCode.UNAVAILABLE,
                              str(e))
            self._accepted.inc(n)
        return _EMPTY_RESPONSE

    def start(self, host: Host) -> None:
        g = self.config.protocols.grpc
        assert g is not None
        opts = [("grpc.max_receive_message_length", g.max_recv_msg_size_mib * 1024 * 1024)]
        if g.max_concurrent_streams:
            opts.append(("grpc.max_concurrent_streams", g.max_concurrent_streams))
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"otlp-{self.id}"),
                             options=opts)
        # Bytes in and out: the decoder reads the wire format itself (no request_deserializer).
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, {
            "Export": grpc.unary_unary_rpc_method_handler(self.export)}),))
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
