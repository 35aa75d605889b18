"""User story: spans sent over OTLP/gRPC go through otlp → batch → file and debug, complete and counted."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.spans import STATUS_ERROR, SpanBatch, from_json_dict
from tests.support.collector import CollectorProcess, free_port, json_lines, wait_for_port
from tests.support.otelsdk import send_traces


def read_file_export(path: Path) -> list[SpanBatch]:
    return [from_json_dict(doc) for doc in json_lines(path)]


def wait_for_spans(path: Path, n: int, timeout: float = 20.0) -> SpanBatch:
    deadline = time.monotonic() + timeout
    while True:
        merged = SpanBatch.merge(read_file_export(path))
        if merged.span_count() >= n or time.monotonic() > deadline:
            return merged
        time.sleep(0.1)


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def pipeline_config(tmp_path: Path, grpc_port: int, **batch: object) -> dict:
    return {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{grpc_port}"}}}},
        "processors": {"batch": {"timeout": "100ms", **batch}},
        "exporters": {"file": {"path": str(tmp_path / "out.jsonl"), "flush_interval": "50ms"},
                      "debug": {"verbosity": "detailed"}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"],
                                             "exporters": ["file", "debug"]}}},
    }


def test_sdk_spans_arrive_complete_in_file_and_debug(tmp_path: Path) -> None:
    port = free_port()
    with CollectorProcess(pipeline_config(tmp_path, port), tmp_path) as col:
        col.wait_ready()
        sent = send_traces(f"127.0.0.1:{port}", n_traces=20)
        got = wait_for_spans(tmp_path / "out.jsonl", len(sent))
        metrics = metric_values(col.scrape())
        log = col.log()
    assert got.span_count() == len(sent) == 60
    by_id = {s.span_id: (rs, ss, s) for rs, ss, s in got.iter_spans()}
    for want in sent:
        ctx = want.get_span_context()
        rs, ss, s = by_id[ctx.span_id.to_bytes(8, "big")]
        assert s.trace_id == ctx.trace_id.to_bytes(16, "big")
        assert s.name == want.name
        want_parent = want.parent.span_id.to_bytes(8, "big") if want.parent else b""
        assert s.parent_span_id == want_parent
        assert s.start_time_unix_nano == want.start_time and s.end_time_unix_nano == want.end_time
        assert s.kind == want.kind.value + 1  # SDK enum is 0-based INTERNAL; OTLP adds UNSPECIFIED=0
        assert s.attributes == {k: list(v) if isinstance(v, tuple) else v for k, v in want.attributes.items()}
        assert [(e.name, e.time_unix_nano, e.attributes) for e in s.events] == \
               [(e.name, e.timestamp, dict(e.attributes)) for e in want.events]
        assert [(lk.trace_id, lk.span_id, lk.attributes) for lk in s.links] == \
               [(lk.context.trace_id.to_bytes(16, "big"), lk.context.span_id.to_bytes(8, "big"),
                 dict(lk.attributes)) for lk in want.links]
        if want.status.is_ok is False and want.status.description:
            assert (s.status_code, s.status_message) == (STATUS_ERROR, "failed on purpose")
        assert rs.resource.attributes["service.name"] == "sdk-client"
        assert rs.resource.attributes["deployment.environment"] == "test"
        assert (ss.scope.name, ss.scope.version) == ("e2e.scope", "1.2.3")
    # Counts in the collector's metric names and labels.
    assert metrics[("otelcol_receiver_accepted_spans_total", (("receiver", "otlp"), ("transport", "grpc")))] == 60
    assert metrics[("otelcol_receiver_refused_spans_total", (("receiver", "otlp"), ("transport", "grpc")))] == 0
    assert metrics[("otelcol_processor_incoming_items_total", (("otel_signal", "traces"), ("processor", "batch")))] == 60
    assert metrics[("otelcol_processor_outgoing_items_total", (("otel_signal", "traces"), ("processor", "batch")))] == 60
    assert metrics[("otelcol_exporter_sent_spans_total", (("exporter", "file"),))] == 60
    assert metrics[("otelcol_exporter_sent_spans_total", (("exporter", "debug"),))] == 60
    assert metrics[("otelcol_process_memory_rss", ())] > 10_000_000
    assert metrics[("otelcol_process_uptime_total", ())] > 0
    assert ("otelcol_process_cpu_seconds_total", ()) in metrics
    # The debug exporter printed the spans in the collector's detailed layout.
    assert "Span #0" in log and "Trace ID       :" in log and "     -> str: Str(v)" in log


def test_fan_out_and_fan_in_with_shared_components(tmp_path: Path) -> None:
    """Two receivers, two pipelines: otlp/a feeds both, otlp/b only the second; file/shared gets both."""
    pa, pb = free_port(), free_port()
    cfg = {
        "receivers": {"otlp/a": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{pa}"}}},
                      "otlp/b": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{pb}"}}}},
        "processors": {"batch": {"timeout": "50ms"}},
        "exporters": {"file/shared": {"path": str(tmp_path / "shared.jsonl"), "flush_interval": "50ms"},
                      "file/only1": {"path": str(tmp_path / "only1.jsonl"), "flush_interval": "50ms"},
                      "debug": {}},
        "service": {"pipelines": {
            "traces/1": {"receivers": ["otlp/a"], "processors": ["batch"], "exporters": ["file/shared", "file/only1"]},
            "traces/2": {"receivers": ["otlp/a", "otlp/b"], "exporters": ["file/shared", "debug"]},
        }},
    }
    with CollectorProcess(cfg, tmp_path) as col:
        col.wait_ready()
        sent_a = send_traces(f"127.0.0.1:{pa}", n_traces=10, service="a")   # 30 spans
        sent_b = send_traces(f"127.0.0.1:{pb}", n_traces=5, service="b")    # 15 spans
        # otlp/a reaches file/shared twice (once per pipeline), otlp/b once.
        shared = wait_for_spans(tmp_path / "shared.jsonl", 2 * len(sent_a) + len(sent_b))
        only1 = wait_for_spans(tmp_path / "only1.jsonl", len(sent_a))
        time.sleep(0.5)
        metrics = metric_values(col.scrape())
    services = [rs.resource.attributes["service.name"] for rs, _, _ in shared.iter_spans()]
    assert services.count("a") == 60 and services.count("b") == 15
    assert only1.span_count() == 30
    assert {rs.resource.attributes["service.name"] for rs, _, _ in only1.iter_spans()} == {"a"}
    m = metrics
    assert m[("otelcol_receiver_accepted_spans_total", (("receiver", "otlp/a"), ("transport", "grpc")))] == 30
    assert m[("otelcol_receiver_accepted_spans_total", (("receiver", "otlp/b"), ("transport", "grpc")))] == 15
    assert m[("otelcol_exporter_sent_spans_total", (("exporter", "file/shared"),))] == 75
    assert m[("otelcol_exporter_sent_spans_total", (("exporter", "file/only1"),))] == 30
    assert m[("otelcol_exporter_sent_spans_total", (("exporter", "debug"),))] == 45


def test_sigterm_drains_spans_held_by_batch_processor(tmp_path: Path) -> None:
    port = free_port()
    cfg = pipeline_config(tmp_path, port, timeout="60s", send_batch_size=100000)
    col = CollectorProcess(cfg, tmp_path)
    col.wait_ready()
    sent = send_traces(f"127.0.0.1:{port}", n_traces=50)
    time.sleep(0.3)
    # Held in the batch processor: nothing written yet.
    assert read_file_export(tmp_path / "out.jsonl") == []
    assert col.stop(signal.SIGTERM) == 0
    got = SpanBatch.merge(read_file_export(tmp_path / "out.jsonl"))
    assert got.span_count() == len(sent) == 150
    assert {s.span_id for _, _, s in got.iter_spans()} == {
        sp.get_span_context().span_id.to_bytes(8, "big") for sp in sent}
    assert "Shutdown complete." in col.log()


def test_sigint_exits_zero(tmp_path: Path) -> None:
    col = CollectorProcess(pipeline_config(tmp_path, free_port()), tmp_path)
    col.wait_ready()
    assert col.stop(signal.SIGINT) == 0


def test_health_check_extension(tmp_path: Path) -> None:
    hport = free_port()
    cfg = pipeline_config(tmp_path, free_port())
    cfg["extensions"] = {"health_check": {"endpoint": f"127.0.0.1:{hport}"}}
    cfg["service"]["extensions"] = ["health_check"]
    with CollectorProcess(cfg, tmp_path) as col:
        col.wait_ready()
        with urllib.request.urlopen(f"http://127.0.0.1:{hport}/", timeout=5) as r:
            body = json.loads(r.read())
            assert r.status == 200
    assert body["status"] == "Server available" and "upSince" in body


def test_legacy_address_and_readers_forms(tmp_path: Path) -> None:
    port = free_port()
    cfg = pipeline_config(tmp_path, free_port())
    cfg["service"]["telemetry"] = {"metrics": {"readers": [
        {"pull": {"exporter": {"prometheus": {"host": "127.0.0.1", "port": port}}}}]}}
    with CollectorProcess(cfg, tmp_path) as col:
        col.wait_ready()
        wait_for_port(port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"otelcol_process_uptime_total" in r.read()


def test_json_log_encoding(tmp_path: Path) -> None:
    cfg = pipeline_config(tmp_path, free_port())
    cfg["service"]["telemetry"] = {"logs": {"encoding": "json", "level": "debug"}}
    with CollectorProcess(cfg, tmp_path) as col:
        col.wait_ready()
        lines = [json.loads(line) for line in col.log().splitlines() if line.startswith("{")]
    assert any(d["msg"] == "Everything is ready. Begin running and processing data." for d in lines)
    assert all({"level", "ts", "msg"} <= d.keys() for d in lines)


PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")


def test_promtool_accepts_metrics(tmp_path: Path) -> None:
    if PROMTOOL is None:
        pytest.fail("promtool not installed: run `make setup` (Debian package prometheus)")
    port = free_port()
    with CollectorProcess(pipeline_config(tmp_path, port), tmp_path) as col:
        col.wait_ready()
        send_traces(f"127.0.0.1:{port}", n_traces=2)
        time.sleep(0.5)
        text = col.scrape()
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_real_prometheus_scrapes_counts(tmp_path: Path) -> None:
    if PROMETHEUS is None:
        pytest.fail("prometheus not installed: run `make setup` (Debian package prometheus)")
    port = free_port()
    with CollectorProcess(pipeline_config(tmp_path, port), tmp_path) as col:
        col.wait_ready()
        send_traces(f"127.0.0.1:{port}", n_traces=7)
        prom_port = free_port()
        (tmp_path / "prom.yml").write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: otelgo\n    static_configs: [{{targets: ['127.0.0.1:{col.metrics_port}']}}]\n")
        prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prom.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(prom_port, proc=prom)
            q = "otelcol_receiver_accepted_spans_total"
            value = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and value != 21.0:
                try:
                    with urllib.request.urlopen(
                            f"http://127.0.0.1:{prom_port}/api/v1/query?query={q}", timeout=5) as r:
                        res = json.loads(r.read())["data"]["result"]
                except urllib.error.HTTPError as e:
                    if e.code != 503:  # 503: Prometheus listens before its storage is ready
                        raise
                    res = []
                if res:
                    value = float(res[0]["value"][1])
                    labels = res[0]["metric"]
                time.sleep(0.5)
        finally:
            prom.terminate()
            prom.wait(10)
    assert value == 21.0
    assert labels["receiver"] == "otlp" and labels["transport"] == "grpc" and labels["job"] == "otelgo"
