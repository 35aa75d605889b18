"""What the gin route probe adds on top of the net/http server probe, side by side in one run.

    .venv/bin/python benchmarks/gin_route_overhead.py [--go 1.27] [--rounds 3] [--seconds 4]   (root)

tests/fixtures/go/ginapp (gin from its go.mod, GOMAXPROCS=1) is pinned to CPU 0; wrk (1 thread,
4 keep-alive connections, GET /items/42, the route /items/:id) and the receiver run on CPU 1. Each
round runs three ways in turn: without the receiver; with it but the route probe left out (the
server probe as for any net/http service: spans named `GET`); with it as shipped (route probe on:
`GET /items/:id`). Reports the server's CPU per request (utime+stime of the process over the
requests wrk counted: uprobe handlers run in the traced thread) and 1e6/rps, medians over the
rounds; the route probe's cost is the difference of the last two. Checks that every request became
a span with the expected name. Target (issue 17): ≤ one emulated uprobe hit, ~1 µs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.http_server_overhead import WrkResult, cpu_seconds, wrk  # noqa: E402
from collector.component import ComponentID  # noqa: E402
from collector.spans import SpanBatch  # noqa: E402
from collector.telemetry import ComponentTelemetry, SelfMetrics  # noqa: E402
from receiver.ebpf_go.config import EbpfGoConfig  # noqa: E402
from receiver.ebpf_go.probes import routes  # noqa: E402
from receiver.ebpf_go.receiver import factory  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402

MODES = ("without", "server probe", "server + route probe")
NAMES = {"server probe": "GET", "server + route probe": "GET /items/:id"}


class Names:
    """Counts spans by name."""

    def __init__(self) -> None:
        self.by_name: dict[str, int] = {}

    def consume(self, batch: SpanBatch) -> None:
        for _, _, s in batch.iter_spans():
            self.by_name[s.name] = self.by_name.get(s.name, 0) + 1


def traced_round(pid: int, url: str, seconds: int, with_routes: bool) -> tuple[WrkResult, float, dict[str, int]]:
    sources = routes.SOURCES
    if not with_routes:
        routes.SOURCES = ()      # the server probe compiled and attached without any route probe
    try:
        sink = Names()
        cfg = EbpfGoConfig.model_validate({"targets": [{"pid": pid}], "discovery_interval": "100ms",
                                           "propagation": "off"})
        r: Any = factory.create(ComponentID("ebpf_go"), cfg, ComponentTelemetry("receiver", "ebpf_go", SelfMetrics()),
                                sink)
        r.start(None)
        t0 = time.monotonic()
        while pid not in r.processes and time.monotonic() - t0 < 30:
            time.sleep(0.05)
        c0 = cpu_seconds(pid)
        res = wrk(url, seconds)
        cpu = (cpu_seconds(pid) - c0) / res.total * 1e6
        time.sleep(0.3)
        r.shutdown()
        return res, cpu, sink.by_name
    finally:
        routes.SOURCES = sources


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--go", default="1.27")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    binary = build_go_fixture("ginapp", args.go, "plain")
    srv = subprocess.Popen(["taskset", "-c", "0", str(binary)], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "GOMAXPROCS": "1"})
    assert srv.stdout is not None
    url = f"http://{srv.stdout.readline().split()[1]}/items/42"
    rows: dict[str, list[tuple[WrkResult, float]]] = {m: [] for m in MODES}
    failures = []
    try:
        wrk(url, 1)  # warm-up
        for _ in range(args.rounds):
            c0 = cpu_seconds(srv.pid)
            res = wrk(url, args.seconds)
            rows["without"].append((res, (cpu_seconds(srv.pid) - c0) / res.total * 1e6))
            for mode in MODES[1:]:
                res, cpu, names = traced_round(srv.pid, url, args.seconds, mode == MODES[2])
                rows[mode].append((res, cpu))
                # wrk counts the answers it read; up to one request per connection is still on its way
                if set(names) != {NAMES[mode]} or not res.total <= names[NAMES[mode]] <= res.total + 4:
                    failures.append(f"{mode}: {res.total} requests, spans {names}")
    finally:
        srv.kill()
        srv.wait()
    print(f"Go {args.go}, gin from ginapp's go.mod, {args.rounds} alternating rounds of {args.seconds}s, "
          "wrk -t1 -c4 GET /items/42")
    print("| round | " + " | ".join(f"{m} req/s | µs CPU/req" for m in MODES) + " |")
    print("|---|" + "---|---|" * len(MODES))
    for i in range(args.rounds):
        print(f"| {i + 1} | " + " | ".join(f"{rows[m][i][0].rps:,.0f} | {rows[m][i][1]:.2f}" for m in MODES) + " |")
    cpu = {m: statistics.median(c for _, c in rows[m]) for m in MODES}
    per = {m: statistics.median(1e6 / r.rps for r, _ in rows[m]) for m in MODES}
    print(f"\nmedian server CPU per request: without {cpu[MODES[0]]:.2f} µs, server probe +"
          f"{cpu[MODES[1]] - cpu[MODES[0]]:.2f} µs, server + route probe +{cpu[MODES[2]] - cpu[MODES[0]]:.2f} µs: "
          f"the route probe adds {cpu[MODES[2]] - cpu[MODES[1]]:.2f} µs "
          f"(1e6/rps: {per[MODES[2]] - per[MODES[1]]:.2f} µs)")
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
