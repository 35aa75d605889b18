"""Start-up and memory of the ebpf_go receiver: seconds to the first (and last) probe attached for 1
and for N distinct binaries, and RSS at rest and under load.

    .venv/bin/python benchmarks/startup_memory.py [--binaries 1,20] [--load-seconds 3] [--cache cold,warm]
        [--propagation off|auto]  (root)

Cache: "cold" starts with an empty `bpf_cache_dir` (every distinct program is compiled, in child
processes), "warm" reuses the directory the cold run filled (no compile at all).

Binaries: the Go 1.27 httpserver fixture, copied N times with one distinct byte appended to each (a
different file and inode, so the receiver treats each as its own binary and compiles its programs,
exactly as for 20 distinct builds; the appended byte changes nothing Go or the ELF loader reads).
The receiver runs in a child process (config: targets by pid, propagation off unless --propagation, the three
probes on)
so that RSS is the receiver's own: Python + loaded programs + ring buffers (BCC/LLVM run in
short-lived compiler children since the loader rewrite, and are not counted).
"Attached" = the `otelgo_ebpf_probes_attached` gauge is non-zero for that process's binary; times
are from creating the receiver (config parsed, before any BCC work) to that moment.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(pids: list[int], cache_dir: str, out: Any, go: Any, propagation: str = "off") -> None:
    from collector.component import ComponentID
    from collector.spans import SpanBatch
    from collector.telemetry import ComponentTelemetry, SelfMetrics
    from receiver.ebpf_go.config import EbpfGoConfig
    from receiver.ebpf_go.receiver import factory
    from tests.support.procmaps import bcc_or_llvm_mapped

    class Count:
        n = 0

        def consume(self, batch: SpanBatch) -> None:
            Count.n += batch.span_count()

    rss_import = rss_mb()
    t0 = time.monotonic()
    cfg = EbpfGoConfig.model_validate({"targets": [{"pid": pids}], "discovery_interval": "100ms",
                                       "propagation": propagation, "bpf_cache_dir": cache_dir})
    r: Any = factory.create(ComponentID("ebpf_go"), cfg, ComponentTelemetry("receiver", "ebpf_go", SelfMetrics()),
                            Count())
    r.start(None)
    seen: dict[int, float] = {}
    while len(seen) < len(pids) and time.monotonic() - t0 < 300:
        for tb in list(r.binaries.values()):
            if any(pp.program.link_count() for pp in tb.programs):
                for pid in tb.pids:
                    seen.setdefault(pid, time.monotonic() - t0)
        time.sleep(0.005)
    compiles = [round(pp.program.compile_seconds, 2) for tb in r.binaries.values() for pp in tb.programs
                if pp.program.origin == "compiled"]
    origins: dict[str, int] = {}
    for tb in r.binaries.values():
        for pp in tb.programs:
            origins[pp.program.origin] = origins.get(pp.program.origin, 0) + 1
    time.sleep(1.0)
    out.put({"first": min(seen.values()), "last": max(seen.values()), "attached": len(seen),
             "rss_import_mb": rss_import, "rss_rest_mb": rss_mb(), "compiles": compiles, "origins": origins,
             "bcc_mapped": bcc_or_llvm_mapped()})
    go.get()                        # parent runs the load now
    peak = 0.0
    while go.empty():
        peak = max(peak, rss_mb())
        time.sleep(0.05)
    go.get()
    out.put({"rss_load_mb": peak, "spans": Count.n})
    r.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--binaries", default="1,20")
    ap.add_argument("--load-seconds", type=int, default=3)
    ap.add_argument("--cache", default="cold,warm", help="cold, warm or both (cold,warm)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--propagation", default="off",
                    help="the receiver's propagation mode (auto: the sk_msg program is prepared too, on its own thread)")
    args = ap.parse_args()
    from tests.support.gobuild import build_go_fixture
    src = build_go_fixture("httpserver", "1.27", "plain")
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    rows = []
    try:
        for n, mode in ((int(x), m) for x in args.binaries.split(",") for m in args.cache.split(",")):
            cache_dir = work / f"cache-{n}"
            if mode == "cold":
                shutil.rmtree(cache_dir, ignore_errors=True)
            exes = []
            for i in range(n):
                exe = work / f"httpserver-{n}-{i}"
                shutil.copyfile(src, exe)
                with open(exe, "ab") as f:
                    f.write(bytes([i]))
                exe.chmod(0o755)
                exes.append(exe)
            procs = [subprocess.Popen([str(e)], stdout=subprocess.PIPE, text=True) for e in exes]
            addrs = [p.stdout.readline().split()[1] for p in procs]  # type: ignore[union-attr]
            out: Any = mp.Queue()
            go: Any = mp.Queue()
            ch = mp.Process(target=child, args=([p.pid for p in procs], str(cache_dir), out, go, args.propagation))
            ch.start()
            row = out.get(timeout=600)
            go.put(1)
            subprocess.run(["wrk", "-t1", "-c4", f"-d{args.load_seconds}s", f"http://{addrs[0]}/hello"],
                           capture_output=True, check=True)
            time.sleep(0.3)
            go.put(1)
            row.update(out.get(timeout=60))
            ch.join(30)
            for p in procs:
                p.kill()
                p.wait()
            row["binaries"] = n
            row["cache"] = mode
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows))
        return 0
    print("| binaries | image cache | first probe attached (s) | all attached (s) | compile s per program (median) | "
          "programs by origin | RSS after imports (MB) | RSS at rest (MB) | RSS peak under load (MB) | spans |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = sorted(r["compiles"])
        origins = ", ".join(f"{k} {v}" for k, v in sorted(r["origins"].items()))
        print(f"| {r['binaries']} | {r['cache']} | {r['first']:.2f} | {r['last']:.2f} | "
              f"{c[len(c) // 2] if c else '-'} ({len(c)} compiled) | {origins} | {r['rss_import_mb']:.0f} | "
              f"{r['rss_rest_mb']:.0f} | {r['rss_load_mb']:.0f} | {r['spans']} |")
        if r["bcc_mapped"]:
            print(f"WARNING: BCC/LLVM mapped in the receiver process ({r['binaries']} binaries, {r['cache']}): "
                  f"{', '.join(r['bcc_mapped'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
