"""`otlphttp` exporter (alias `otlp_http`): OTLP/protobuf over HTTP POST, as the collector's otlphttpexporter.

Posts to `traces_endpoint`, else `{endpoint}/v1/traces`, with the standard library's http.client (one
keep-alive connection per sending thread). 429, 502, 503 and 504 are retried, honouring Retry-After;
other 4xx/5xx are permanent (dropped and counted).
"""

from __future__ import annotations

import gzip
import http.client
import ssl
import threading
import time
import urllib.parse
from email.utils import parsedate_to_datetime
from typing import Literal

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from pydantic import Field, model_validator

from collector.component import ComponentConfig, ComponentID, Exporter, Factory, Host, Kind
from collector.configtypes import Duration
from collector.otlp_encode import OTLPEncoder
from collector.spans import SpanBatch
from collector.telemetry import ComponentTelemetry
from exporters.otlp import TLSClientConfig
from exporters.sending_queue import ExportError, QueueConfig, QueuedRetrySender, RetryConfig

_RETRYABLE_STATUS = {429, 502, 503, 504}


class OTLPHTTPConfig(ComponentConfig):
    endpoint: str = ""
    traces_endpoint: str = ""
    tls: TLSClientConfig = Field(default_factory=TLSClientConfig)
    headers: dict[str, str] = Field(default_factory=dict)
    compression: Literal["gzip", "none", ""] = "gzip"
    encoding: Literal["proto"] = "proto"
    timeout: Duration = 30.0
    sending_queue: QueueConfig = Field(default_factory=QueueConfig)
    retry_on_failure: RetryConfig = Field(default_factory=RetryConfig)

    @model_validator(mode="after")
    def _check(self) -> OTLPHTTPConfig:
        if not self.endpoint and not self.traces_endpoint:
            raise ValueError("at least one endpoint must be specified")
        for name in ("endpoint", "traces_endpoint"):
            value = getattr(self, name)
            if value:
                u = urllib.parse.urlsplit(value)
                if u.scheme not in ("http", "https") or not u.hostname:
                    raise ValueError(f'invalid endpoint "{value}" for {name}: write it as a URL, '
                                     "e.g. http://localhost:4318")
                try:
                    u.port  # noqa: B018 (parses the port; urllib checks the range only here)
                except ValueError:
                    raise ValueError(f'invalid port in {name} "{value}": a port is 0-65535, '
                                     "e.g. http://localhost:4318") from None
        return self

    def url(self) -> str:
        if self.traces_endpoint:
            return self.traces_endpoint
        return self.endpoint.rstrip("/") + "/v1/traces"


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After: delay-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class OTLPHTTPExporter(Exporter):
    def __init__(self, id: ComponentID, telemetry: ComponentTelemetry, config: OTLPHTTPConfig) -> None:
        super().__init__(id, telemetry)
        self.config = config
        self.encoder = OTLPEncoder()
        u = urllib.parse.urlsplit(config.url())
        self.scheme = u.scheme
        self.host = u.hostname or "localhost"
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.headers = {"Content-Type": "application/x-protobuf", "User-Agent": "otelgo-collector",
                        **config.headers}
        if config.compression == "gzip":
            self.headers["Content-Encoding"] = "gzip"
        self._local = threading.local()
        self._ssl: ssl.SSLContext | None = None
        self.sender = QueuedRetrySender(telemetry, self._send, config.sending_queue, config.retry_on_failure)

    def start(self, host: Host) -> None:
        if self.scheme == "https":
            t = self.config.tls
            ctx = ssl.create_default_context(cafile=t.ca_file or None)
            if t.cert_file:
                ctx.load_cert_chain(t.cert_file, t.key_file)
            if t.insecure_skip_verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl = ctx
        self.sender.start()

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self.scheme == "https":
                server_hostname = self.config.tls.server_name_override or None
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.config.timeout or None,
                                                   context=self._ssl)
                if server_hostname:
                    conn._server_hostname = server_hostname  # type: ignore[attr-defined]
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.config.timeout or None)
            self._local.conn = conn
        return conn

    def consume(self, batch: SpanBatch) -> None:
        self.sender.consume(batch)

    def _send(self, batch: SpanBatch) -> None:
        body = self.encoder.encode(batch)
        if self.config.compression == "gzip":
            body = gzip.compress(body, compresslevel=6)
        conn = self._conn()
        try:
            conn.request("POST", self.path, body=body, headers=self.headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            self._local.conn = None
            raise ExportError(f"failed to make an HTTP request: {e}") from None
        if 200 <= resp.status < 300:
            if data and resp.getheader("Content-Type", "").startswith("application/x-protobuf"):
                r = ExportTraceServiceResponse()
                try:
                    r.ParseFromString(data)
                except Exception:  # noqa: BLE001 - a bad body is not a failed export
                    return
                ps = r.partial_success
                if ps.rejected_spans or ps.error_message:
                    self.telemetry.warn_once_per(
                        "partial", 5.0, "Partial success response (message %r, dropped_spans %d)",
                        ps.error_message, ps.rejected_spans)
            return
        text = f"error exporting items, request to {self.config.url()} responded with HTTP Status Code {resp.status}"
        if resp.status in _RETRYABLE_STATUS:
            raise ExportError(text, throttle=parse_retry_after(resp.getheader("Retry-After")))
        raise ExportError(text, permanent=True)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.sender.shutdown(timeout)


def _create(id: ComponentID, config: OTLPHTTPConfig, telemetry: ComponentTelemetry) -> OTLPHTTPExporter:
    return OTLPHTTPExporter(id, telemetry, config)


factory = Factory(
    type="otlphttp",
    kind=Kind.EXPORTER,
    config_model=OTLPHTTPConfig,
    create=_create,
    stability="beta",
    aliases=("otlp_http",),
    description="Sends spans as OTLP/protobuf over HTTP with a sending queue and retries.",
)
