"""tail_sampling: spans/s per core and memory at decision_wait 5 s and 10 000 new traces/s.

    .venv/bin/python benchmarks/tail_sampling.py [--traces-per-second 10000] [--seconds 15]
        [--decision-wait 5s] [--spans-per-trace 5]

The processor alone, in this process pinned to one CPU: a feeder offers `--traces-per-second` new
traces a second (each in two requests: the root, then its children, 1 ms apart), with the policies
a user would write (errors, slow, 10 % of the rest, a drop of health checks), into a sink that
counts. Reported: the processor's CPU (this process's CPU minus the feeder's time making spans) per
span and as spans/s per core; the share of one core it takes at the offered rate; traces held at
the peak; RSS above the baseline at the peak (the spans it holds for decision_wait + 1 s). Then the
same without pacing (as fast as one core takes them) for the ceiling.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.component import ComponentID  # noqa: E402
from collector.spans import STATUS_ERROR, Resource, ResourceSpans, Scope, ScopeSpans, Span, SpanBatch  # noqa: E402
from collector.telemetry import ComponentTelemetry, SelfMetrics  # noqa: E402
from processors import tail_sampling  # noqa: E402

POLICIES = [
    {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
    {"name": "slow", "type": "latency", "latency": {"threshold_ms": 500}},
    {"name": "some", "type": "probabilistic", "probabilistic": {"sampling_percentage": 10}},
    {"name": "no-health", "type": "drop", "drop": {"drop_sub_policy": [
        {"name": "h", "type": "string_attribute", "string_attribute": {"key": "http.route", "values": ["/health"]}}]}},
]
RES = Resource({"service.name": "bench", "deployment.environment": "prod"})
SCOPE = Scope("bench")


class Count:
    def __init__(self) -> None:
        self.n = 0

    def consume(self, batch: SpanBatch) -> None:
        self.n += batch.span_count()


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def make_trace(rng: random.Random, n: int, now: int) -> tuple[SpanBatch, SpanBatch]:
    tid = rng.randbytes(16)
    route = rng.choice(["/items/:id", "/cart", "/health", "/checkout"])
    root = Span(tid, rng.randbytes(8), f"GET {route}", kind=2, start_time_unix_nano=now,
                end_time_unix_nano=now + rng.randrange(1, 800) * 1_000_000,
                attributes={"http.route": route, "http.response.status_code": 200, "http.request.method": "GET"},
                status_code=STATUS_ERROR if rng.random() < 0.01 else 0)
    kids = [Span(tid, rng.randbytes(8), "db.query", parent_span_id=root.span_id, kind=3,
                 start_time_unix_nano=now + 1000, end_time_unix_nano=now + 2_000_000,
                 attributes={"db.system.name": "postgresql", "db.query.text": "SELECT 1"}) for _ in range(n - 1)]
    return (SpanBatch([ResourceSpans(RES, [ScopeSpans(SCOPE, [root])])]),
            SpanBatch([ResourceSpans(RES, [ScopeSpans(SCOPE, kids)])]))


def run(rate: float, seconds: float, wait: str, spans_per_trace: int, paced: bool, cache: bool = False) -> dict[str, Any]:
    rng = random.Random(7)
    sink = Count()
    t = ComponentTelemetry("processor", "tail_sampling", SelfMetrics())
    cfg = tail_sampling.Config.model_validate({
        "decision_wait": wait, "num_traces": 200000, "policies": POLICIES,
        "decision_cache": {"sampled_cache_size": 100000, "non_sampled_cache_size": 100000} if cache else {}})
    p = tail_sampling.factory.create(ComponentID("tail_sampling"), cfg, t, sink)
    base = rss_kib()
    p.start(None)
    cpu0, gen = time.process_time(), 0.0
    t0 = time.monotonic()
    sent = peak_held = peak_rss = 0
    pending: list[SpanBatch] = []
    tick = 0.001
    while time.monotonic() - t0 < seconds:
        g0 = time.thread_time()
        now = time.time_ns()
        fresh = [make_trace(rng, spans_per_trace, now) for _ in range(int(rate * tick) if paced else 100)]
        gen += time.thread_time() - g0
        for b in pending:                # children of the previous slice's traces
            p.consume(b)
        pending = [kids for _, kids in fresh]
        for root, _ in fresh:
            p.consume(root)
        sent += len(fresh) * spans_per_trace
        if paced:
            next_at = t0 + tick * (sent / spans_per_trace / (rate * tick))
            time.sleep(max(0.0, next_at - time.monotonic()))
        if sent % (spans_per_trace * 5000) < spans_per_trace * len(fresh):
            peak_held, peak_rss = max(peak_held, len(p.traces)), max(peak_rss, rss_kib() - base)
    for b in pending:
        p.consume(b)
    elapsed = time.monotonic() - t0
    cpu = time.process_time() - cpu0 - gen
    p.shutdown()
    return {"spans": sent, "elapsed": elapsed, "cpu": cpu, "held": peak_held, "rss_mib": peak_rss / 1024,
            "out": sink.n, "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--traces-per-second", type=float, default=10000)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--decision-wait", default="5s")
    ap.add_argument("--spans-per-trace", type=int, default=5)
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    paced = run(args.traces_per_second, args.seconds, args.decision_wait, args.spans_per_trace, True)
    cached = run(args.traces_per_second, args.seconds, args.decision_wait, args.spans_per_trace, True, cache=True)
    ceiling = run(args.traces_per_second, min(args.seconds, 10), args.decision_wait, args.spans_per_trace, False)
    print(f"tail_sampling, decision_wait {args.decision_wait}, {args.spans_per_trace} spans/trace, 4 policies, one core")
    print("| feed | traces/s offered | spans in | µs CPU/span | spans/s per core | core used | traces held (peak) "
          "| RSS above baseline (peak) | spans out |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in (("paced", paced), ("paced, decision_cache 100k+100k", cached), ("unpaced", ceiling)):
        offered = f"{args.traces_per_second:,.0f}" if name.startswith("paced") else f"{r['spans'] / args.spans_per_trace / r['elapsed']:,.0f} (taken)"
        print(f"| {name} | {offered} | {r['spans']:,} | {r['cpu'] / r['spans'] * 1e6:.2f} | {r['spans'] / r['cpu']:,.0f} "
              f"| {r['cpu'] / r['elapsed']:.2f} | {r['held']:,} | {r['rss_mib']:.0f} MiB | {r['out']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
