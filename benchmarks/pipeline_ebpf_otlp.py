"""Spans/s from ring-buffer records to the OTLP exporter, on one core, at controlled event rates.

    .venv/bin/python benchmarks/pipeline_ebpf_otlp.py [--rates 20000,50000,100000,200000] [--seconds 4]   (root)

Producer (CPU 0): a C loop calls a function starting with `push` (an emulated uprobe hit) at a set
rate; a BPF program on it fills a ring buffer with `struct http_server_event` records (688 bytes,
the net/http server probe's layout, GET /hello), counting records it could not reserve in `lost`
(as bpf/nethttp_server.c does: `otelgo_ebpf_events_lost_total`).
Pipeline (this process, pinned to CPU 1): the receiver's own per-event path: the ring-buffer
callback (`StructCollector`, one precompiled Struct), drained every 20 ms, `nethttp_server.to_spans`,
one `SpanBatch` per drain (as `EbpfGoReceiver._push`), the `batch` processor, the `otlp` exporter.
Sink (CPU 0): a Python OTLP/gRPC server in a child process that counts spans.
Reports per rate: produced, exported, lost, spans/s exported, pipeline CPU µs/span.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.component import ComponentID  # noqa: E402
from collector.spans import Resource, ResourceSpans, Scope, ScopeSpans, Span, SpanBatch  # noqa: E402
from collector.telemetry import ComponentTelemetry, SelfMetrics  # noqa: E402
from receiver.ebpf_go.loader import release_bpf  # noqa: E402

C_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
__attribute__((naked, noinline)) void produce(void) { __asm__ volatile("push %rbp\n\tpop %rbp\n\tret\n"); }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(void) {
    double rate, secs;
    /* one line per run: "<rate> <seconds>"; answers "<calls>" when done */
    while (scanf("%lf %lf", &rate, &secs) == 2) {
        double t0 = now(); long done = 0;
        for (;;) {
            double t = now() - t0;
            if (t >= secs) break;
            long due = (long)(t * rate);
            while (done < due) { produce(); done++; }
        }
        printf("%ld\n", done); fflush(stdout);
    }
    return 0;
}
"""

BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>
struct ev {
    u32 kind, tgid; u64 start_ns, end_ns, g;
    u8 trace_id[16], span_id[8], parent[8]; u8 flags, remote, pad[6];
    u64 status; u16 method_len, path_len, remote_len, host_len, pattern_len, ua_len;
    u8 major, minor, tls, pad2;
    char method[16], path[128], remote_s[64], host[128], pattern[128], ua[128];
};
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_ARRAY(lost, u64, 1);
BPF_PERCPU_ARRAY(submitted, u64, 1);
int on_produce(struct pt_regs *ctx) {
    u32 z = 0;
    struct ev *e = events.ringbuf_reserve(sizeof(struct ev));
    if (!e) { u64 *l = lost.lookup(&z); if (l) __sync_fetch_and_add(l, 1); return 0; }
    u64 now = bpf_ktime_get_ns();
    e->kind = 1; e->tgid = bpf_get_current_pid_tgid() >> 32; e->start_ns = now - 20000; e->end_ns = now; e->g = 1;
    u32 *w = (u32 *)e->trace_id;
    w[0] = bpf_get_prandom_u32(); w[1] = bpf_get_prandom_u32(); w[2] = bpf_get_prandom_u32(); w[3] = 1;
    w = (u32 *)e->span_id; w[0] = bpf_get_prandom_u32(); w[1] = 2;
    __builtin_memset(e->parent, 0, 8); e->flags = 1; e->remote = 0; e->status = 200;
    e->method_len = 3; e->path_len = 6; e->remote_len = 15; e->host_len = 14; e->pattern_len = 10; e->ua_len = 3;
    e->major = 1; e->minor = 1; e->tls = 0;
    __builtin_memcpy(e->method, "GET", 3); __builtin_memcpy(e->path, "/hello", 6);
    __builtin_memcpy(e->remote_s, "127.0.0.1:50000", 15); __builtin_memcpy(e->host, "127.0.0.1:8080", 14);
    __builtin_memcpy(e->pattern, "GET /hello", 10); __builtin_memcpy(e->ua, "wrk", 3);
    u64 flags = BPF_RB_NO_WAKEUP;
    u64 *sc = submitted.lookup(&z);
    if (sc && (++*sc % 32) == 0) flags = BPF_RB_FORCE_WAKEUP;
    events.ringbuf_submit(e, flags);
    return 0;
}
"""


def sink_main(port_q: Any, count: Any) -> None:
    """OTLP/gRPC sink on CPU 0: counts spans."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
    os.sched_setaffinity(0, {0})

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
            n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            with count.get_lock():
                count.value += n
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 256 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port_q.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def cpu_self() -> float:
    t = os.times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="20000,50000,100000,200000")
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--ringbuf-pages", type=int, default=1024)   # 4 MiB: the receiver's default
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", help="write a cProfile of the pipeline thread at the highest rate here")
    args = ap.parse_args()
    from bcc import BPF  # type: ignore[import-not-found]

    from exporters.otlp import OTLPConfig
    from exporters.otlp import factory as otlp_factory
    from processors.batch import Config as BatchConfig
    from processors.batch import factory as batch_factory
    from receiver.ebpf_go.probes import StructCollector, nethttp_server

    os.sched_setaffinity(0, {1})
    count = mp.Value("q", 0)
    port_q: Any = mp.Queue()
    sink = mp.Process(target=sink_main, args=(port_q, count), daemon=True)
    sink.start()
    port = port_q.get(timeout=30)

    work = Path(tempfile.mkdtemp(prefix="bench-ebpf-pipeline-"))
    (work / "prod.c").write_text(C_SOURCE)
    exe = work / "prod"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(work / "prod.c")], check=True)
    prod = subprocess.Popen(["taskset", "-c", "0", str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert prod.stdin and prod.stdout
    b = BPF(text=BPF_TEXT.encode(), cflags=[f"-DRINGBUF_PAGES={args.ringbuf_pages}"])
    b.attach_uprobe(name=str(exe).encode(), sym=b"produce", fn_name=b"on_produce", pid=prod.pid)
    col = StructCollector(nethttp_server.EVENT)
    b["events"].open_ring_buffer(col.callback())

    sm = SelfMetrics()
    exp: Any = otlp_factory.create(ComponentID("otlp"), OTLPConfig.model_validate(
        {"endpoint": f"127.0.0.1:{port}", "tls": {"insecure": True}, "compression": "none"}),
        ComponentTelemetry("exporter", "otlp", sm))
    batch: Any = batch_factory.create(ComponentID("batch"), BatchConfig(), ComponentTelemetry("processor", "batch", sm),
                                      exp)
    exp.start(None)
    batch.start(None)
    scope = Scope("otelgo-collector/net/http", "bench")
    res = Resource({"service.name": "prod", "process.pid": prod.pid, "process.runtime.name": "go"})

    def drain() -> int:
        b.ring_buffer_consume()
        recs = col.take()
        if not recs:
            return 0
        spans = nethttp_server.to_spans(recs, 0)
        by_pid: dict[int, list[Span]] = {}
        for pid, span in spans:
            by_pid.setdefault(pid, []).append(span)
        batch.consume(SpanBatch([ResourceSpans(res, [ScopeSpans(scope, lst)]) for lst in by_pid.values()]))
        return len(spans)

    rows = []
    lost_seen = 0
    rates = [int(r) for r in args.rates.split(",")]
    profiler = None
    for rate in rates:
        if args.profile and rate == rates[-1]:
            import cProfile
            profiler = cProfile.Profile()
            profiler.enable()
        count.value = 0
        c0, t0 = cpu_self(), time.monotonic()
        prod.stdin.write(f"{rate} {args.seconds}\n")
        prod.stdin.flush()
        decoded = 0
        os.set_blocking(prod.stdout.fileno(), False)
        line = ""
        while True:
            decoded += drain()
            part = prod.stdout.readline()
            line += part or ""
            if line.endswith("\n"):
                break
            time.sleep(0.02)
        os.set_blocking(prod.stdout.fileno(), True)
        produced = int(line)
        decoded += drain()
        lost_total = b["lost"][0].value
        lost = lost_total - lost_seen
        lost_seen = lost_total
        deadline = time.monotonic() + 30
        while count.value < decoded and time.monotonic() < deadline:
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        cpu = cpu_self() - c0
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        exported = count.value
        rows.append({"rate": rate, "produced": produced, "lost": lost, "exported": exported,
                     "spans_per_s": exported / elapsed, "cpu_us_per_span": cpu / max(exported, 1) * 1e6,
                     "cpu_share": cpu / elapsed})
    batch.shutdown()
    exp.shutdown()
    prod.stdin.close()
    prod.wait()
    release_bpf(b)
    sink.terminate()
    if args.json:
        print(json.dumps(rows))
        return 0
    print("| offered spans/s | produced | lost (ring buffer full) | exported | exported spans/s | "
          "pipeline CPU µs/span | pipeline core busy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate']:,} | {r['produced']:,} | {r['lost']:,} | {r['exported']:,} | {r['spans_per_s']:,.0f} | "
              f"{r['cpu_us_per_span']:.1f} | {r['cpu_share'] * 100:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
