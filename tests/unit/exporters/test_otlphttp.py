"""otlphttp exporter: path, headers, gzip body, 429/503 retried with Retry-After, 400 permanent."""

from __future__ import annotations

import gzip
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from pydantic import ValidationError

from collector.component import ComponentID
from exporters.otlphttp import OTLPHTTPConfig, OTLPHTTPExporter, factory, parse_retry_after
from tests.unit.exporters.backend import batch, metric, telemetry


class HTTPBackend:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], ExportTraceServiceRequest]] = []
        self.statuses: list[tuple[int, dict[str, str]]] = []  # responses to give first
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.statuses:
                    status, headers = outer.statuses.pop(0)
                    outer.requests.append((self.path, dict(self.headers), ExportTraceServiceRequest()))
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                outer.requests.append((self.path, dict(self.headers), req))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> int:
        return sum(len(ss.spans) for _, _, r in self.requests for rs in r.resource_spans for ss in rs.scope_spans)

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def backend():
    b = HTTPBackend()
    yield b
    b.stop()


def make(**cfg: object):
    t = telemetry("otlphttp")
    full = {"retry_on_failure": {"initial_interval": "10ms", "max_interval": "50ms", "max_elapsed_time": "5s"},
            **cfg}
    e = OTLPHTTPExporter(ComponentID("otlphttp"), t, OTLPHTTPConfig.model_validate(full))
    e.start(None)  # type: ignore[arg-type]
    return e, t


def test_config():
    assert factory.type == "otlphttp" and "otlp_http" in factory.aliases
    c = OTLPHTTPConfig.model_validate({"endpoint": "http://x:4318"})
    assert c.url() == "http://x:4318/v1/traces" and c.compression == "gzip"
    assert OTLPHTTPConfig.model_validate({"endpoint": "http://x:4318", "traces_endpoint": "http://y/t"}).url() == "http://y/t"
    with pytest.raises(ValidationError, match="at least one endpoint must be specified"):
        OTLPHTTPConfig.model_validate({})
    with pytest.raises(ValidationError, match="invalid endpoint"):
        OTLPHTTPConfig.model_validate({"endpoint": "x:4318"})


def test_posts_gzip_protobuf_with_headers(backend):
    e, t = make(endpoint=f"http://127.0.0.1:{backend.port}", headers={"Authorization": "Bearer t"})
    e.consume(batch(7))
    e.shutdown(5)
    path, headers, _ = backend.requests[0]
    assert path == "/v1/traces" and headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"] == "application/x-protobuf" and headers["Authorization"] == "Bearer t"
    assert backend.spans() == 7 and metric(t, "otelcol_exporter_sent_spans") == 7


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_statuses_honour_retry_after(backend, status):
    backend.statuses = [(status, {"Retry-After": "1"})]
    e, t = make(endpoint=f"http://127.0.0.1:{backend.port}", compression="none")
    t0 = time.monotonic()
    e.consume(batch(2))
    deadline = time.monotonic() + 5
    while backend.spans() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    e.shutdown(5)
    assert backend.spans() == 2 and elapsed >= 1.0
    assert metric(t, "otelcol_exporter_sent_spans") == 2 and metric(t, "otelcol_exporter_send_failed_spans") == 0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 500])
def test_other_statuses_are_permanent(backend, status):
    backend.statuses = [(status, {})]
    e, t = make(endpoint=f"http://127.0.0.1:{backend.port}")
    e.consume(batch(3))
    e.shutdown(5)
    assert len(backend.requests) == 1 and metric(t, "otelcol_exporter_send_failed_spans") == 3


def test_connection_refused_is_retried_then_dropped():
    e, t = make(endpoint="http://127.0.0.1:9", retry_on_failure={"initial_interval": "10ms", "max_interval": "20ms",
                                                                 "max_elapsed_time": "100ms"})
    e.consume(batch(2))
    deadline = time.monotonic() + 5
    while metric(t, "otelcol_exporter_send_failed_spans") < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    e.shutdown(1)
    assert metric(t, "otelcol_exporter_send_failed_spans") == 2


def test_retry_after_forms():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert 0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # type: ignore[operator]
