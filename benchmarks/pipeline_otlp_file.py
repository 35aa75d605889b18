"""Spans/s through otlp → batch → file, with the collector pinned to one core, and its RSS.

Run: .venv/bin/python benchmarks/pipeline_otlp_file.py [--spans 200000] [--batch 512]
The load generator (this process) runs on the other core and sends pre-built OTLP requests.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collector.spans import (  # noqa: E402
    KIND_SERVER,
    Resource,
    ResourceSpans,
    Scope,
    ScopeSpans,
    Span,
    SpanBatch,
    to_proto,
)
from tests.support.collector import CollectorProcess, free_port  # noqa: E402


def request(n: int, seq: int) -> bytes:
    base = time.time_ns()
    spans = [Span(seq.to_bytes(8, "big") + i.to_bytes(8, "big"), (seq * n + i + 1).to_bytes(8, "big"),
                  "GET /items/{id}", kind=KIND_SERVER, start_time_unix_nano=base, end_time_unix_nano=base + 1000,
                  attributes={"http.request.method": "GET", "url.path": f"/items/{i}", "http.route": "/items/{id}",
                              "http.response.status_code": 200, "server.port": 8080,
                              "network.peer.address": "127.0.0.1", "user_agent.original": "bench/1.0"})
             for i in range(n)]
    b = SpanBatch([ResourceSpans(Resource({"service.name": "bench", "process.pid": 1}),
                                 [ScopeSpans(Scope("bench"), spans)])])
    return to_proto(b).SerializeToString()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spans", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    port = free_port()
    cfg = {
        "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{port}"}}}},
        "processors": {"batch": {"timeout": "200ms", "send_batch_size": 8192}},
        "exporters": {"file": {"path": str(work / "out.jsonl")}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"],
                                             "exporters": ["file"]}}},
    }
    col = CollectorProcess(cfg, work)
    os.sched_setaffinity(col.proc.pid, {0})
    for t in os.listdir(f"/proc/{col.proc.pid}/task"):
        os.sched_setaffinity(int(t), {0})
    rss_rest = rss_kb(col.proc.pid)
    payloads = [request(args.batch, s) for s in range(8)]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)
    n_requests = args.spans // args.batch
    peak = rss_rest
    t0 = time.perf_counter()
    futures = []
    for i in range(n_requests):
        futures.append(export.future(payloads[i % len(payloads)]))
        if len(futures) >= 4:  # 4 requests in flight, like a few concurrent clients
            futures.pop(0).result()
        if i % 50 == 0:
            peak = max(peak, rss_kb(col.proc.pid))
    for f in futures:
        f.result()
    sent = n_requests * args.batch
    # Wait until the file exporter counted every span.
    while True:
        text = col.scrape()
        line = [x for x in text.splitlines() if x.startswith('otelcol_exporter_sent_spans_total{exporter="file"}')]
        if line and float(line[0].split()[-1]) >= sent:
            break
        peak = max(peak, rss_kb(col.proc.pid))
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    cpu = [float(x.split()[-1]) for x in text.splitlines() if x.startswith("otelcol_process_cpu_seconds_total")][0]
    col.stop()
    print(f"spans={sent} batch={args.batch} seconds={elapsed:.2f} spans_per_s={sent / elapsed:,.0f} "
          f"collector_cpu_s={cpu:.2f} cpu_us_per_span={cpu * 1e6 / sent:.1f} "
          f"rss_rest_MiB={rss_rest / 1024:.0f} rss_peak_MiB={peak / 1024:.0f}")


if __name__ == "__main__":
    main()
