"""µs added per database/sql statement by the ebpf_go receiver's database_sql probe, side by side.

    .venv/bin/python benchmarks/database_sql_overhead.py [--rounds 5] [--n-sqlite 50000] [--n-pg 10000]   (root)

dbapp (tests/fixtures/go/dbapp, Go 1.24, GOMAXPROCS=1) is pinned to CPU 0; this script, the
receiver (in-process: database_sql only, propagation off) and PostgreSQL (a throwaway server from
tests/support/postgres.py) use CPU 1. `GET /{db}/bench?n=N` runs N `QueryRowContext("SELECT id FROM
contacts WHERE id = ?")` in a loop and answers the loop's ns per query. Rounds alternate: without,
with (receiver started, attached, shut down after the round). Reported per query: the loop's wall
time and dbapp's CPU (utime+stime; uprobe handlers run in the traced thread and count there);
every query must have become a span.
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_server_overhead import Count, cpu_seconds  # noqa: E402

from collector.component import ComponentID  # noqa: E402
from collector.telemetry import ComponentTelemetry, SelfMetrics  # noqa: E402
from receiver.ebpf_go.config import EbpfGoConfig  # noqa: E402
from receiver.ebpf_go.receiver import factory  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402


def bench(addr: str, pid: int, db: str, n: int) -> tuple[float, float]:
    """(wall µs per query measured in dbapp's loop, dbapp CPU µs per query)."""
    c0 = cpu_seconds(pid)
    with urllib.request.urlopen(f"http://{addr}/{db}/bench?n={n}", timeout=600) as r:
        body = r.read().decode()
    cpu = (cpu_seconds(pid) - c0) / n * 1e6
    return float(body.split()[1]) / 1e3, cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n-sqlite", type=int, default=50000)
    ap.add_argument("--n-pg", type=int, default=10000)
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    binary = build_go_fixture("dbapp", "1.24")
    ns = {"sqlite": args.n_sqlite, "pg": args.n_pg}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {(db, m): [] for db in ns for m in ("off", "on")}
    spans: list[tuple[int, int]] = []
    with PostgresServer() as pg, tempfile.TemporaryDirectory() as tmp:
        app = subprocess.Popen(["taskset", "-c", "0", str(binary), "-sqlite", f"{tmp}/app.db", "-pg", pg.dsn],
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "GOMAXPROCS": "1"})
        try:
            assert app.stdout is not None
            addr = app.stdout.readline().split()[1]
            pid = app.pid  # taskset execs dbapp: same pid
            for db, n in ns.items():
                bench(addr, pid, db, n // 10)  # warm-up
            for _ in range(args.rounds):
                for db, n in ns.items():
                    results[db, "off"].append(bench(addr, pid, db, n))
                sink = Count()
                cfg = EbpfGoConfig.model_validate({
                    "targets": [{"pid": pid}], "discovery_interval": "100ms", "propagation": "off",
                    "instrumentations": {"net_http_server": False, "net_http_client": False}})
                r: Any = factory.create(ComponentID("ebpf_go"), cfg,
                                        ComponentTelemetry("receiver", "ebpf_go", SelfMetrics()), sink)
                r.start(None)
                try:
                    t0 = time.monotonic()
                    while pid not in r.processes and time.monotonic() - t0 < 60:
                        time.sleep(0.05)
                    if pid not in r.processes:
                        raise RuntimeError("dbapp not instrumented within 60 s")
                    for db, n in ns.items():
                        results[db, "on"].append(bench(addr, pid, db, n))
                    time.sleep(0.3)
                finally:
                    r.shutdown()
                spans.append((sum(ns.values()), sink.n))
        finally:
            app.kill()
            app.wait()
    print(f"dbapp Go 1.24, {args.rounds} alternating rounds; per query: loop wall µs / dbapp CPU µs")
    print("| round | sqlite without | sqlite with | pg without | pg with | queries | spans |")
    print("|---|---|---|---|---|---|---|")
    for i in range(args.rounds):
        cells = [f"{results[db, m][i][0]:.1f} / {results[db, m][i][1]:.1f}" for db in ns for m in ("off", "on")]
        print(f"| {i + 1} | {' | '.join(cells)} | {spans[i][0]} | {spans[i][1]} |")
    for db in ns:
        w0 = statistics.median(x[0] for x in results[db, "off"])
        w1 = statistics.median(x[0] for x in results[db, "on"])
        c0 = statistics.median(x[1] for x in results[db, "off"])
        c1 = statistics.median(x[1] for x in results[db, "on"])
        print(f"{db}: median wall {w0:.1f} -> {w1:.1f} µs/query (+{w1 - w0:.1f}), "
              f"dbapp CPU {c0:.1f} -> {c1:.1f} µs/query (+{c1 - c0:.1f})")
    return 0 if all(a == b for a, b in spans) else 1


if __name__ == "__main__":
    sys.exit(main())
