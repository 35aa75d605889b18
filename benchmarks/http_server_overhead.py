"""Requests/s of a Go net/http server with and without the ebpf_go receiver, side by side.

    .venv/bin/python benchmarks/http_server_overhead.py [--go 1.27] [--rounds 3] [--seconds 4]
        [--end auto|ret|ret,auto] [--attach links|perf|links,perf]   (root)

The server (tests/fixtures/go/httpserver, GOMAXPROCS=1) is pinned to CPU 0; wrk (1 thread, 4
keep-alive connections, GET /hello) and the receiver run on CPU 1. Rounds alternate: without, with
(receiver started, attached, then shut down after the round). Reports medians, µs added per request
(1e6/rps_with - 1e6/rps_without: the server core's extra time per request) and checks that every
request became a span. Latency: wrk --latency p50/p99 per round (closed loop, 4 connections: the
latency at full load, ≈ 4 / req/s plus queueing; the tail shows the probe hits' scheduling
jitter). Also measures the receiver's /proc discovery scan.
`--end` chooses where the server span ends (probes/nethttp_server.py END_MODE): "auto" (what the
receiver does: emulated end points where the binary allows), "ret" (every RET of ServeHTTP, the
probe before issue 8), or both, comma-separated: each round then runs without and once per mode.
`--attach` chooses how uprobes are attached (bpfsys.py): uprobe_multi "links" (the default where
the kernel has them) or "perf" events (the fallback), or both, each round once per (end, attach).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.component import ComponentID  # noqa: E402
from collector.spans import SpanBatch  # noqa: E402
from collector.telemetry import ComponentTelemetry, SelfMetrics  # noqa: E402
from receiver.ebpf_go import bpfsys, discovery  # noqa: E402
from receiver.ebpf_go.config import EbpfGoConfig  # noqa: E402
from receiver.ebpf_go.probes import nethttp_server  # noqa: E402
from receiver.ebpf_go.receiver import factory  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402


class Count:
    def __init__(self) -> None:
        self.n = 0

    def consume(self, batch: SpanBatch) -> None:
        self.n += batch.span_count()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (uprobe handlers run in the traced thread: they count here)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


class WrkResult:
    """One wrk run: requests/s, requests counted, and latency percentiles (µs) from --latency."""

    def __init__(self, out: str) -> None:
        self.rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        self.total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        self.pct: dict[int, float] = {}
        dist = out.split("Latency Distribution", 1)[1] if "Latency Distribution" in out else ""
        for p, v, unit in re.findall(r"^\s*(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", dist, re.M):
            self.pct[int(p)] = float(v) * _UNIT_US[unit]

    @property
    def p50(self) -> float:
        return self.pct[50]

    @property
    def p99(self) -> float:
        return self.pct[99]


def wrk(url: str, seconds: float, connections: int = 4) -> WrkResult:
    """wrk -t1 -c<connections> --latency on CPU 1 (closed loop: each connection sends its next
    request when the previous answer arrives, so the percentiles are those at full load)."""
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", "--latency",
                          f"-d{int(seconds)}s", url], capture_output=True, text=True, check=True).stdout
    return WrkResult(out)


def start_server(go: str) -> tuple[subprocess.Popen[str], str]:
    """tests/fixtures/go/httpserver on CPU 0 with GOMAXPROCS=1, and its /hello URL (taskset execs
    the server: its pid is the Popen's)."""
    binary = build_go_fixture("httpserver", go, "plain")
    srv = subprocess.Popen(["taskset", "-c", "0", str(binary)], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "GOMAXPROCS": "1"})
    assert srv.stdout is not None
    return srv, f"http://{srv.stdout.readline().split()[1]}/hello"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--go", default="1.27")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--end", default="auto", help="auto, ret, or several comma-separated (e.g. ret,auto)")
    ap.add_argument("--attach", default="links", help="links, perf, or both comma-separated")
    args = ap.parse_args()
    for e in args.end.split(","):
        if e not in nethttp_server.END_MODES:
            ap.error(f"--end {e}: one of {nethttp_server.END_MODES}")
    attaches = args.attach.split(",")
    for a in attaches:
        if a not in ("links", "perf"):
            ap.error(f"--attach {a}: links or perf")
    if "links" in attaches and not bpfsys.uprobe_multi_supported():
        ap.error("--attach links: this kernel has no uprobe_multi links")
    # one variant per (end, attach); named by the end alone when attach is not varied
    ends = [e if len(attaches) == 1 else f"{e} {a}" for e in args.end.split(",") for a in attaches]
    os.sched_setaffinity(0, {1})
    srv, url = start_server(args.go)
    pid = srv.pid
    without: list[WrkResult] = []
    with_: dict[str, list[WrkResult]] = {e: [] for e in ends}
    spans_ok: dict[str, list[tuple[int, int]]] = {e: [] for e in ends}
    cpu_without: list[float] = []
    cpu_with: dict[str, list[float]] = {e: [] for e in ends}
    try:
        wrk(url, 1)  # warm-up
        for _ in range(args.rounds):
            c0 = cpu_seconds(pid)
            res = wrk(url, args.seconds)
            without.append(res)
            cpu_without.append((cpu_seconds(pid) - c0) / res.total * 1e6)
            for end in ends:
                nethttp_server.END_MODE = end.split()[0]
                attach = end.split()[1] if len(attaches) > 1 else attaches[0]
                bpfsys._uprobe_multi = attach == "links"
                sink = Count()
                cfg = EbpfGoConfig.model_validate({"targets": [{"pid": pid}], "discovery_interval": "100ms",
                                                   "propagation": "off"})
                r: Any = factory.create(ComponentID("ebpf_go"), cfg,
                                        ComponentTelemetry("receiver", "ebpf_go", SelfMetrics()), sink)
                r.start(None)
                t0 = time.monotonic()
                while pid not in r.processes and time.monotonic() - t0 < 30:
                    time.sleep(0.05)
                c0 = cpu_seconds(pid)
                res = wrk(url, args.seconds)
                with_[end].append(res)
                cpu_with[end].append((cpu_seconds(pid) - c0) / res.total * 1e6)
                time.sleep(0.3)
                r.shutdown()
                spans_ok[end].append((res.total, sink.n))
    finally:
        nethttp_server.END_MODE = "auto"
        srv.kill()
        srv.wait()
    w0 = statistics.median(x.rps for x in without)
    c0m = statistics.median(cpu_without)
    print(f"Go {args.go}, {args.rounds} alternating rounds of {args.seconds:g}s, wrk -t1 -c4 --latency GET /hello")
    for end in ends:
        if len(ends) > 1:
            print(f"\nend = {end}")
        print("| round | without (req/s) | with (req/s) | p50 µs without | with | p99 µs without | with "
              "| server CPU µs/req without | with | requests | spans |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for i, (a, b, ca, cb, (tot, n)) in enumerate(zip(without, with_[end], cpu_without, cpu_with[end],
                                                          spans_ok[end], strict=True), 1):
            print(f"| {i} | {a.rps:,.0f} | {b.rps:,.0f} | {a.p50:.0f} | {b.p50:.0f} | {a.p99:.0f} | {b.p99:.0f} "
                  f"| {ca:.1f} | {cb:.1f} | {tot} | {n} |")
    for end in ends:
        w1 = statistics.median(x.rps for x in with_[end])
        c1m = statistics.median(cpu_with[end])
        p50 = [statistics.median(x.p50 for x in rs) for rs in (without, with_[end])]
        p99 = [statistics.median(x.p99 for x in rs) for rs in (without, with_[end])]
        print(f"\nend={end}: median without {w0:,.0f} req/s, with {w1:,.0f} req/s, ratio {w1 / w0:.3f}, "
              f"added {1e6 / w1 - 1e6 / w0:.1f} µs per request (throughput); server CPU {c0m:.1f} -> {c1m:.1f} "
              f"µs/request, added {c1m - c0m:.1f} µs; latency p50 {p50[0]:.0f} -> {p50[1]:.0f} µs, "
              f"p99 {p99[0]:.0f} -> {p99[1]:.0f} µs")
    # Discovery: one /proc scan as the receiver does it (first scan reads every process).
    w = discovery.ProcessWatcher()
    t = time.perf_counter()
    new, _ = w.poll()
    first = time.perf_counter() - t
    steady = []
    for _ in range(20):
        t = time.perf_counter()
        w.poll()
        steady.append(time.perf_counter() - t)
    print(f"discovery: first scan {first * 1e3:.2f} ms for {len(new)} processes, "
          f"steady scan {statistics.median(steady) * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
