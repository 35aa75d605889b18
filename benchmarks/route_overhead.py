"""What a web framework's route probe adds on top of the net/http server probe, side by side in one run.

    .venv/bin/python benchmarks/route_overhead.py [--frameworks gin,echo,chi,chi-nested,mux] [--go 1.27]
                                                  [--rounds 3] [--seconds 4]   (root)

For each framework its fixture (tests/fixtures/go/ginapp, echoapp, chiapp, muxapp, the framework
from its go.mod, GOMAXPROCS=1) is pinned to CPU 0; wrk (1 thread, 4 keep-alive connections, GET of
one parameter route) and the receiver run on CPU 1. `chi-nested` asks for a route of a nested
router (`/api/v1` + `/users/{uid}/orders`): chi routes twice, the probe runs twice. Each round runs
three ways in turn: without the receiver; with it but the route probe left out (the server probe
as for any net/http service: spans named `GET`); with it as shipped (route probe on: `GET <route>`). Reports the server's CPU per request (utime+stime of the process over the
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
# name -> (fixture, request path, the span's name with the route probe)
FRAMEWORKS = {
    "gin": ("ginapp", "/items/42", "GET /items/:id"),
    "echo": ("echoapp", "/users/42", "GET /users/:id"),
    "chi": ("chiapp", "/users/42", "GET /users/{id}"),
    "chi-nested": ("chiapp", "/api/v1/users/7/orders", "GET /api/v1/users/{uid}/orders"),
    "mux": ("muxapp", "/users/42", "GET /users/{id}"),
}


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


def measure(framework: str, go: str, rounds: int, seconds: int) -> tuple[dict[str, float], list[str]]:
    """One framework: the table of its rounds printed; (median CPU µs per request by mode, failures)."""
    fixture, path, routed = FRAMEWORKS[framework]
    names = {MODES[1]: "GET", MODES[2]: routed}
    binary = build_go_fixture(fixture, go, "plain")
    srv = subprocess.Popen(["taskset", "-c", "0", str(binary)], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "GOMAXPROCS": "1"})
    assert srv.stdout is not None
    url = f"http://{srv.stdout.readline().split()[1]}{path}"
    rows: dict[str, list[tuple[WrkResult, float]]] = {m: [] for m in MODES}
    failures = []
    try:
        wrk(url, 1)  # warm-up
        for _ in range(rounds):
            c0 = cpu_seconds(srv.pid)
            res = wrk(url, seconds)
            rows["without"].append((res, (cpu_seconds(srv.pid) - c0) / res.total * 1e6))
            for mode in MODES[1:]:
                res, per_req, seen = traced_round(srv.pid, url, seconds, mode == MODES[2])
                rows[mode].append((res, per_req))
                # wrk counts the answers it read; up to one request per connection is still on its way
                if set(seen) != {names[mode]} or not res.total <= seen[names[mode]] <= res.total + 4:
                    failures.append(f"{framework} {mode}: {res.total} requests, spans {seen}")
    finally:
        srv.kill()
        srv.wait()
    print(f"\n{framework}: Go {go}, {fixture}'s go.mod, {rounds} alternating rounds of {seconds}s, "
          f"wrk -t1 -c4 GET {path}")
    print("| round | " + " | ".join(f"{m} req/s | µs CPU/req" for m in MODES) + " |")
    print("|---|" + "---|---|" * len(MODES))
    for i in range(rounds):
        print(f"| {i + 1} | " + " | ".join(f"{rows[m][i][0].rps:,.0f} | {rows[m][i][1]:.2f}" for m in MODES) + " |")
    cpu = {m: statistics.median(c for _, c in rows[m]) for m in MODES}
    per = {m: statistics.median(1e6 / r.rps for r, _ in rows[m]) for m in MODES}
    print(f"median server CPU per request: without {cpu[MODES[0]]:.2f} µs, server probe +"
          f"{cpu[MODES[1]] - cpu[MODES[0]]:.2f} µs, server + route probe +{cpu[MODES[2]] - cpu[MODES[0]]:.2f} µs: "
          f"the route probe adds {cpu[MODES[2]] - cpu[MODES[1]]:.2f} µs "
          f"(1e6/rps: {per[MODES[2]] - per[MODES[1]]:.2f} µs)")
    return cpu, failures


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma-separated: {', '.join(FRAMEWORKS)}")
    ap.add_argument("--go", default="1.27")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    args = ap.parse_args()
    chosen = [f for f in args.frameworks.split(",") if f]
    unknown = [f for f in chosen if f not in FRAMEWORKS]
    if unknown:
        ap.error(f"--frameworks: unknown {', '.join(unknown)}; known: {', '.join(FRAMEWORKS)}")
    os.sched_setaffinity(0, {1})
    summary, failures = [], []
    for fw in chosen:
        cpu, failed = measure(fw, args.go, args.rounds, args.seconds)
        failures += failed
        summary.append((fw, cpu[MODES[1]] - cpu[MODES[0]], cpu[MODES[2]] - cpu[MODES[1]]))
    print("\n| framework | server probe µs/req | route probe adds µs/req |\n|---|---|---|")
    for fw, server, route in summary:
        print(f"| {fw} | +{server:.2f} | {route:+.2f} |")
    for f in failures:
        print(f"FAILED {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
