"""`otlp` receiver: OTLP/gRPC TraceService/Export into the pipelines.

Requests arrive as bytes (no protobuf objects) and are read into span batches by
`collector.otlp_decode.OTLPDecoder`; a request that is not a valid ExportTraceServiceRequest is
answered InvalidArgument, as the OTLP specification asks for data that cannot be decoded.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from concurrent import futures
from typing import Any, NoReturn

# grpc-core's own stderr lines stay out of the operator's log (see exporters/otlp.py).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
from pydantic import Field, field_validator, model_validator  # noqa: E402

from collector.component import ComponentConfig, ComponentID, Consumer, Factory, Host, Kind, Receiver  # noqa: E402
from collector.configtypes import Endpoint, split_host_port  # noqa: E402
from collector.errors import ConsumerError, UserError  # noqa: E402
from collector.otlp_decode import DecodeError, OTLPDecoder, count_spans  # noqa: E402
from collector.spans import Span, SpanBatch  # noqa: E402
from collector.telemetry import ComponentTelemetry  # noqa: E402

# The Go collector's defaults for grpc-go's connection buffers, which grpc core has no knob for.
_GO_READ_BUFFER, _GO_WRITE_BUFFER = 512 * 1024, 0
_DEFAULT_RECV_MIB = 4  # grpc's default, which Go's configgrpc keeps when max_recv_msg_size_mib is 0


class GRPCServerConfig(ComponentConfig):
    endpoint: Endpoint = Field("localhost:4317", description="host:port to listen on for OTLP/gRPC")
    max_recv_msg_size_mib: int = Field(4, description="largest accepted request")
    max_concurrent_streams: int = Field(0, description="0 = gRPC default")
    read_buffer_size: int = Field(_GO_READ_BUFFER, description="only the default (grpc core has no such buffer)")
    write_buffer_size: int = Field(_GO_WRITE_BUFFER, description="only the default (grpc core has no such buffer)")
    include_metadata: bool = Field(False, description="only false (client metadata is not passed on)")

    @field_validator("max_recv_msg_size_mib", "max_concurrent_streams")
    @classmethod
    def _not_negative(cls, v: int, info: Any) -> int:
        if v < 0:
            raise ValueError(f"{info.field_name} must be 0 or more, got {v} (0 = the gRPC default)")
        return v

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
        self._refusals = _RateLimitedWarning(telemetry, _REFUSAL_LOG_INTERVAL)

    def export(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """TraceService/Export: the serialized request in, the serialized response out."""
        try:
            batch = self._decoder.decode(request)
        except DecodeError as e:
            self._refuse(f"cannot decode ExportTraceServiceRequest: {e}", count_spans(request), context)
        bad = invalid_ids(batch)
        if bad is not None:
            self._refuse(bad, batch.span_count(), context)
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

    def _refuse(self, problem: str, spans: int, context: grpc.ServicerContext) -> NoReturn:
        """InvalidArgument to the client (the OTLP spec's answer to data it must not retry), the spans
        counted as refused, and one warning line per interval for the operator."""
        self._refused.inc(spans)
        self._refusals.warn(f"Refused an OTLP request: {problem}", peer=context.peer(), refused_spans=spans)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        raise AssertionError("context.abort returned")  # grpc raises; this keeps the type checker honest

    def start(self, host: Host) -> None:
        g = self.config.protocols.grpc
        assert g is not None
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", (g.max_recv_msg_size_mib or _DEFAULT_RECV_MIB) * 1024 * 1024),
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
        option = f"receivers::{self.id}::protocols::grpc::endpoint"
        fix = f"set {option} to a free host:port"
        address = _listen_address(g.endpoint, option)
        try:
            # grpcio returns 0 on a failed bind in some versions and raises RuntimeError in others.
            port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise UserError(f"listen tcp {g.endpoint}: bind: {_bind_problem(address)}; {fix}")
        server.start()
        self._server = server
        self.telemetry.logger.info("Starting GRPC server", extra={"endpoint": g.endpoint})

    def shutdown(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            # Stop accepting, let in-flight Export calls finish.
            self._server.stop(grace=min(timeout, 5.0)).wait(timeout)
            self._server = None


_ZERO_TRACE_ID, _ZERO_SPAN_ID = bytes(16), bytes(8)


def invalid_ids(batch: SpanBatch) -> str | None:
    """Why the batch's ids cannot be exported, or None. As the OTLP spec says: a trace_id is 16 bytes
    and a span_id 8, neither all zeros; a parent_span_id is empty (a root) or 8 bytes; a link's ids
    have the lengths of a span's. The loop only compares lengths and bytes; a span is looked at more
    closely only when one of those fails, or when it has links."""
    for r, rs in enumerate(batch.resource_spans):
        k = 0  # the span's index in its resource, across scopes
        for ss in rs.scope_spans:
            for span in ss.spans:
                t, s, p = span.trace_id, span.span_id, span.parent_span_id
                if (len(t) != 16 or len(s) != 8 or t == _ZERO_TRACE_ID or s == _ZERO_SPAN_ID
                        or (p and len(p) != 8) or span._links):
                    problem = _span_problem(span)
                    if problem:
                        return f"invalid span {k} of resource {r}: {problem}"
                k += 1
    return None


def _span_problem(span: Span) -> str | None:
    problem = (_id("trace_id", span.trace_id, 16) or _id("span_id", span.span_id, 8)
               or (_length("parent_span_id", span.parent_span_id, 8) if span.parent_span_id else None))
    for n, link in enumerate(span._links or ()):
        if problem:
            break
        problem = _length(f"link {n} trace_id", link.trace_id, 16) or _length(f"link {n} span_id", link.span_id, 8)
    return problem


def _id(name: str, value: bytes, want: int) -> str | None:
    if len(value) == want and any(value):
        return None
    return _length(name, value, want) or f"{name} must not be all zeros"


def _length(name: str, value: bytes, want: int) -> str | None:
    if len(value) == want:
        return None
    return f"{name} must be {want} bytes, got {len(value)}"


class _RateLimitedWarning:
    """One warning line per interval; the lines held back in between are counted in the next one.
    Export runs on several threads at once, hence the lock."""

    def __init__(self, telemetry: ComponentTelemetry, interval: float) -> None:
        self._telemetry = telemetry
        self._interval = interval
        self._lock = threading.Lock()
        self._last = -interval
        self._suppressed = 0

    def warn(self, msg: str, **fields: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval:
                self._suppressed += 1
                return
            held, self._suppressed, self._last = self._suppressed, 0, now
        if held:
            msg += f" ({held} more refused since the last such line, not logged)"
        self._telemetry.logger.warning(msg, extra=fields)


_REFUSAL_LOG_INTERVAL = 10.0  # seconds between two "Refused an OTLP request" lines


def _listen_address(endpoint: str, option: str) -> str:
    """The one address to listen on, chosen as Go's net.Listen does: an empty host is every interface,
    a name is resolved and its first IPv4 address used. (Given a name, grpc would bind every address
    it finds, and start if any one is free: a taken 127.0.0.1:4317 would go unnoticed behind ::1.)"""
    host, port = split_host_port(endpoint)
    if not host:
        return f"[::]:{port}"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise UserError(f"listen tcp {endpoint}: lookup {host}: {(e.strerror or str(e)).lower()}; set {option} "
                            "to an address of this machine, e.g. localhost:4317") from None
        addrs = [str(info[4][0]) for info in infos]
        ip = ipaddress.ip_address(next((a for a in addrs if ":" not in a), addrs[0]))
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _bind_problem(address: str) -> str:
    """Why grpc could not listen (it says nothing): try the same bind ourselves for the OS's words."""
    host, port = split_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as e:
            return (e.strerror or str(e)).lower()
    return "address not available"


def _create(id: ComponentID, config: Config, telemetry: ComponentTelemetry, next_consumer: Consumer) -> OTLPReceiver:
    return OTLPReceiver(id, config, telemetry, next_consumer)


factory = Factory(type="otlp", kind=Kind.RECEIVER, config_model=Config, create=_create, stability="beta",
                  description="OTLP/gRPC trace receiver (TraceService/Export)")
