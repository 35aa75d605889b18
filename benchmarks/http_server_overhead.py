"""Requests/s of a Go net/http server with and without the ebpf_go receiver, side by side.

    .venv/bin/python benchmarks/http_server_overhead.py [--go 1.27] [--rounds 3] [--seconds 4]   (root)

The server (tests/fixtures/go/httpserver, GOMAXPROCS=1) is pinned to CPU 0; wrk (1 thread, 4
keep-alive connections, GET /hello) and the receiver run on CPU 1. Rounds alternate: without, with
(receiver started, attached, then shut down after the round). Reports medians, µs added per request
(1e6/rps_with - 1e6/rps_without: the server core's extra time per request) and checks that every
request became a span. Also measures the receiver's /proc discovery scan.
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
from receiver.ebpf_go import discovery  # noqa: E402
from receiver.ebpf_go.receiver import EbpfGoConfig, factory  # noqa: E402
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


def wrk(url: str, seconds: float) -> tuple[float, int]:
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c4", f"-d{int(seconds)}s", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--go", default="1.27")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    binary = build_go_fixture("httpserver", args.go, "plain")
    srv = subprocess.Popen(["taskset", "-c", "0", str(binary)], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "GOMAXPROCS": "1"})
    assert srv.stdout is not None
    addr = srv.stdout.readline().split()[1]
    url = f"http://{addr}/hello"
    pid = srv.pid
    # taskset execs the server: same pid.
    without: list[float] = []
    with_: list[float] = []
    spans_ok: list[tuple[int, int]] = []
    cpu_without: list[float] = []
    cpu_with: list[float] = []
    try:
        wrk(url, 1)  # warm-up
        for _ in range(args.rounds):
            c0 = cpu_seconds(pid)
            rps, total = wrk(url, args.seconds)
            without.append(rps)
            cpu_without.append((cpu_seconds(pid) - c0) / total * 1e6)
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
            rps, total = wrk(url, args.seconds)
            with_.append(rps)
            cpu_with.append((cpu_seconds(pid) - c0) / total * 1e6)
            time.sleep(0.3)
            r.shutdown()
            spans_ok.append((total, sink.n))
    finally:
        srv.kill()
        srv.wait()
    w0, w1 = statistics.median(without), statistics.median(with_)
    print(f"Go {args.go}, {args.rounds} alternating rounds of {args.seconds:g}s, wrk -t1 -c4 GET /hello")
    print("| round | without (req/s) | with (req/s) | server CPU µs/req without | with | requests | spans |")
    print("|---|---|---|---|---|---|---|")
    for i, (a, b, ca, cb, (tot, n)) in enumerate(zip(without, with_, cpu_without, cpu_with, spans_ok,
                                                      strict=True), 1):
        print(f"| {i} | {a:,.0f} | {b:,.0f} | {ca:.1f} | {cb:.1f} | {tot} | {n} |")
    c0m, c1m = statistics.median(cpu_without), statistics.median(cpu_with)
    print(f"\nmedian without {w0:,.0f} req/s, with {w1:,.0f} req/s, ratio {w1 / w0:.3f}, "
          f"added {1e6 / w1 - 1e6 / w0:.1f} µs per request (throughput); server CPU {c0m:.1f} -> {c1m:.1f} "
          f"µs/request, added {c1m - c0m:.1f} µs")
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
