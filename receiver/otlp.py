"""`otlp` receiver: OTLP/gRPC TraceService/Export into the pipelines.

Requests arrive as bytes (no protobuf objects) and are read into span batches by
`collector.otlp_decode.OTLPDecoder`; a request that is not a valid ExportTraceServiceRequest is
answered InvalidArgument, as the OTLP specification asks for data that cannot be decoded.
"""

from __future__ import annotations

import os
import socket
from concurrent import futures
from typing import Any

# grpc-core's own stderr lines stay out of the operator's log (see exporters/otlp.py).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
from pydantic import Field, field_validator, model_validator  # noqa: E402

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Host, Kind, Receiver  # noqa: E402
from collector.configtypes import Endpoint, split_host_port  # noqa: E402
from collector.errors import ConsumerError, UserError  # noqa: E402
from collector.otlp_decode import DecodeError, OTLPDecoder  # noqa: E402
from collector.spans import SpanBatch  # noqa: E402
from collector.telemetry import ComponentTelemetry  # noqa: E402

# The Go collector's defaults for grpc-go's connection buffers, which grpc core has no knob for.
_GO_READ_BUFFER, _GO_WRITE_BUFFER = 512 * 1024, 0


class GRPCServerConfig(ComponentConfig):
    endpoint: Endpoint = Field("localhost:4317", description="host:port to listen on for OTLP/gRPC")
    max_recv_msg_size_mib: int = Field(4, description="largest accepted request")
    max_concurrent_streams: int = Field(0, description="0 = gRPC default")
    read_buffer_size: int = Field(_GO_READ_BUFFER, description="only the default (grpc core has no such buffer)")
    write_buffer_size: int = Field(_GO_WRITE_BUFFER, description="only the default (grpc core has no such buffer)")
    include_metadata: bool = Field(False, description="only false (client metadata is not passed on)")

    @field_validator("read_buffer_size", "write_buffer_size")
    @classmethod
    def _buffers(cls, v: int, info: Any) -> int:
        default = _GO_READ_BUFFER if info.field_name == "read_buffer_size" else _GO_WRITE_BUFFER
        if v != default:
            raise ValueError(f"{info.field_name} is not supported by this receiver (grpc-go's connection "
                             "buffer has no equivalent in grpc core); remove it")
        return v

    @field_validator("include_metadata")
    @classmethod
    def _metadata(cls, v: bool) -> bool:
        if v:
            raise ValueError("include_metadata: true is not supported: client metadata is not passed to "
                             "processors; remove it")
        return v


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
            bad = invalid_ids(batch)
        except DecodeError as e:
            bad = f"cannot decode ExportTraceServiceRequest: {e}"
            batch = None
        if bad is not None:
            n = batch.span_count() if batch is not None else 0
            self._refused.inc(n)
            self.telemetry.warn_once_per("invalid", 10.0, f"Refused an OTLP request: {bad}",
                                        extra={"peer": context.peer(), "refused_spans": n})
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad)
        assert batch is not None
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
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", g.max_recv_msg_size_mib * 1024 * 1024),
            # gRPC sets SO_REUSEPORT by default: a second collector on this port would start and
            # silently take half the connections. Go refuses the bind; so do we.
            ("grpc.so_reuseport", 0)]
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
            raise UserError(f"listen tcp {g.endpoint}: bind: {_bind_problem(g.endpoint)}; "
                            f"set receivers::{self.id}::protocols::grpc::endpoint to a free host:port")
        server.start()
        self._server = server
        self.telemetry.logger.info("Starting GRPC server", extra={"endpoint": g.endpoint})

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            # Stop accepting, let in-flight Export calls finish.
            self._server.stop(grace=min(timeout, 5.0)).wait(timeout)
            self._server = None


def invalid_ids(batch: SpanBatch) -> str | None:
    """Why the batch's ids cannot be exported (as the collector's pdata refuses them), or None.
    Lengths only: one pass of len() per span, no copies."""
    for r, rs in enumerate(batch.resource_spans):
        for ss in rs.scope_spans:
            for k, span in enumerate(ss.spans):
                problem = (_length("trace_id", span.trace_id, 16) or _length("span_id", span.span_id, 8)
                           or (span.parent_span_id and _length("parent_span_id", span.parent_span_id, 8)))
                if not problem and span._links:
                    for link in span._links:
                        problem = _length("link trace_id", link.trace_id, 16) or _length(
                            "link span_id", link.span_id, 8)
                        if problem:
                            break
                if problem:
                    return f"invalid span {k} of resource {r}: {problem}"
    return None


def _length(name: str, value: bytes, want: int) -> str | None:
    if len(value) == want:
        return None
    return f"{name} must be {want} bytes, got {len(value)}"


def _bind_problem(endpoint: str) -> str:
    """Why grpc could not listen (it says nothing): try the bind ourselves for the OS's words."""
    try:
        host, port = split_host_port(endpoint)
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (ValueError, OSError) as e:
        return f"cannot resolve the host ({e})"
    for family, kind, proto, _name, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            try:
                sock.bind(addr)
            except OSError as e:
                return (e.strerror or str(e)).lower()
    return "address not available"


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry, next_consumer: Consumer) -> OTLPReceiver:
    return OTLPReceiver(id, config, telemetry, next_consumer)


factory = Factory(type="otlp", kind=Kind.RECEIVER, config_model=Config, create=_create, stability="beta",
                  description="OTLP/gRPC trace receiver (TraceService/Export)")
