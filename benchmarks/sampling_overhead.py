"""Head sampling in BPF (`receivers::ebpf_go::sampler`): what a Go net/http server and the receiver
pay per request at ratio 1.0, 0.01 and 0, side by side in one run.

    .venv/bin/python benchmarks/sampling_overhead.py [--go 1.27] [--rounds 3] [--seconds 4]
        [--ratios 1.0,0.01,0]   (root)

The setup of http_server_overhead.py (tests/fixtures/go/httpserver, GOMAXPROCS=1 on CPU 0; wrk -t1
-c4 GET /hello and the receiver on CPU 1). Each round runs without the receiver, then once per ratio
with `sampler: {type: traceidratio, ratio: r}`. Reported per request: the server's CPU (utime +
stime: the uprobe handlers run on its thread) added over the untraced server, and the receiver's
own CPU (this process's, where the receiver runs: the ring-buffer copy, decoding, spans). The
floor is ratio 0: every probe still runs and makes ids, nothing is recorded. The spans counted
at each ratio are checked against the ratio (binomial: within 5 sigma).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.http_server_overhead import Count, cpu_seconds, start_server, wrk  # noqa: E402
from collector.component import ComponentID  # noqa: E402
from collector.telemetry import ComponentTelemetry, SelfMetrics  # noqa: E402
from receiver.ebpf_go.config import EbpfGoConfig  # noqa: E402
from receiver.ebpf_go.receiver import factory  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--go", default="1.27")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--ratios", default="1.0,0.01,0")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    os.sched_setaffinity(0, {1})
    srv, url = start_server(args.go)
    pid = srv.pid
    cpu_without: list[float] = []
    server: dict[float, list[float]] = {r: [] for r in ratios}
    receiver: dict[float, list[float]] = {r: [] for r in ratios}
    counts: dict[float, list[tuple[int, int]]] = {r: [] for r in ratios}
    try:
        wrk(url, 1)  # warm-up
        for _ in range(args.rounds):
            c0 = cpu_seconds(pid)
            res = wrk(url, args.seconds)
            cpu_without.append((cpu_seconds(pid) - c0) / res.total * 1e6)
            for ratio in ratios:
                sink = Count()
                cfg = EbpfGoConfig.model_validate({
                    "targets": [{"pid": pid}], "discovery_interval": "100ms", "propagation": "off",
                    "bpf_cache_dir": "", "sampler": {"type": "traceidratio", "ratio": ratio}})
                r: Any = factory.create(ComponentID("ebpf_go"), cfg,
                                        ComponentTelemetry("receiver", "ebpf_go", SelfMetrics()), sink)
                r.start(None)
                t0 = time.monotonic()
                while pid not in r.processes and time.monotonic() - t0 < 30:
                    time.sleep(0.05)
                time.sleep(0.3)
                c0, p0 = cpu_seconds(pid), time.process_time()
                res = wrk(url, args.seconds)
                time.sleep(0.3)          # the last drain: the receiver's work for these requests
                server[ratio].append((cpu_seconds(pid) - c0) / res.total * 1e6)
                receiver[ratio].append((time.process_time() - p0) / res.total * 1e6)
                n0 = sink.n
                r.shutdown()
                counts[ratio].append((res.total, max(n0, sink.n)))
    finally:
        srv.kill()
        srv.wait()
    base = statistics.median(cpu_without)
    print(f"Go {args.go}, {args.rounds} alternating rounds of {args.seconds:g}s, wrk -t1 -c4 GET /hello, "
          f"sampler traceidratio; untraced server CPU {base:.1f} µs/request")
    print("| ratio | server CPU µs/req (median) | added µs/req | rounds' added | receiver CPU µs/req "
          "| spans / requests |")
    print("|---|---|---|---|---|---|")
    ok = True
    for ratio in ratios:
        med = statistics.median(server[ratio])
        added = [s - w for s, w in zip(server[ratio], cpu_without, strict=True)]
        spans = sum(n for _, n in counts[ratio])
        reqs = sum(t for t, _ in counts[ratio])
        sigma = (reqs * ratio * (1 - ratio)) ** 0.5
        ok &= abs(spans - reqs * ratio) <= 5 * sigma + 4 * args.rounds   # + in-flight at each round's edges
        print(f"| {ratio:g} | {med:.2f} | {med - base:+.2f} | {', '.join(f'{a:+.2f}' for a in added)} "
              f"| {statistics.median(receiver[ratio]):.2f} | {spans} / {reqs} ({spans / reqs:.4f}) |")
    if 0.0 in ratios:
        floor = statistics.median(server[0.0])
        for ratio in ratios:
            print(f"ratio {ratio:g}: {statistics.median(server[ratio]) - floor:+.2f} µs/request over the floor (ratio 0)")
    if not ok:
        print("spans do not follow the ratio", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
