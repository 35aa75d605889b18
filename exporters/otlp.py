"""`otlp` exporter (alias `otlp_grpc`): spans to an OTLP/gRPC endpoint, as the collector's otlpexporter.

Queue and retries come from exporters.sending_queue. A gRPC failure is retried only for the codes the
collector retries (Canceled, DeadlineExceeded, Aborted, OutOfRange, Unavailable, DataLoss, and
ResourceExhausted when the server attached google.rpc.RetryInfo); its `retry_delay` is honoured.
Anything else is permanent: the batch is dropped and counted in otelcol_exporter_send_failed_spans.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any, Literal

# grpc-core prints its own lines (TLS handshakes, reconnects) to stderr, outside our log; it reads
# this once, when its core starts. Our one-line errors say what those lines would. A user's own
# GRPC_VERBOSITY still wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse  # noqa: E402
from pydantic import Field, field_validator, model_validator  # noqa: E402

from collector.component import ComponentConfig, ComponentID, Exporter, Factory, Host, Kind  # noqa: E402
from collector.configtypes import Duration  # noqa: E402
from collector.errors import UserError  # noqa: E402
from collector.otlp_encode import OTLPEncoder  # noqa: E402
from collector.spans import SpanBatch  # noqa: E402
from collector.telemetry import ComponentTelemetry  # noqa: E402
from exporters.sending_queue import ExportError, QueueConfig, QueuedRetrySender, RetryConfig  # noqa: E402


class TLSClientConfig(ComponentConfig):
    """configtls.ClientConfig (the subset we support)."""

    insecure: bool = False
    insecure_skip_verify: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name_override: str = ""

    @model_validator(mode="after")
    def _check(self) -> TLSClientConfig:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("failed to load TLS config: for auth via TLS, provide both certificate and key, "
                             "or neither")
        return self


class OTLPConfig(ComponentConfig):
    endpoint: str = ""
    tls: TLSClientConfig = Field(default_factory=TLSClientConfig)
    headers: dict[str, str] = Field(default_factory=dict)
    compression: Literal["gzip", "none", ""] = "gzip"
    timeout: Duration = 5.0
    sending_queue: QueueConfig = Field(default_factory=QueueConfig)
    retry_on_failure: RetryConfig = Field(default_factory=RetryConfig)
    balancer_name: str = "round_robin"

    @field_validator("balancer_name")
    @classmethod
    def _balancer(cls, v: str) -> str:
        # grpc core would log that it does not know the policy and quietly use pick_first.
        if v and v not in _BALANCERS:
            raise ValueError(f"invalid balancer_name: {v} (use {', '.join(_BALANCERS[:-1])} or {_BALANCERS[-1]})")
        return v

    @model_validator(mode="after")
    def _check(self) -> OTLPConfig:
        if not self.endpoint:
            raise ValueError('requires a non-empty "endpoint"')
        target = _strip_scheme(self.endpoint)
        if target.startswith(("unix:", "dns:")):
            return self
        _, colon, port = target.rpartition("]")[2].rpartition(":")
        if not colon:
            raise ValueError(f'invalid port in endpoint "{self.endpoint}": write it as host:port, '
                             "e.g. localhost:4317")
        if not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f'invalid port "{port}" in endpoint "{self.endpoint}": a port is 1-65535, '
                             "e.g. localhost:4317")
        return self


# The load-balancing policies grpc core ships that need no extra setup (ring_hash needs a hash key).
_BALANCERS = ("round_robin", "pick_first", "weighted_round_robin")


def _strip_scheme(endpoint: str) -> str:
    for p in ("https://", "http://"):
        if endpoint.startswith(p):
            return endpoint[len(p):]
    return endpoint


# gRPC codes the collector retries (exporter/otlpexporter/otlp.go shouldRetry).
_RETRYABLE = {
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
}


# ---------------------------------------------------------------- google.rpc.RetryInfo, decoded by hand
# Status{code=1, message=2, details=3: Any{type_url=1, value=2}}; RetryInfo{retry_delay=1: Duration{
# seconds=1, nanos=2}}. A few lines of wire-format reading spare a dependency on googleapis-common-protos.

_RETRY_INFO_URL = "type.googleapis.com/google.rpc.RetryInfo"


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    out: list[tuple[int, int, Any]] = []
    i = 0
    n = len(buf)

    def varint() -> int:
        nonlocal i
        shift = result = 0
        while True:
            if i >= n:
                raise ValueError("truncated varint")
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while i < n:
        key = varint()
        field, wt = key >> 3, key & 7
        if wt == 0:
            out.append((field, wt, varint()))
        elif wt == 2:
            ln = varint()
            out.append((field, wt, buf[i:i + ln]))
            i += ln
        elif wt == 1:
            i += 8
        elif wt == 5:
            i += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
    return out


def retry_delay_from_status_details(details: bytes) -> float | None:
    """Seconds from a google.rpc.Status carrying RetryInfo, or None."""
    try:
        for f, wt, v in _fields(details):
            if f != 3 or wt != 2:
                continue
            any_fields = {ff: vv for ff, _, vv in _fields(v)}
            if bytes(any_fields.get(1, b"")).decode(errors="replace") != _RETRY_INFO_URL:
                continue
            for rf, rwt, rv in _fields(bytes(any_fields.get(2, b""))):
                if rf == 1 and rwt == 2:
                    d = {df: dv for df, _, dv in _fields(rv)}
                    seconds = int(d.get(1, 0))
                    if seconds >= 1 << 63:
                        seconds -= 1 << 64
                    return seconds + int(d.get(2, 0)) / 1e9
            return 0.0
    except (ValueError, IndexError):
        return None
    return None


def _retry_delay(err: grpc.RpcError) -> float | None:
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for k, v in trailers or ():
        if k == "grpc-status-details-bin" and isinstance(v, bytes):
            return retry_delay_from_status_details(v)
    return None


def classify_rpc_error(err: grpc.RpcError) -> ExportError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    text = f"rpc error: code = {_code_name(code)} desc = {details}"
    delay = _retry_delay(err)
    if code in _RETRYABLE:
        return ExportError(text, throttle=delay)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None:
        return ExportError(text, throttle=delay)
    return ExportError(text, permanent=True)


# What BoringSSL (grpc) and OpenSSL (the ssl module) report when the peer's first bytes are not a TLS
# record: an h2c server's SETTINGS frame, or an HTTP/1 server's error page.
_PLAINTEXT_PEER = "WRONG_VERSION_NUMBER"


def _code_name(code: grpc.StatusCode) -> str:
    # Go's codes.Code String(): "Unavailable", "DeadlineExceeded", ...
    return "".join(p.capitalize() for p in code.name.split("_")) if code != grpc.StatusCode.CANCELLED \
        else "Canceled"


# ---------------------------------------------------------------- the exporter


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"failed to load TLS config: failed to load CA {path}: {e.strerror}") from None


class EncodedRequest:
    """A batch already written as an ExportTraceServiceRequest: what this exporter's queue holds
    (bytes, not span objects: less memory, and nothing for the garbage collector to walk)."""

    __slots__ = ("data", "spans")

    def __init__(self, data: bytes, spans: int) -> None:
        self.data = data
        self.spans = spans

    def span_count(self) -> int:
        return self.spans


class OTLPExporter(Exporter):
    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry, config: OTLPConfig) -> None:
        super().__init__(id, telemetry)
        self.config = config
        self.channel: grpc.Channel | None = None
        self.export_call: Any = None
        self._channel_lock = threading.Lock()
        self.encoder = OTLPEncoder()
        self.metadata = tuple((k.lower(), v) for k, v in config.headers.items())
        self.use_tls = config.endpoint.startswith("https://") or not config.tls.insecure
        self.sender: QueuedRetrySender[EncodedRequest] = QueuedRetrySender(
            telemetry, self._send, config.sending_queue, config.retry_on_failure)

    def _make_channel(self) -> grpc.Channel:
        c = self.config
        target = _strip_scheme(c.endpoint)
        use_tls = self.use_tls
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", -1),
            ("grpc.lb_policy_name", c.balancer_name or "pick_first"),  # "" is grpc's default, as in Go
            # Reconnect soon after a backend comes back: queued batches are waiting for it.
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        compression = grpc.Compression.Gzip if c.compression == "gzip" else grpc.Compression.NoCompression
        if not use_tls:
            return grpc.insecure_channel(target, options=options, compression=compression)
        key = _read(c.tls.key_file) if c.tls.key_file else None
        cert = _read(c.tls.cert_file) if c.tls.cert_file else None
        if c.tls.insecure_skip_verify:
            # grpcio cannot skip verification; trust whatever certificate the server presents instead.
            root: bytes | None = self._presented_certificate(target)
        else:
            root = _read(c.tls.ca_file) if c.tls.ca_file else None
        creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
        if c.tls.server_name_override:
            options.append(("grpc.ssl_target_name_override", c.tls.server_name_override))
        return grpc.secure_channel(target, creds, options=options, compression=compression)

    def _presented_certificate(self, target: str) -> bytes:
        """The server's certificate, for insecure_skip_verify; ExportError (retried) while it cannot be
        had, so that a backend still starting does not stop the collector from starting."""
        host, _, port = target.rpartition(":")
        try:
            pem = ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=self.config.timeout or 5.0)
        except OSError as e:
            if _PLAINTEXT_PEER in str(e):
                raise ExportError(self._plaintext_hint()) from None
            raise ExportError(f"cannot fetch the certificate of {self.config.endpoint} for "
                              f"tls::insecure_skip_verify: {e.strerror or e}") from None
        return pem.encode()

    def _plaintext_hint(self) -> str:
        return (f"{self.config.endpoint} does not speak TLS (the handshake got a plaintext answer): for a "
                f"plaintext endpoint set exporters::{self.id}::tls: {{insecure: true}}")

    def _connect(self) -> Any:
        """The Export call on a channel made once (on the first send when start could not)."""
        with self._channel_lock:
            if self.export_call is None:
                self.channel = self._make_channel()
                # Requests go out as bytes written by OTLPEncoder (no protobuf objects on the hot path).
                self.export_call = self.channel.unary_unary(
                    "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                    request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
            return self.export_call

    def start(self, host: Host) -> None:
        try:
            self._connect()
        except ExportError as e:
            self.telemetry.logger.warning("Not connected yet; trying again at each export", extra={"error": str(e)})
        self.sender.start()

    def consume(self, batch: SpanBatch) -> None:
        # Encoded here, in the caller's thread (the batch processor's), once: the spans are freed at
        # once rather than held in the queue, and the sender threads only wait on gRPC.
        n = batch.span_count()
        if n:
            self.sender.consume(EncodedRequest(self.encoder.encode(batch), n))

    def _send(self, req: EncodedRequest) -> None:
        export = self.export_call or self._connect()
        try:
            resp = export(req.data, timeout=self.config.timeout or None, metadata=self.metadata)
        except grpc.RpcError as e:
            err = classify_rpc_error(e)
            if self.use_tls and _PLAINTEXT_PEER in str(e.details() if hasattr(e, "details") else e):
                # grpc's text is a TSI_PROTOCOL_FAILURE and BoringSSL's reason: say what to change instead.
                err = ExportError(self._plaintext_hint(), throttle=err.throttle)
            raise err from None
        ps = resp.partial_success
        if ps.rejected_spans or ps.error_message:
            self.telemetry.warn_once_per(
                "partial", 5.0, "Partial success response (message %r, dropped_spans %d)",
                ps.error_message, ps.rejected_spans)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.sender.shutdown(timeout)
        if self.channel is not None:
            self.channel.close()


def _create(id: ComponentID, config: OTLPConfig, telemetry: ComponentTelemetry) -> OTLPExporter:
    return OTLPExporter(id, telemetry, config)


factory = Factory(
    type="otlp",
    kind=Kind.EXPORTER,
    config_model=OTLPConfig,
    create=_create,
    stability="beta",
    aliases=("otlp_grpc",),
    description="Sends spans over OTLP/gRPC with a sending queue and retries, like the collector's otlp exporter.",
)
