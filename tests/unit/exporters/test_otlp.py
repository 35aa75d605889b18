"""otlp exporter: config, headers, gzip on the wire, TLS, retryable codes, RetryInfo, partial success,
queue full, drain on shutdown."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from pydantic import ValidationError

from collector.component import ComponentID
from collector.errors import ConsumerError
from exporters.otlp import OTLPConfig, OTLPExporter, factory, retry_delay_from_status_details
from tests.unit.exporters.backend import Backend, batch, metric, telemetry
from tests.unit.exporters.h2sniff import SniffProxy

FAST_RETRY = {"initial_interval": "10ms", "max_interval": "50ms", "max_elapsed_time": "2s"}


def make(endpoint: str, **over: object) -> tuple[OTLPExporter, object]:
    cfg = {"endpoint": endpoint, "tls": {"insecure": True}, "retry_on_failure": FAST_RETRY, **over}
    t = telemetry()
    e = OTLPExporter(ComponentID("otlp"), t, OTLPConfig.model_validate(cfg))
    e.start(None)  # type: ignore[arg-type]
    return e, t


@pytest.fixture
def backend():
    b = Backend()
    yield b
    b.stop()


def logs(caplog) -> str:
    """Messages with their structured fields (error, interval, dropped_items...)."""
    return "\n".join(f"{r.getMessage()} {getattr(r, 'error', '')}" for r in caplog.records)


def wait(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


# ------------------------------------------------------------------ config


def test_defaults_match_the_collector():
    c = OTLPConfig.model_validate({"endpoint": "collector:4317"})
    assert c.compression == "gzip" and c.timeout == 5.0 and c.tls.insecure is False
    q, r = c.sending_queue, c.retry_on_failure
    assert (q.enabled, q.num_consumers, q.queue_size) == (True, 10, 1000)
    assert (r.enabled, r.initial_interval, r.max_interval, r.max_elapsed_time, r.multiplier,
            r.randomization_factor) == (True, 5.0, 30.0, 300.0, 1.5, 0.5)
    assert factory.type == "otlp" and "otlp_grpc" in factory.aliases


@pytest.mark.parametrize("cfg, message", [
    ({}, 'requires a non-empty "endpoint"'),
    ({"endpoint": "x:4317", "sending_queue": {"num_consumers": 0}}, "`num_consumers` must be positive"),
    ({"endpoint": "x:4317", "sending_queue": {"queue_size": 0}}, "`queue_size` must be positive"),
    ({"endpoint": "x:4317", "retry_on_failure": {"max_elapsed_time": "1s"}},
     "'max_elapsed_time' must not be less than 'initial_interval'"),
    ({"endpoint": "x:4317", "retry_on_failure": {"initial_interval": "1s", "max_elapsed_time": "10s"}},
     "'max_elapsed_time' must not be less than 'max_interval'"),
    ({"endpoint": "x:4317", "retry_on_failure": {"randomization_factor": 2}},
     "randomization_factor value must be less than or equal to 1"),
    ({"endpoint": "x:4317", "tls": {"cert_file": "c.pem"}}, "provide both certificate and key, or neither"),
    ({"endpoint": "x:4317", "compression": "brotli"}, "compression"),
    ({"endpoint": "x:4317", "bogus": 1}, "bogus"),
    ({"endpoint": "localhost:99999"}, 'invalid port "99999" in endpoint "localhost:99999": a port is 1-65535'),
    ({"endpoint": "http://localhost:43x7"}, 'invalid port "43x7" in endpoint "http://localhost:43x7"'),
    ({"endpoint": "localhost"}, 'invalid port in endpoint "localhost": write it as host:port'),
    # grpc core logged (to a stderr we silence) that it did not know the name, and used pick_first.
    ({"endpoint": "x:4317", "balancer_name": "roundrobin"},
     "invalid balancer_name: roundrobin (use round_robin, pick_first or weighted_round_robin)"),
])
def test_validation_errors(cfg, message):
    with pytest.raises(ValidationError) as ei:
        OTLPConfig.model_validate(cfg)
    assert message in str(ei.value)


# ------------------------------------------------------------------ wire


def test_headers_arrive_and_spans_survive(backend):
    e, t = make(backend.endpoint, headers={"X-Api-Key": "s3cret", "tenant": "a"})
    e.consume(batch(5))
    e.shutdown(5)
    assert backend.span_count() == 5
    assert backend.metadata[0]["x-api-key"] == "s3cret" and backend.metadata[0]["tenant"] == "a"
    assert metric(t, "otelcol_exporter_sent_spans") == 5


@pytest.mark.parametrize("compression, flag", [("gzip", 1), ("none", 0)])
def test_gzip_is_used_on_the_wire(backend, compression, flag):
    proxy = SniffProxy(backend.port)
    try:
        e, _ = make(f"127.0.0.1:{proxy.port}", compression=compression)
        e.consume(batch(200))
        e.shutdown(5)
        assert backend.span_count() == 200
        assert proxy.compressed_flags and set(proxy.compressed_flags) == {flag}
    finally:
        proxy.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ca")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=otelgo test CA", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def test_tls_with_a_test_ca_and_client_cert(test_ca):
    creds = grpc.ssl_server_credentials([((test_ca / "server.key").read_bytes(), (test_ca / "server.pem").read_bytes())],
                                        root_certificates=(test_ca / "ca.pem").read_bytes(),
                                        require_client_auth=True)
    b = Backend(credentials=creds)
    try:
        tls = {"ca_file": str(test_ca / "ca.pem"), "cert_file": str(test_ca / "client.pem"),
               "key_file": str(test_ca / "client.key")}
        e, t = make(f"localhost:{b.port}", tls=tls)
        e.consume(batch(3))
        e.shutdown(5)
        assert b.span_count() == 3 and metric(t, "otelcol_exporter_sent_spans") == 3
        # Without our CA the server is not trusted: the export fails (Unavailable, retried, then dropped).
        e2, t2 = make(f"localhost:{b.port}", tls={}, retry_on_failure={"enabled": False})
        e2.consume(batch(2))
        e2.shutdown(5)
        assert b.span_count() == 3 and metric(t2, "otelcol_exporter_send_failed_spans") == 2
    finally:
        b.stop()


def test_server_name_override(test_ca):
    creds = grpc.ssl_server_credentials([((test_ca / "server.key").read_bytes(), (test_ca / "server.pem").read_bytes())])
    b = Backend(credentials=creds)
    try:
        e, _ = make(f"127.0.0.1:{b.port}", tls={"ca_file": str(test_ca / "ca.pem"), "server_name_override": "localhost"})
        e.consume(batch(1))
        e.shutdown(5)
        assert b.span_count() == 1
    finally:
        b.stop()


# ------------------------------------------------------------------ failures


def _fail_times(n: int, code: grpc.StatusCode, details: bytes | None = None):
    state = {"left": n}

    def behaviour(request, context):
        if state["left"] > 0:
            state["left"] -= 1
            if details is not None:
                context.set_trailing_metadata([("grpc-status-details-bin", details)])
            context.abort(code, "injected")
        return None
    return behaviour


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
                                  grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS])
def test_retryable_codes_are_retried(backend, code, caplog):
    backend.behaviour = _fail_times(2, code)
    e, t = make(backend.endpoint)
    with caplog.at_level(logging.INFO, logger="otelgo"):
        e.consume(batch(4))
        assert wait(lambda: backend.span_count() == 4)
        e.shutdown(5)
    assert len(backend.metadata) == 3
    assert metric(t, "otelcol_exporter_sent_spans") == 4 and metric(t, "otelcol_exporter_send_failed_spans") == 0
    assert "Exporting failed. Will retry the request after interval." in logs(caplog)


def test_a_batch_is_encoded_once_and_retried_as_the_same_request(backend):
    from collector.spans import to_proto
    backend.behaviour = _fail_times(2, grpc.StatusCode.UNAVAILABLE)
    e, t = make(backend.endpoint)
    calls = []
    encode = e.encoder.encode
    e.encoder.encode = lambda b: calls.append(b) or encode(b)  # type: ignore[method-assign]
    b = batch(4)
    e.consume(b)
    b.resource_spans[0].scope_spans[0].spans[0].name = "changed after consume"  # the queue holds bytes
    assert wait(lambda: backend.span_count() == 4)
    e.shutdown(5)
    assert len(calls) == 1 and len(backend.metadata) == 3
    (got,) = backend.requests
    assert got.resource_spans[0].scope_spans[0].spans[0].name != "changed after consume"
    assert got == to_proto(batch(4))
    assert metric(t, "otelcol_exporter_sent_spans") == 4


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL])
def test_other_codes_are_permanent_and_dropped(backend, code, caplog):
    backend.behaviour = _fail_times(1, code)
    e, t = make(backend.endpoint)
    with caplog.at_level(logging.INFO, logger="otelgo"):
        e.consume(batch(4))
        e.shutdown(5)
    assert len(backend.metadata) == 1 and backend.span_count() == 0
    assert metric(t, "otelcol_exporter_send_failed_spans") == 4
    assert "Exporting failed. Dropping data." in logs(caplog)
    assert "not retryable error" in logs(caplog)


def _retry_info(seconds: float) -> bytes:
    ri = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(seconds),
                                                                       nanos=int((seconds % 1) * 1e9)))
    st = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="slow down")
    st.details.add().Pack(ri)
    return st.SerializeToString()


def test_retry_info_is_decoded():
    assert retry_delay_from_status_details(_retry_info(1.25)) == pytest.approx(1.25)
    assert retry_delay_from_status_details(status_pb2.Status(code=14).SerializeToString()) is None
    assert retry_delay_from_status_details(b"\xff\xff") is None


def test_resource_exhausted_with_retry_info_waits_the_server_delay(backend):
    backend.behaviour = _fail_times(1, grpc.StatusCode.RESOURCE_EXHAUSTED, _retry_info(0.4))
    e, t = make(backend.endpoint)
    t0 = time.monotonic()
    e.consume(batch(2))
    assert wait(lambda: backend.span_count() == 2)
    elapsed = time.monotonic() - t0
    e.shutdown(5)
    assert elapsed >= 0.4  # max(backoff ≈ 10 ms, throttle 400 ms)
    assert metric(t, "otelcol_exporter_sent_spans") == 2


def test_gives_up_after_max_elapsed_time(backend, caplog):
    backend.behaviour = _fail_times(10**6, grpc.StatusCode.UNAVAILABLE)
    e, t = make(backend.endpoint, retry_on_failure={"initial_interval": "50ms", "max_interval": "100ms",
                                                    "max_elapsed_time": "300ms"})
    with caplog.at_level(logging.INFO, logger="otelgo"):
        e.consume(batch(3))
        assert wait(lambda: metric(t, "otelcol_exporter_send_failed_spans") == 3)
        e.shutdown(1)
    assert "no more retries left" in logs(caplog)


def test_partial_success_counts_as_sent_and_warns(backend, caplog):
    def partial(request, context):
        r = trace_service_pb2.ExportTraceServiceResponse()
        r.partial_success.rejected_spans = 1
        r.partial_success.error_message = "span too old"
        return r
    backend.behaviour = partial
    e, t = make(backend.endpoint)
    with caplog.at_level(logging.INFO, logger="otelgo"):
        e.consume(batch(3))
        e.shutdown(5)
    assert metric(t, "otelcol_exporter_sent_spans") == 3
    assert "Partial success response" in logs(caplog) and "span too old" in logs(caplog)


def test_queue_full_refuses_and_counts(backend, caplog):
    gate = threading.Event()

    def blocked(request, context):
        gate.wait(10)
        return None
    backend.behaviour = blocked
    e, t = make(backend.endpoint, sending_queue={"num_consumers": 1, "queue_size": 2}, timeout="20s")
    with caplog.at_level(logging.INFO, logger="otelgo"):
        e.consume(batch(1))  # taken by the consumer, blocked in the backend
        assert wait(lambda: e.sender.queue_size() == 0)
        e.consume(batch(1))
        e.consume(batch(1))  # queue holds 2
        with pytest.raises(ConsumerError) as ei:
            e.consume(batch(5))
    assert str(ei.value) == "sending queue is full" and not ei.value.permanent
    assert metric(t, "otelcol_exporter_enqueue_failed_spans") == 5
    assert "sending queue is full" in logs(caplog)
    gate.set()
    e.shutdown(5)
    assert backend.span_count() == 3 and metric(t, "otelcol_exporter_sent_spans") == 3


def test_shutdown_drains_the_queue(backend):
    e, t = make(backend.endpoint, sending_queue={"num_consumers": 2, "queue_size": 500})
    for i in range(200):
        e.consume(batch(10, start=i * 10))
    e.shutdown(10)
    assert backend.span_count() == 2000 and metric(t, "otelcol_exporter_sent_spans") == 2000


def test_queue_disabled_returns_the_error_to_the_caller(backend):
    backend.behaviour = _fail_times(1, grpc.StatusCode.INVALID_ARGUMENT)
    e, t = make(backend.endpoint, sending_queue={"enabled": False})
    with pytest.raises(ConsumerError) as ei:
        e.consume(batch(2))
    assert ei.value.permanent and "not retryable error" in str(ei.value)
    e.consume(batch(2))
    e.shutdown(1)
    assert backend.span_count() == 2
    assert metric(t, "otelcol_exporter_send_failed_spans") == 2 and metric(t, "otelcol_exporter_sent_spans") == 2


def test_insecure_skip_verify_trusts_the_presented_certificate(test_ca):
    creds = grpc.ssl_server_credentials([((test_ca / "server.key").read_bytes(),
                                          (test_ca / "server.pem").read_bytes())])
    b = Backend(credentials=creds)
    try:
        e, t = make(f"localhost:{b.port}", tls={"insecure_skip_verify": True})
        e.consume(batch(2))
        e.shutdown(5)
        assert b.span_count() == 2 and metric(t, "otelcol_exporter_sent_spans") == 2
    finally:
        b.stop()


def test_https_scheme_forces_tls_even_with_insecure(test_ca):
    creds = grpc.ssl_server_credentials([((test_ca / "server.key").read_bytes(),
                                          (test_ca / "server.pem").read_bytes())])
    b = Backend(credentials=creds)
    try:
        e, t = make(f"https://localhost:{b.port}", tls={"insecure": True, "ca_file": str(test_ca / "ca.pem")})
        e.consume(batch(1))
        e.shutdown(5)
        assert b.span_count() == 1
    finally:
        b.stop()


@pytest.mark.parametrize("balancer", ["round_robin", "pick_first", "weighted_round_robin", ""])
def test_every_accepted_balancer_name_delivers(backend, balancer):
    e, _ = make(backend.endpoint, balancer_name=balancer)
    e.consume(batch(1))
    e.shutdown(5)
    assert backend.span_count() == 1


def test_insecure_skip_verify_starts_before_its_backend_and_delivers_once_it_is_up(test_ca, caplog):
    """The certificate to trust is fetched from the server; a backend still starting used to stop the
    collector's start with a ConnectionRefusedError traceback."""
    from tests.support.collector import free_port

    port = free_port()
    with caplog.at_level(logging.WARNING, logger="otelgo"):
        e, t = make(f"localhost:{port}", tls={"insecure_skip_verify": True})
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == "Not connected yet; trying again at each export"
    assert getattr(warning, "error", "").startswith(f"cannot fetch the certificate of localhost:{port} for "
                                                    "tls::insecure_skip_verify: ")
    creds = grpc.ssl_server_credentials([((test_ca / "server.key").read_bytes(),
                                          (test_ca / "server.pem").read_bytes())])
    b = Backend(port=port, credentials=creds)
    try:
        e.consume(batch(2))
        e.shutdown(5)
        assert b.span_count() == 2 and metric(t, "otelcol_exporter_sent_spans") == 2
    finally:
        b.stop()


@pytest.mark.parametrize("tls", [{}, {"insecure_skip_verify": True}], ids=["verify", "insecure_skip_verify"])
def test_tls_against_a_plaintext_endpoint_says_to_set_insecure(backend, caplog, tls):
    """The default is TLS; most local collectors listen in plaintext. One line says what to change."""
    cfg = {"endpoint": backend.endpoint, "tls": tls, "retry_on_failure": {**FAST_RETRY, "max_elapsed_time": "300ms"}}
    e = OTLPExporter(ComponentID("otlp"), telemetry(), OTLPConfig.model_validate(cfg))
    e.start(None)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="otelgo"):
        e.consume(batch(1))
        e.shutdown(5)
    errors = {getattr(r, "error", "") for r in caplog.records if getattr(r, "error", "")}
    hint = (f"{backend.endpoint} does not speak TLS (the handshake got a plaintext answer): for a "
            "plaintext endpoint set exporters::otlp::tls: {insecure: true}")
    assert errors and all(err.endswith(hint) for err in errors), errors  # retries, then the drop
    assert not any("\n" in f"{r.getMessage()} {getattr(r, 'error', '')}" for r in caplog.records)
    assert backend.span_count() == 0


def test_grpc_core_writes_nothing_to_stderr_on_a_failed_handshake(backend):
    """grpc-core's own log lines (ssl_transport_security.cc ...) never reach the operator's stderr."""
    import os
    import sys

    code = (f"from exporters.otlp import OTLPConfig, OTLPExporter\n"
            f"from collector.component import ComponentID\n"
            f"from tests.unit.exporters.backend import batch, telemetry\n"
            f"e = OTLPExporter(ComponentID('otlp'), telemetry(), OTLPConfig.model_validate({{'endpoint': "
            f"'{backend.endpoint}', 'sending_queue': {{'enabled': False}}, 'retry_on_failure': {{'enabled': False}}}}))\n"
            f"e.start(None)\n"
            f"try:\n    e.consume(batch(1))\nexcept Exception as err:\n    print('failed:', err)\n")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                       cwd=Path(__file__).resolve().parents[3])
    assert "does not speak TLS" in r.stdout, r.stdout + r.stderr
    assert "ssl_transport_security" not in r.stderr and "Handshake failed" not in r.stderr, r.stderr
    import re

    core = [ln for ln in r.stderr.splitlines() if re.match(r"[IWEF]\d{4} \d\d:", ln) or "handshaker" in ln]
    assert core == []  # grpc-core's lines look like "I1203 09:08:20.748311 6906 ssl_transport_security.cc:..."
