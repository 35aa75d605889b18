"""A composite Go service with and without the ebpf_go receiver, side by side (root).

    .venv/bin/python benchmarks/service_overhead.py [--go 1.24] [--rounds 3] [--seconds 4]

Front: dbapp (tests/fixtures/go/dbapp) `GET /sqlite/composite`: an http.Client GET (request's
context, keep-alive) to a second Go service, the httpserver fixture's `GET /hello`, then one
SQLite `QueryRowContext` (modernc.org/sqlite). Both services GOMAXPROCS=1, pinned to CPU 0 (the
core they share is the bottleneck); wrk (-t1 -c4 --latency, keep-alive) and the receiver
(in-process: net_http_server, net_http_client, database_sql on, `propagation: auto`) on CPU 1.

Rounds alternate: without, with; each phase starts both services afresh (the front's keep-alive
connections to the downstream must be made while sk_msg's sock_ops program is attached to be
in its sockhash), then, for "with", the receiver (started, both processes attached, shut down
after the phase), a 1 s wrk warm-up and the measured wrk run. Per round: requests/s, wrk's p50/p99 latency (closed loop, 4 connections), CPU µs per
request of the two services together (utime+stime: uprobe handlers and the sk_msg program run in
the traced threads and count there), spans per request (4 expected: front SERVER, its CLIENT, its
database CLIENT, the downstream SERVER) and traceparent insertions by sk_msg.

Floor: the probe hits one request makes (counted from the binaries: entry points are the emulated
jcc after the stack check or, without one, the single-stepped first instruction; every RET is
single-stepped; the server span's end at the emulated point `nethttp_server.end_plan` chose) times the cost of one hit measured by benchmarks/uprobe_floor.py in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from http_server_overhead import Count, cpu_seconds, wrk  # noqa: E402

from collector.component import ComponentID  # noqa: E402
from collector.telemetry import ComponentTelemetry, SelfMetrics  # noqa: E402
from receiver.ebpf_go.config import EbpfGoConfig  # noqa: E402
from receiver.ebpf_go.gobinary import GoBinary  # noqa: E402
from receiver.ebpf_go.probes import database_sql, nethttp_client, nethttp_server  # noqa: E402
from receiver.ebpf_go.receiver import factory  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402

SPANS_PER_REQUEST = 4


def hits_per_request(front: GoBinary, down: GoBinary) -> tuple[int, int, list[str]]:
    """(single-stepped hits, emulated hits, description) of one composite request."""
    calls = [  # (binary, label, function, how its end is probed: "ret", "emulated" or "" for none)
        (front, "front", nethttp_server.SYMBOL, nethttp_server.end_plan(front).mode),
        (front, "front", nethttp_client.ROUND_TRIP, "ret"),
        (front, "front", nethttp_client.REQUEST_WRITE, ""),
        (front, "front", next(s for s in database_sql.SYMBOLS if s.endswith(").queryDC")), "ret"),
        (down, "downstream", nethttp_server.SYMBOL, nethttp_server.end_plan(down).mode),
    ]
    ss = emu = 0
    desc = []
    for gb, label, fn, end in calls:
        kind = gb.entry_probe(fn).kind
        if kind == "jcc-after-stack-check":
            emu += 1
        else:
            ss += 1
        ss += int(end == "ret")
        emu += int(end == "emulated")   # HTTP/1.x: one point after the call of ServeHTTP
        desc.append(f"{label} {fn}: entry {'emulated' if kind == 'jcc-after-stack-check' else 'single-stepped'}"
                    + {"ret": " + RET", "emulated": " + emulated end", "": ""}[end])
    return ss, emu, desc


def floor_costs(args: argparse.Namespace) -> tuple[float, float, str]:
    if args.floor:
        a, b = (float(x) for x in args.floor.split(","))
        return a, b, "given (--floor)"
    out = subprocess.run([sys.executable, str(HERE / "uprobe_floor.py"), "--calls", "100000", "--json"],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    return r["single_stepped_us"], r["emulated_us"], "measured now (uprobe_floor.py --calls 100000)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--go", default="1.24")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--floor", default="", help="single-stepped,emulated µs per hit (default: measure now)")
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    front_bin = build_go_fixture("dbapp", args.go)
    down_bin = build_go_fixture("httpserver", args.go)
    ss, emu, hit_desc = hits_per_request(GoBinary.open(str(front_bin)), GoBinary.open(str(down_bin)))
    c_ss, c_emu, floor_how = floor_costs(args)
    env = {**os.environ, "GOMAXPROCS": "1"}
    rows: list[dict[str, Any]] = []

    def phase(tmp: str, traced: bool) -> dict[str, Any]:
        """Fresh services (so that their connections are made while sock_ops is, or is not,
        attached), the receiver when traced, a 1 s warm-up, then the measured wrk run."""
        procs: list[subprocess.Popen[str]] = []
        r: Any = None
        out: dict[str, Any] = {}
        try:
            down = subprocess.Popen(["taskset", "-c", "0", str(down_bin)], stdout=subprocess.PIPE, text=True,
                                    env=env)
            procs.append(down)
            assert down.stdout is not None
            down_addr = down.stdout.readline().split()[1]
            front = subprocess.Popen(["taskset", "-c", "0", str(front_bin), "-sqlite", f"{tmp}/app.db",
                                      "-downstream", f"http://{down_addr}/hello"],
                                     stdout=subprocess.PIPE, text=True, env=env)
            procs.append(front)
            assert front.stdout is not None
            url = f"http://{front.stdout.readline().split()[1]}/sqlite/composite"
            pids = [front.pid, down.pid]  # taskset execs: same pids
            sink = Count()
            if traced:
                cfg = EbpfGoConfig.model_validate({"targets": [{"pid": pids}], "discovery_interval": "100ms",
                                                   "propagation": "auto"})
                r = factory.create(ComponentID("ebpf_go"), cfg,
                                   ComponentTelemetry("receiver", "ebpf_go", SelfMetrics()), sink)
                t0 = time.monotonic()
                r.start(None)
                out["mode"] = r.propagation.mode if r.propagation is not None else "none"
                while not all(p in r.processes for p in pids) and time.monotonic() - t0 < 90:
                    time.sleep(0.05)
                if not all(p in r.processes for p in pids):
                    raise RuntimeError("services not instrumented within 90 s")
                out["attach_s"] = time.monotonic() - t0
            warm = wrk(url, 1)  # connections (to the downstream too), SQLite page cache
            c0 = [cpu_seconds(p) for p in pids]
            res = wrk(url, args.seconds)
            per = [(cpu_seconds(p) - c) / res.total * 1e6 for p, c in zip(pids, c0, strict=True)]
            out.update(res=res, cpu=sum(per), per=per, requests=warm.total + res.total)
            if r is not None:
                time.sleep(0.3)
                r.shutdown()
                out.update(spans=sink.n, injected=r.metrics.skmsg_seen.get("request:injected", 0))
                r = None
            return out
        finally:
            if r is not None:
                r.shutdown()
            for p in procs:
                p.kill()
                p.wait()

    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            off = phase(tmp, False)
            on = phase(tmp, True)
            rows.append({"off": off["res"], "on": on["res"], "cpu_off": off["cpu"], "cpu_on": on["cpu"],
                         "per_off": off["per"], "per_on": on["per"], "spans": on["spans"],
                         "injected": on["injected"], "requests": on["requests"], "mode": on["mode"],
                         "attach_s": on["attach_s"]})
            print(f"round {len(rows)}: {off['res'].rps:,.0f} -> {on['res'].rps:,.0f} req/s", file=sys.stderr,
                  flush=True)
    floor = ss * c_ss + emu * c_emu
    print(f"composite: wrk -t1 -c4 --latency -> dbapp /sqlite/composite -> httpserver /hello + 1 SQLite SELECT; "
          f"Go {args.go}; {args.rounds} alternating rounds of {args.seconds}s; propagation {rows[0]['mode']}")
    print("| round | without (req/s) | with (req/s) | p50 µs without | with | p99 µs without | with "
          "| CPU µs/req without (front+down) | with (front+down) | requests (with) | spans/req | traceparent inserted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, x in enumerate(rows, 1):
        off, on = x["off"], x["on"]
        po, pn = x["per_off"], x["per_on"]
        print(f"| {i} | {off.rps:,.0f} | {on.rps:,.0f} | {off.p50:.0f} | {on.p50:.0f} | {off.p99:.0f} | {on.p99:.0f} "
              f"| {x['cpu_off']:.1f} ({po[0]:.1f}+{po[1]:.1f}) | {x['cpu_on']:.1f} ({pn[0]:.1f}+{pn[1]:.1f}) "
              f"| {x['requests']} | {x['spans'] / x['requests']:.3f} | {x['injected']} |")

    def med(key: str, attr: str | None = None) -> float:
        return statistics.median(getattr(x[key], attr) if attr else x[key] for x in rows)

    r0, r1 = med("off", "rps"), med("on", "rps")
    c0, c1 = med("cpu_off"), med("cpu_on")
    print(f"\nmedian {r0:,.0f} -> {r1:,.0f} req/s (ratio {r1 / r0:.3f}); p50 {med('off', 'p50'):.0f} -> "
          f"{med('on', 'p50'):.0f} µs, p99 {med('off', 'p99'):.0f} -> {med('on', 'p99'):.0f} µs; "
          f"CPU (both services) {c0:.1f} -> {c1:.1f} µs/request, added {c1 - c0:.1f} µs")
    print(f"floor: {ss} single-stepped x {c_ss:.2f} µs + {emu} emulated x {c_emu:.2f} µs = {floor:.1f} µs/request "
          f"({floor_how}); added / floor = {(c1 - c0) / floor:.2f}")
    print("hits per request: " + "; ".join(hit_desc))
    print(f"attach (start -> both processes traced): {statistics.median(x['attach_s'] for x in rows):.1f} s median")
    # wrk does not count the requests in flight at its end: up to 4 more requests' spans.
    bad = [x for x in rows if not 0 <= x["spans"] - SPANS_PER_REQUEST * x["requests"] <= SPANS_PER_REQUEST * 8]
    if bad:
        print(f"SPAN COUNT MISMATCH in {len(bad)} round(s): expected {SPANS_PER_REQUEST} spans per request")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
