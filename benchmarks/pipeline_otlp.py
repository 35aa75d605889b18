"""Spans/s through the collector's otlp receiver → batch → otlp exporter on one core, and what is lost.

    .venv/bin/python benchmarks/pipeline_otlp.py [--rates 20000,50000,100000] [--seconds 4]
        [--max-spans 200000] [--exporter otlp|file] [--tree DIR ...] [--rounds N] [--profile FILE]

Collector (CPU 0): the real `otelgo-collector` process (every thread pinned to CPU 0) running
otlp (gRPC) → batch (8192 spans / 200 ms) → otlp exporter (no compression, default queue) to
benchmarks/otlp_sink.py, a gRPC server on CPU 1 that counts spans; `--exporter file` writes
OTLP/JSON lines instead (the benchmark before issue 8).
Load (this process, CPU 1): pre-built OTLP/gRPC requests of `--batch` spans (an HTTP server span,
7 attributes, as an SDK sends them).

Offered-rate mode (`--rates`): for `--seconds` per rate, requests are due at rate/batch per second;
each is sent when due unless `--max-in-flight` requests are already waiting for an answer, in which
case the client drops it, as an SDK drops spans when its export queue is full ("client dropped").
Per rate: offered, sent, accepted and refused (the receiver's own counters), failed (the RPC's
status, as the client saw it), exported (spans the sink counted, or the file exporter sent),
exported spans/s (until the last span left), collector CPU µs per exported span, RSS.
Max-throughput mode (`--max-spans`): requests back to back with 4 in flight; spans/s until the
exporter has them all.

`--tree DIR` (repeatable) runs the collector from another source tree (e.g. a `git worktree` of the
commit before a change; PYTHONPATH=DIR) and `--rounds N` alternates the trees N times: before/after
side by side in one run. `--profile FILE` runs the collector under cProfile in every thread and
writes the merged stats to FILE (slower: for where the time goes, not for the figures).

`--stages`: the collector's per-span work on this path, in this process on one core (garbage
collector on, as in the collector): the receiver's decode (protobuf parse + `from_proto`, the
receiver before issue 8, and `OTLPDecoder`), the otlp exporter's `OTLPEncoder`, the file exporter's
OTLP/JSON; for the benchmark's requests, and for requests whose spans carry 1 or 7 attribute values
never seen before (ids, paths with ids in them: the decoder's cache misses).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from otlp_sink import sink_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tests.support.collector as support  # noqa: E402
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

COLLECTOR_CPU, LOAD_CPU = 0, 1
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

PROFILED = """#!{python}
# otelgo-collector with a cProfile in every thread; the merged stats go to {out!r} at exit.
import cProfile, pstats, sys, threading
profs = []
def _start(frame, event, arg):
    sys.setprofile(None)
    p = cProfile.Profile()
    profs.append(p)
    p.enable()
threading.setprofile(_start)
main_p = cProfile.Profile()
profs.append(main_p)
main_p.enable()
from collector.cli import main
try:
    rc = main()
finally:
    pstats.Stats(*profs).dump_stats({out!r})
sys.exit(rc)
"""


def request(n: int, seq: int) -> bytes:
    base = time.time_ns()
    # ids never all zeros (the receiver refuses those, as the OTLP specification asks)
    spans = [Span(seq.to_bytes(8, "big") + (i + 1).to_bytes(8, "big"), (seq * n + i + 1).to_bytes(8, "big"),
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


def cpu_s(pid: int) -> float:
    """utime + stime of the whole process (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(text: str, name: str, label: str) -> float:
    """The value of `name{...label...}` in a Prometheus scrape (0 if absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.split()[-1])
    return 0.0


class Run:
    """One collector (from `tree`, or this one) with its pipeline, the sink and a client channel."""

    def __init__(self, args: argparse.Namespace, tree: str, work: Path, sink_port: int, sink_count: Any) -> None:
        self.args, self.sink_count = args, sink_count
        port = support.free_port()
        exporter: dict[str, Any] = (
            {"otlp": {"endpoint": f"127.0.0.1:{sink_port}", "tls": {"insecure": True},
                      "compression": args.compression}}
            if args.exporter == "otlp" else {"file": {"path": str(work / "out.jsonl")}})
        cfg = {
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"127.0.0.1:{port}"}}}},
            "processors": {"batch": {"timeout": "200ms", "send_batch_size": 8192}},
            "exporters": exporter,
            "service": {"pipelines": {"traces": {"receivers": ["otlp"], "processors": ["batch"],
                                                 "exporters": [args.exporter]}}},
        }
        env = {"PYTHONPATH": tree} if tree else {}
        if args.profile:
            wrapper = work / "collector-profiled"
            wrapper.write_text(PROFILED.format(python=sys.executable, out=args.profile))
            wrapper.chmod(0o755)
            support.BINARY = wrapper
        self.col = support.CollectorProcess(cfg, work, env=env)
        self.pid = self.col.proc.pid
        for t in os.listdir(f"/proc/{self.pid}/task"):
            os.sched_setaffinity(int(t), {COLLECTOR_CPU})
        self.rss_rest = rss_kb(self.pid)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.export = self.channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)

    def counts(self) -> dict[str, float]:
        text = self.col.scrape()
        rl = 'receiver="otlp"'
        el = f'exporter="{self.args.exporter}"'
        return {
            "accepted": metric(text, "otelcol_receiver_accepted_spans_total", rl),
            "refused": metric(text, "otelcol_receiver_refused_spans_total", rl),
            "sent": metric(text, "otelcol_exporter_sent_spans_total", el),
            "send_failed": metric(text, "otelcol_exporter_send_failed_spans_total", el)
            + metric(text, "otelcol_exporter_enqueue_failed_spans_total", el),
            "exported": float(self.sink_count.value) if self.args.exporter == "otlp"
            else metric(text, "otelcol_exporter_sent_spans_total", el),
        }

    def settle(self, before: dict[str, float], t0: float, peak: int) -> tuple[dict[str, float], float, int]:
        """Wait until everything accepted has left (or stopped moving for 2 s): counts, end time, peak RSS."""
        last, last_change = -1.0, time.monotonic()
        t_end = time.perf_counter()
        while True:
            c = self.counts()
            out = c["exported"] - before["exported"]
            done = out + c["send_failed"] - before["send_failed"]
            peak = max(peak, rss_kb(self.pid))
            if out != last:
                last, last_change, t_end = out, time.monotonic(), time.perf_counter()
            if done >= c["accepted"] - before["accepted"] or time.monotonic() - last_change > 2.0:
                return c, max(t_end - t0, 1e-9), peak
            time.sleep(0.01)

    def offered(self, rate: int, payloads: list[bytes]) -> dict[str, Any]:
        a = self.args
        before, cpu0, peak = self.counts(), cpu_s(self.pid), rss_kb(self.pid)
        pending: list[Any] = []
        failed: dict[str, int] = {}
        sent = dropped = due_total = 0
        t0 = time.perf_counter()
        next_rss = t0
        while True:
            t = time.perf_counter() - t0
            if t >= a.seconds:
                break
            due = int(t * rate / a.batch) + 1
            while due_total < due:
                due_total += 1
                pending = [f for f in pending if not f.done() or _note(f, failed, a.batch)]
                if len(pending) >= a.max_in_flight:
                    dropped += a.batch
                    continue
                pending.append(self.export.future(payloads[due_total % len(payloads)], timeout=a.timeout))
                sent += a.batch
            if time.perf_counter() >= next_rss:
                peak, next_rss = max(peak, rss_kb(self.pid)), next_rss + 0.05
            time.sleep(0.0005)
        for f in pending:
            f.exception()
            _note(f, failed, a.batch)
        c, elapsed, peak = self.settle(before, t0, peak)
        exported = c["exported"] - before["exported"]
        cpu = cpu_s(self.pid) - cpu0
        return {"rate": rate, "offered": due_total * a.batch, "sent": sent, "client_dropped": dropped,
                "accepted": int(c["accepted"] - before["accepted"]), "refused": int(c["refused"] - before["refused"]),
                "failed": failed, "exported": int(exported),
                "export_failed": int(c["send_failed"] - before["send_failed"]),
                "spans_per_s": exported / elapsed, "cpu_us_per_span": cpu * 1e6 / max(exported, 1),
                "core_busy": cpu / elapsed, "rss_peak_mib": peak / 1024}

    def max_throughput(self, spans: int, payloads: list[bytes]) -> dict[str, Any]:
        a = self.args
        before, cpu0, peak = self.counts(), cpu_s(self.pid), rss_kb(self.pid)
        n_requests = spans // a.batch
        t0 = time.perf_counter()
        futures: list[Any] = []
        for i in range(n_requests):
            futures.append(self.export.future(payloads[i % len(payloads)]))
            if len(futures) >= 4:  # 4 requests in flight, like a few concurrent clients
                futures.pop(0).result()
            if i % 50 == 0:
                peak = max(peak, rss_kb(self.pid))
        for f in futures:
            f.result()
        c, elapsed, peak = self.settle(before, t0, peak)
        exported = c["exported"] - before["exported"]
        cpu = cpu_s(self.pid) - cpu0
        return {"spans": n_requests * a.batch, "exported": int(exported), "seconds": elapsed,
                "spans_per_s": exported / elapsed, "cpu_us_per_span": cpu * 1e6 / max(exported, 1),
                "rss_peak_mib": peak / 1024}

    def close(self) -> None:
        self.channel.close()
        self.col.stop()


def _note(f: Any, failed: dict[str, int], batch: int) -> bool:
    """Count a finished call's failure by status code; False (drop it from the pending list)."""
    e = f.exception()
    if e is not None:
        code = e.code().name if hasattr(e, "code") else type(e).__name__
        failed[code] = failed.get(code, 0) + batch
    return False


def stages(batch: int) -> int:
    import gc
    import timeit

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from collector.otlp_decode import OTLPDecoder
    from collector.otlp_encode import OTLPEncoder
    from collector.spans import from_proto, to_json_line

    os.sched_setaffinity(0, {LOAD_CPU})
    gc.enable()

    def fresh(seq: int, new: int) -> bytes:
        """A request like request() whose spans carry `new` attribute values seen nowhere else."""
        b = SpanBatch([ResourceSpans(Resource({"service.name": "bench"}), [ScopeSpans(Scope("bench"), [
            Span(seq.to_bytes(8, "big") + (i + 1).to_bytes(8, "big"), (i + 1).to_bytes(8, "big"), "GET /items/{id}",
                 kind=KIND_SERVER, start_time_unix_nano=1, end_time_unix_nano=2,
                 attributes={f"k{j}": (f"/items/{seq}/{i}/{j}" if j % 2 else seq * 10_000 + i * 10 + j)
                             if j < new else "v" for j in range(7)})
            for i in range(batch)])])])
        return to_proto(b).SerializeToString()

    def per_span(fn: Any, items: list[Any]) -> float:
        """µs per span, best of 5 passes of `fn` over `items` (requests or batches)."""
        best = min(timeit.repeat(lambda: [fn(x) for x in items], number=1, repeat=5))
        return best * 1e6 / (len(items) * batch)

    print(f"per-span cost in one thread on CPU {LOAD_CPU}, µs/span ({batch}-span requests, GC on)")
    print("| requests | protobuf parse + from_proto (before) | OTLPDecoder.decode | OTLPEncoder.encode | OTLP/JSON (file) |")
    print("|---|---|---|---|---|")
    for label, datas in (("benchmark's (8 distinct)", [request(batch, s) for s in range(8)] * 5),
                         ("1 new value per span", [fresh(s, 1) for s in range(40)]),
                         ("7 new values per span", [fresh(s, 7) for s in range(40)])):
        batches = [OTLPDecoder().decode(d) for d in datas]
        print(f"| {label} | {per_span(lambda d: from_proto(ExportTraceServiceRequest.FromString(d)), datas):.2f} | "
              f"{per_span(OTLPDecoder().decode, datas):.2f} | {per_span(OTLPEncoder().encode, batches):.2f} | "
              f"{per_span(to_json_line, batches):.2f} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exporter", choices=("otlp", "file"), default="otlp")
    ap.add_argument("--compression", choices=("none", "gzip"), default="none", help="of the otlp exporter")
    ap.add_argument("--rates", default="20000,50000,100000", help="offered spans/s, comma-separated ('' for none)")
    ap.add_argument("--seconds", type=float, default=4, help="per offered rate")
    ap.add_argument("--max-spans", type=int, default=200_000, help="max-throughput mode (0: skip)")
    ap.add_argument("--batch", type=int, default=512, help="spans per request")
    ap.add_argument("--max-in-flight", type=int, default=16, help="offered-rate mode: the client's limit")
    ap.add_argument("--timeout", type=float, default=10.0, help="per request, s (the SDK's default)")
    ap.add_argument("--tree", action="append", default=[],
                    help="run the collector from this source tree (repeatable; default: this one)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the trees this many times")
    ap.add_argument("--profile", help="write the collector's cProfile stats (all threads) here")
    ap.add_argument("--stages", action="store_true", help="per-span cost of each stage, in this process")
    args = ap.parse_args()
    if args.stages:
        return stages(args.batch)
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    trees = args.tree or [""]
    os.sched_setaffinity(0, {LOAD_CPU})
    count = mp.Value("q", 0)
    port_q: Any = mp.Queue()
    sink = mp.Process(target=sink_main, args=(port_q, count), kwargs={"cpu": LOAD_CPU}, daemon=True)
    sink.start()
    sink_port = port_q.get(timeout=30)
    payloads = [request(args.batch, s) for s in range(8)]
    rate_rows: list[tuple[int, str, dict[str, Any]]] = []
    max_rows: list[tuple[int, str, dict[str, Any]]] = []
    try:
        for rnd in range(1, args.rounds + 1):
            for tree in trees:
                label = Path(tree).name if tree else "this tree"
                work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
                run = Run(args, tree, work, sink_port, count)
                print(f"round {rnd} {label}: collector pid {run.pid}", file=sys.stderr, flush=True)
                try:
                    for rate in rates:
                        r = run.offered(rate, payloads)
                        r["rss_rest_mib"] = run.rss_rest / 1024
                        rate_rows.append((rnd, label, r))
                        print(f"round {rnd} {label} {rate:,}/s: {r}", file=sys.stderr, flush=True)
                    if args.max_spans:
                        r = run.max_throughput(args.max_spans, payloads)
                        r["rss_rest_mib"] = run.rss_rest / 1024
                        max_rows.append((rnd, label, r))
                        print(f"round {rnd} {label} max: {r}", file=sys.stderr, flush=True)
                finally:
                    run.close()
    finally:
        sink.terminate()
    pipeline = f"otlp → batch → {args.exporter}"
    if rate_rows:
        print(f"\n{pipeline}, offered rates, {args.seconds:g} s each, {args.batch}-span requests, "
              f"at most {args.max_in_flight} in flight")
        print("| round | collector | offered spans/s | offered | client dropped | accepted | refused | failed (RPC) "
              "| exported | exported spans/s | collector CPU µs/span | core busy | RSS rest / peak MiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for rnd, label, r in rate_rows:
            failed = ", ".join(f"{k} {v:,}" for k, v in r["failed"].items()) or "0"
            print(f"| {rnd} | {label} | {r['rate']:,} | {r['offered']:,} | {r['client_dropped']:,} | "
                  f"{r['accepted']:,} | {r['refused']:,} | {failed} | {r['exported']:,} | {r['spans_per_s']:,.0f} | "
                  f"{r['cpu_us_per_span']:.1f} | {r['core_busy'] * 100:.0f}% | "
                  f"{r['rss_rest_mib']:.0f} / {r['rss_peak_mib']:.0f} |")
    if max_rows:
        print(f"\n{pipeline}, max throughput, {args.batch}-span requests, 4 in flight")
        print("| round | collector | spans | exported | spans/s | collector CPU µs/span | RSS rest / peak MiB |")
        print("|---|---|---|---|---|---|---|")
        for rnd, label, r in max_rows:
            print(f"| {rnd} | {label} | {r['spans']:,} | {r['exported']:,} | {r['spans_per_s']:,.0f} | "
                  f"{r['cpu_us_per_span']:.1f} | {r['rss_rest_mib']:.0f} / {r['rss_peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
