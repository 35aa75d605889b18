"""Many services on one host: N processes of each of six binaries (tests/support/services.py: Go
1.21 to 1.27, stripped, PIE, gin, gRPC), traced by the real CLI with default options (targets: the
pids), uprobes attached as uprobe_multi links (the default where the kernel has them) and as perf
events (OTELGO_UPROBE_LINKS=0, what kernels before 6.6 get), alternating rounds.

    .venv/bin/python benchmarks/many_services.py [--per-binary 4] [--rounds 2]   (root)

Per round: a fresh collector and fresh processes; a warm `bpf_cache_dir` (a first, unreported
round fills it), so compile time is out of the figures and attach is what is left.
- attached: collector start to `otelgo_ebpf_processes_instrumented` = every process;
- RSS: the collector's VmRSS then, all traced, at rest;
- shutdown: SIGTERM (right after one request to every process) to exit, with every one of those
  spans in the exported file (checked) and the pins gone (checked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.spans import KIND_SERVER, from_json_dict  # noqa: E402
from tests.support.collector import CollectorProcess, json_lines, wait_for  # noqa: E402
from tests.support.services import MIX, start_services  # noqa: E402

VARIANTS = {"links": {}, "perf events": {"OTELGO_UPROBE_LINKS": "0"}}


def metric(col: CollectorProcess, name: str) -> float:
    total = 0.0
    for line in col.scrape().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rpartition(" ")[2])
    return total


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_round(per_binary: int, env: dict[str, str], cache: str, work: Path) -> dict[str, float]:
    services = start_services(per_binary)
    out = work / f"spans-{time.monotonic_ns()}.jsonl"
    cfg = {"receivers": {"ebpf_go": {"targets": [{"pid": [s.pid for s in services]}], "bpf_cache_dir": cache}},
           "exporters": {"file": {"path": str(out)}},
           "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["file"]}}}}
    try:
        t0 = time.monotonic()
        col = CollectorProcess(cfg, work, env=env)
        wait_for(lambda: metric(col, "otelgo_ebpf_processes_instrumented") == len(services), 300, "all traced")
        attached = time.monotonic() - t0
        uprobes = metric(col, "otelgo_ebpf_probes_attached")
        rss = rss_mb(col.proc.pid)
        pins = [p for p in Path("/sys/fs/bpf").iterdir() if p.name.startswith(f"otelgo-{col.proc.pid}-")]
        for s in services:
            s.get()
        t1 = time.monotonic()
        rc = col.stop(timeout=300)
        shutdown = time.monotonic() - t1
        assert rc == 0, col.log()[-2000:]
        pids = sorted(rs.resource.attributes["process.pid"] for d in json_lines(out)
                      for rs, _, sp in from_json_dict(d).iter_spans() if sp.kind == KIND_SERVER)
        assert pids == sorted(s.pid for s in services), "spans not flushed"
        assert not any(p.exists() for p in pins), "pins left"
        return {"attached": attached, "rss": rss, "shutdown": shutdown, "uprobes": uprobes}
    finally:
        for s in services:
            s.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-binary", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="otelgo-bench-cache-")
    work = Path(tempfile.mkdtemp(prefix="otelgo-bench-many-"))
    one_round(1, {}, cache, work)    # fills the program cache
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for name, env in VARIANTS.items():
            rows[name].append(one_round(args.per_binary, {**os.environ, **env}, cache, work))
    n = args.per_binary * len(MIX)
    print(f"{n} processes of {len(MIX)} binaries, warm program cache, median of {args.rounds} alternating rounds")
    print("| uprobes attached as | uprobes | all attached | collector RSS | SIGTERM to exit (all spans flushed) |")
    print("|---|---|---|---|---|")
    for name, rs in rows.items():
        def med(key: str, rs: list[dict[str, float]] = rs) -> float:
            return statistics.median(r[key] for r in rs)
        print(f"| {name} | {med('uprobes'):.0f} | {med('attached'):.2f} s | {med('rss'):.0f} MB | "
              f"{med('shutdown'):.2f} s ({', '.join(format(r['shutdown'], '.2f') for r in rs)}) |")
    subprocess.run(["rm", "-rf", cache, str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
