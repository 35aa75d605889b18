"""Function spans: the CPU a traced call adds to the service, by where its span starts and ends.

    .venv/bin/python benchmarks/function_spans.py [--calls 200000] [--rounds 3]   (root)

funcapp (tests/fixtures/go/funcapp, Go 1.24, GOMAXPROCS=1) runs one request that makes N calls of
a function; its CPU time (utime+stime of the process) per call is measured untraced and traced by the
real CLI (`functions:` naming it, max_spans_per_second high enough that every call is a span), in
alternating rounds on one process; the table gives the medians and the difference.

- main.step: every call is a direct call followed by a test: the span starts at the call and ends
  at the jump after it, both emulated by the kernel (gobinary/callers.py);
- main.tick: starts at its call (emulated) but ends at its RET (single-stepped): a loop branch lands
  between the call and the next emulated instruction.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.collector import CollectorProcess, wait_for  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402

CASES = {"main.step": "/calls", "main.tick": "/loop"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_call_us(addr: str, pid: int, path: str, n: int) -> float:
    t0 = cpu_seconds(pid)
    with urllib.request.urlopen(f"http://{addr}{path}?n={n}", timeout=300) as r:
        assert r.read().decode() == str(n)
    return (cpu_seconds(pid) - t0) / n * 1e6


def spans_in(col: CollectorProcess) -> float:
    total = 0.0
    for line in col.scrape().splitlines():
        if line.startswith("otelgo_ebpf_function_spans_total{"):
            total += float(line.rpartition(" ")[2])
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    binary = build_go_fixture("funcapp", "1.24")
    env = {**os.environ, "GOMAXPROCS": "1"}
    app = subprocess.Popen(["taskset", "-c", "0", str(binary)], stdout=subprocess.PIPE, text=True, env=env)
    line = app.stdout.readline() if app.stdout else ""
    addr = line.split()[1]
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for symbol, path in CASES.items():
                per_call_us(addr, app.pid, path, args.calls)        # warm up
                base, traced = [], []
                for _ in range(args.rounds):
                    base.append(per_call_us(addr, app.pid, path, args.calls))
                    cfg = {"receivers": {"ebpf_go": {
                        "targets": [{"pid": [app.pid]}], "bpf_cache_dir": str(Path(tmp) / "cache"),
                        "functions": [{"symbol": symbol, "max_spans_per_second": 10_000_000}]}},
                        "exporters": {"debug": {"verbosity": "basic"}},
                        "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["debug"]}}}}
                    with CollectorProcess(cfg, Path(tmp)) as col:
                        wait_for(lambda: "probe=\"functions\"} " in col.scrape() and
                                 'otelgo_ebpf_probes_attached{probe="functions"} 0.0' not in col.scrape(), 120,
                                 "functions attached")
                        traced.append(per_call_us(addr, app.pid, path, args.calls))
                        time.sleep(1.5)
                        got = spans_in(col)
                        assert got >= args.calls, f"{symbol}: {got} spans for {args.calls} calls"
                b, t = statistics.median(base), statistics.median(traced)
                rows.append((symbol, b, t, t - b))
    finally:
        app.kill()
    print(f"{args.calls} calls per round, {args.rounds} rounds, GOMAXPROCS=1 on CPU 0; medians")
    print("| function (span start / end) | untraced µs/call | traced µs/call | added µs/call |")
    print("|---|---|---|---|")
    how = {"main.step": "at the call / after the call (both emulated)",
           "main.tick": "at the call / at its RET (single-stepped)"}
    for symbol, b, t, d in rows:
        print(f"| {symbol} ({how[symbol]}) | {b:.3f} | {t:.3f} | +{d:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
