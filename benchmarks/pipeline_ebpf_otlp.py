"""Spans/s from ring-buffer records to the OTLP exporter, on one core, at controlled event rates.

    .venv/bin/python benchmarks/pipeline_ebpf_otlp.py [--rates 20000,50000,100000,200000] [--seconds 4]   (root)
        [--reader bcc|mmap] [--no-copier | --decoded-copy] [--queue-rings N]
    .venv/bin/python benchmarks/pipeline_ebpf_otlp.py --stages [--spans 100000]   (no root, no BPF)

Producer (CPU 0): a C loop calls a function starting with `push` (an emulated uprobe hit) at a set
rate; a BPF program on it fills a ring buffer with `struct http_server_event` records (688 bytes,
the net/http server probe's layout, GET /hello), counting records it could not reserve in `lost`
(as bpf/nethttp_server.c does: `otelgo_ebpf_events_lost_total`).
Pipeline (this process, pinned to CPU 1): the receiver's own per-event path: the ring buffer read
by the receiver's copier (`receiver/ebpf_go/ringbuf.py`: `RingCopier`, with the receiver's period,
idle wait and queue bound, copying the committed records as one bytes block per pass,
`RingBuffer.read_block`, every 10 ms on its own thread), the copies drained as
`SpanDrain.run` (drain.py) does (every 20 ms counted from the start of the previous drain; after
a drain that found nothing, a wait for the copier's next copy), decoded there as the receiver's
`StructCollector.decode` does (the net/http server probe's layout), `nethttp_server.to_spans`,
one `SpanBatch` per drain (as `SpanDrain._push`), the `batch` processor, the `otlp` exporter;
the heap frozen once set up, as the collector does (`collector.service.freeze_startup_heap`).
`--no-copier`: the drain reads the ring itself, as the receiver did before the copier (after an
empty drain, a wait on the ring's epoll of up to 100 ms); `--reader bcc` (BCC's ctypes callback per
record, one precompiled Struct) implies it. `--decoded-copy`: the copier decodes the records
(`read_unpacked`) and queues the tuples, as the receiver did from f0446e9 to e2a981b.
`--queue-rings N`: another copier queue bound (ring-fulls per ring; default the receiver's).
Sink (CPU 0): a Python OTLP/gRPC server in a child process that counts spans.
Reports per rate: produced, exported, lost, spans/s exported, pipeline CPU µs/span, the time the
pipeline process spent in the garbage collector (collections per generation and their mean pause),
and the CPU per thread.
Experiments (not what the collector does): `--drain-after` waits 20 ms after the end of each drain
(the receiver before issue 8); `--no-gc-freeze`; `--gc-threshold N` sets the generation-0 threshold;
`--period S` another drain period. `--trace-lost` prints each failed `ringbuf_reserve` (time, records
submitted so far) next to the drains around it (start, read time, records, consumer_pos after).

`--stages`: the same path, stage by stage, in one thread on CPU 1 (no BPF, no gRPC): records packed
as the BPF program writes them, then decode, `to_spans`, grouping, batch merge, OTLP encoding, each
timed alone (µs/span, best of 3, garbage collector on as in the collector).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import mmap
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from otlp_sink import sink_main  # noqa: E402  (benchmarks/otlp_sink.py, shared with pipeline_otlp.py)

from collector.component import ComponentID  # noqa: E402
from collector.service import freeze_startup_heap  # noqa: E402
from collector.spans import Resource, ResourceSpans, Scope, ScopeSpans, Span, SpanBatch  # noqa: E402
from collector.telemetry import ComponentTelemetry, SelfMetrics  # noqa: E402
from receiver.ebpf_go.bpfprogram import release_bpf  # noqa: E402
from receiver.ebpf_go.drain import COPY_PERIOD_S, IDLE_WAIT_S, QUEUE_RINGS  # noqa: E402
from receiver.ebpf_go.probes import StructCollector  # noqa: E402
from receiver.ebpf_go.ringbuf import RingCopier, wait_any  # noqa: E402

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
struct fail { u64 ts, submitted; };
BPF_ARRAY(fails, struct fail, 256);   /* the first 256 failed reserves: when, after how many records */
int on_produce(struct pt_regs *ctx) {
    u32 z = 0;
    struct ev *e = events.ringbuf_reserve(sizeof(struct ev));
    if (!e) {
        u64 *l = lost.lookup(&z);
        if (!l) return 0;
        u32 i = __sync_fetch_and_add(l, 1);
        struct fail *f = fails.lookup(&i);
        u64 *sc = submitted.lookup(&z);
        if (f) { f->ts = bpf_ktime_get_ns(); f->submitted = sc ? *sc : 0; }
        return 0;
    }
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


class GCTimer:
    """Wall time spent in the cyclic garbage collector (gc.callbacks), any thread."""

    def __init__(self) -> None:
        self.total = 0.0
        self.per_gen = [[0, 0.0], [0, 0.0], [0, 0.0]]  # [collections, seconds] per generation
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            dt = time.perf_counter() - self._t0
            self.total += dt
            g = self.per_gen[info["generation"]]
            g[0] += 1
            g[1] += dt

    def summary(self) -> str:
        return ", ".join(f"gen{i} {n} x {t / max(n, 1) * 1e3:.2f} ms" for i, (n, t) in enumerate(self.per_gen))


def bcc_struct_reader(bpf: Any, layout: Any) -> Any:
    """BCC's ring-buffer callback, one ctypes call per record decoded with `layout`; returns take()."""
    import ctypes as ct
    records: list[Any] = []
    unpack, size = layout.unpack_from, layout.size
    buf_t = ct.c_char * size

    def on_record(_ctx: Any, data: int, n: int) -> int:
        if n >= size:
            records.append(unpack(buf_t.from_address(data)))
        return 0

    bpf["events"].open_ring_buffer(on_record)

    def take() -> list[Any]:
        bpf.ring_buffer_consume()
        out = records[:]
        records.clear()
        return out
    return take, None


def mmap_struct_reader(bpf: Any, layout: Any, pages: int) -> Any:
    """The receiver's mmap reader over the same map, through the probe's collector (one read_unpacked
    per call); returns take(), ring."""
    from receiver.ebpf_go.probes import StructCollector
    from receiver.ebpf_go.ringbuf import RingBuffer
    ring = RingBuffer(bpf["events"].map_fd, pages * 4096)
    col = StructCollector(layout)
    col.bind(ring)
    return col.take, ring


def stages(n: int) -> int:
    """Per-stage µs/span, one thread on CPU 1, no BPF: see the module docstring."""
    import random

    from collector.otlp_encode import OTLPEncoder
    from receiver.ebpf_go.probes import nethttp_server
    os.sched_setaffinity(0, {1})
    ev = nethttp_server.EVENT
    rng = random.Random(1)
    buf = b"".join(ev.pack(1, 4242, 10**9 + i, 10**9 + i + 20000, 1, rng.randbytes(12) + b"\1\0\0\0",
                           rng.randbytes(4) + b"\2\0\0\0", b"\0" * 8, 1, 0, 200, 3, 0, 6, 15, 14, 10, 3, 1, 1, 0,
                           b"GET", b"/hello", b"127.0.0.1:50000", b"127.0.0.1:8080", b"GET /hello", b"wrk")
                   for i in range(n))
    drain = 2000  # records per 20 ms drain at 100k/s
    scope = Scope("otelgo-collector/net/http", "bench")
    res = Resource({"service.name": "prod", "process.pid": 4242, "process.runtime.name": "go"})
    encoder = OTLPEncoder()

    size = ev.size
    labels = ("decode (unpack_from per record)", "nethttp_server.to_spans", "group per pid (_push)",
              "batch merge", "OTLP encode")
    best = [float("inf")] * len(labels)
    nbytes = 0
    for _ in range(3):  # steady state as in the pipeline: 2000 records per drain, 8192+ spans per send
        spent = [0.0] * len(labels)
        pending: list[SpanBatch] = []
        held = 0
        nbytes = 0
        for k in range(0, len(buf), drain * size):
            t0 = time.perf_counter()
            recs = [ev.unpack_from(buf, o) for o in range(k, min(k + drain * size, len(buf)), size)]
            t1 = time.perf_counter()
            spans = nethttp_server.to_spans(recs, 0)
            t2 = time.perf_counter()
            by_pid: dict[int, list[Span]] = {}
            for pid, span in spans:
                by_pid.setdefault(pid, []).append(span)
            pending.append(SpanBatch([ResourceSpans(res, [ScopeSpans(scope, lst)]) for lst in by_pid.values()]))
            held += len(spans)
            t3 = time.perf_counter()
            for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                spent[i] += dt
            if held >= 8192 or k + drain * size >= len(buf):
                t0 = time.perf_counter()
                merged = SpanBatch.merge(pending)
                t1 = time.perf_counter()
                nbytes += len(encoder.encode(merged))
                t2 = time.perf_counter()
                spent[3] += t1 - t0
                spent[4] += t2 - t1
                pending, held = [], 0
            del recs, spans, by_pid
        best = [min(x, y) for x, y in zip(best, spent, strict=True)]
    print("| stage | µs/span |\n|---|---|")
    for label, t in zip(labels, best, strict=True):
        print(f"| {label} | {t / n * 1e6:.2f} |")
    print(f"| **total** | **{sum(best) / n * 1e6:.2f}** |")
    print(f"\n{nbytes / n:.0f} bytes/span encoded")
    return 0


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process, by Python thread name (native threads: their comm)."""
    names = {t.native_id: t.name.split("-sender-")[0] + "-sender" if "-sender-" in t.name else t.name
             for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue
        f = stat.rsplit(")", 1)[1].split()
        name = names.get(int(task.name), comm)
        out[name] = out.get(name, 0.0) + (int(f[11]) + int(f[12])) / tick
    return out


def runq_wait(main_only: bool = False) -> float:
    """Seconds this process's threads spent runnable but waiting for a CPU (/proc schedstat): the core
    taken by something else, e.g. another job on the VM."""
    total = 0
    for task in Path("/proc/self/task").iterdir() if not main_only else [Path(f"/proc/self/task/{os.getpid()}")]:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


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
    ap.add_argument("--reader", choices=("mmap", "bcc"), default="mmap")
    ap.add_argument("--stages", action="store_true", help="per-stage split in one thread, no BPF")
    ap.add_argument("--no-gc-freeze", action="store_true", help="do not freeze the heap once set up")
    ap.add_argument("--gc-threshold", type=int, default=0, help="gc.set_threshold(N) (generation 0), 0: default")
    ap.add_argument("--drain-after", action="store_true",
                    help="wait 20 ms after the end of each drain (the receiver before issue 8)")
    ap.add_argument("--period", type=float, default=0.02, help="drain period, s")
    ap.add_argument("--no-copier", action="store_true",
                    help="the drain reads the ring itself (the receiver before its copier thread)")
    ap.add_argument("--queue-rings", type=int, default=QUEUE_RINGS,
                    help="the copier's queue bound in ring-fulls (default: the receiver's QUEUE_RINGS)")
    ap.add_argument("--decoded-copy", action="store_true",
                    help="the copier decodes and queues tuples (the receiver before its block copies)")
    ap.add_argument("--spans", type=int, default=100_000, help="records for --stages")
    ap.add_argument("--trace-lost", action="store_true",
                    help="print each failed reserve (time, records submitted) next to the drains around it")
    args = ap.parse_args()
    if args.stages:
        return stages(args.spans)
    from bcc import BPF  # type: ignore[import-not-found]

    from exporters.otlp import OTLPConfig
    from exporters.otlp import factory as otlp_factory
    from processors.batch import Config as BatchConfig
    from processors.batch import factory as batch_factory
    from receiver.ebpf_go.probes import nethttp_server

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
    take, ring = bcc_struct_reader(b, nethttp_server.EVENT) if args.reader == "bcc" else \
        mmap_struct_reader(b, nethttp_server.EVENT, args.ringbuf_pages)
    copier: RingCopier | None = None
    if ring is not None and not args.no_copier:   # as EbpfGoReceiver: start() and _binary_for
        copier = RingCopier(COPY_PERIOD_S, IDLE_WAIT_S)
        copier.add(ring, take if args.decoded_copy else ring.read_block, args.queue_rings * ring.size)
        copier.start("copier")
        # as EbpfGoReceiver._drain: the copies (one ring-full at most), then the ring's rest, decoded
        take = functools.partial(copier.take, ring, ring.size)
        if not args.decoded_copy:
            take_blocks, col = take, StructCollector(nethttp_server.EVENT)

            def take_decoded() -> list[Any]:
                return col.decode(take_blocks())
            take = take_decoded

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

    drains: list[tuple[int, int, int, int]] = []   # (start ns, end of read ns, records, consumer pos after)
    slow: list[str] = []   # --trace-lost: drains whose processing took > 30 ms, where the time went
    cons_mm = mmap.mmap(b["events"].map_fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ, offset=0)  # consumer_pos

    def drain() -> int:
        t_start = time.monotonic_ns()
        recs = take()
        drains.append((t_start, time.monotonic_ns(), len(recs), int.from_bytes(cons_mm[0:8], "little")))
        if not recs:
            return 0
        w0, c0 = (runq_wait(True), time.thread_time()) if args.trace_lost else (0.0, 0.0)
        t1 = time.monotonic_ns()
        spans = nethttp_server.to_spans(recs, 0)
        by_pid: dict[int, list[Span]] = {}
        for pid, span in spans:
            by_pid.setdefault(pid, []).append(span)
        t2 = time.monotonic_ns()
        batch.consume(SpanBatch([ResourceSpans(res, [ScopeSpans(scope, lst)]) for lst in by_pid.values()]))
        t3 = time.monotonic_ns()
        if args.trace_lost and t3 - t_start > 30_000_000:
            slow.append(f"slow drain at {t_start}: {len(recs)} records, read {(t1 - t_start) / 1e6:.1f} ms, to_spans "
                        f"{(t2 - t1) / 1e6:.1f} ms, consume {(t3 - t2) / 1e6:.1f} ms; main thread CPU "
                        f"{(time.thread_time() - c0) * 1e3:.1f} ms, waiting for the core "
                        f"{(runq_wait(True) - w0) * 1e3:.1f} ms")
        return len(spans)

    if args.gc_threshold:
        gc.set_threshold(args.gc_threshold, *gc.get_threshold()[1:])
    if not args.no_gc_freeze:
        freeze_startup_heap()   # as collector.service.Service.run once every component has started
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
        gc_timer = GCTimer()
        gc.callbacks.append(gc_timer)
        threads0 = thread_cpu()
        c0, t0, w0 = cpu_self(), time.monotonic(), runq_wait()
        prod.stdin.write(f"{rate} {args.seconds}\n")
        prod.stdin.flush()
        decoded = 0
        os.set_blocking(prod.stdout.fileno(), False)
        line = ""
        woke = False
        while True:   # as SpanDrain.run
            started = time.monotonic()
            if copier is not None:
                copier.ready.clear()
            n = drain()
            decoded += n
            part = prod.stdout.readline()
            line += part or ""
            if line.endswith("\n"):
                break
            if args.drain_after:
                time.sleep(0.02)
            elif n == 0 and copier is not None:
                copier.ready.wait(0.1)   # (the receiver: up to 1 s; here the row's end is checked)
            elif n == 0 and not woke and ring is not None:
                woke = wait_any([ring], 0.1)
            else:
                woke = False
                time.sleep(max(0.0, started + args.period - time.monotonic()))
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
        waited = runq_wait() - w0
        gc.callbacks.remove(gc_timer)
        threads = {k: v - threads0.get(k, 0.0) for k, v in thread_cpu().items()}
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
        exported = count.value
        rows.append({"rate": rate, "produced": produced, "lost": lost, "exported": exported,
                     "spans_per_s": exported / elapsed, "cpu_us_per_span": cpu / max(exported, 1) * 1e6,
                     "cpu_share": cpu / elapsed, "runq_wait_share": waited / elapsed, "gc_us_per_span": gc_timer.total / max(exported, 1) * 1e6,
                     "gc": gc_timer.summary(), "heap_objects": len(gc.get_objects()),
                     "threads_us_per_span": {k: round(v / max(exported, 1) * 1e6, 2)
                                             for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v}})
    if args.trace_lost:
        print("\n".join(slow[:30]))
        fails = sorted((f.ts, f.submitted) for f in b["fails"].values() if f.ts)
        rec = (nethttp_server.EVENT.size + 8 + 7) & ~7
        last = -10**12
        for ts, submitted in fails:   # one line per run of failures (the first 256 failures are kept)
            if ts - last < 5_000_000:
                last = ts
                continue
            last = ts
            cons = max([d[3] for d in drains if d[1] < ts] or [0])
            print(f"fail at {ts}: submitted {submitted}, producer ~{submitted * rec}, consumer (last drain "
                  f"before) {cons}, in ring {(submitted * rec - cons) / rec:.0f} records of "
                  f"{args.ringbuf_pages * 4096 // rec}")
            for d in (d for d in drains if ts - 100_000_000 < d[0] < ts + 30_000_000):
                print(f"    drain {(d[0] - ts) / 1e6:+.2f} ms, read {(d[1] - d[0]) / 1e6:.2f} ms, {d[2]} records, "
                      f"cons {d[3]}")
    if copier is not None:
        copier.stop()
    batch.shutdown()
    exp.shutdown()
    prod.stdin.close()
    prod.wait()
    release_bpf(b)
    sink.terminate()
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        print(f"{r['rate']:,}/s: GC {r['gc']}; {r['heap_objects']:,} objects tracked at the end")
        print("    CPU µs/span by thread: " + ", ".join(f"{k} {v}" for k, v in r["threads_us_per_span"].items()))
    print("| offered spans/s | produced | lost (ring buffer full) | exported | exported spans/s | "
          "pipeline CPU µs/span | pipeline core busy | waiting for the core | of which GC µs/span |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate']:,} | {r['produced']:,} | {r['lost']:,} | {r['exported']:,} | {r['spans_per_s']:,.0f} | "
              f"{r['cpu_us_per_span']:.1f} | {r['cpu_share'] * 100:.0f}% | {r['runq_wait_share'] * 100:.0f}% | "
              f"{r['gc_us_per_span']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
