"""`make bench`: every benchmark of this directory, one after the other, printing their table rows.

    .venv/bin/python benchmarks/run_all.py   (root; ~5 min, limit 10 min)

Each benchmark runs as its own process with settings short enough for the whole set to finish in
under 10 minutes; the figures in benchmarks/README.md come from the same scripts (commands there).
All comparisons inside one benchmark are side by side in one run (alternating rounds); the VM's
2 cores may be shared with other work, so absolute figures move between runs, ratios much less.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
LIMIT_S = 600

RUNS: list[tuple[str, list[str]]] = [
    ("platform floor: one uprobe hit", ["uprobe_floor.py", "--calls", "100000"]),
    ("service overhead: net/http server without/with the receiver",
     ["http_server_overhead.py", "--rounds", "3", "--seconds", "3"]),
    ("service overhead: composite service (HTTP call to a second Go service + SQLite), without/with",
     ["service_overhead.py", "--rounds", "3", "--seconds", "3"]),
    ("where the server probe's cost goes (A/B of program variants)",
     ["server_probe_ab.py", "--rounds", "3", "--seconds", "3", "--variants", "none,full,end,empty,empty-end,empty-entry"]),
    ("route probes (gin, echo, chi, mux) on top of the net/http server probe",
     ["route_overhead.py", "--rounds", "3", "--seconds", "3"]),
    ("head sampling in BPF: server and receiver CPU at ratio 1, 0.01, 0",
     ["sampling_overhead.py", "--rounds", "3", "--seconds", "3"]),
    ("gRPC server and client probes per call: without / floor of the hits / with",
     ["grpc_overhead.py", "--rounds", "3", "-n", "20000", "--n-stream", "10000,2000"]),
    ("pipeline capacity: ring buffer -> otlp on one core",
     ["pipeline_ebpf_otlp.py", "--rates", "20000,50000,100000", "--seconds", "3"]),
    ("start-up and memory", ["startup_memory.py", "--binaries", "1,20", "--propagation", "auto"]),
    ("many services: 24 processes of 6 binaries, attach / RSS / shutdown, links vs perf events",
     ["many_services.py", "--per-binary", "4", "--rounds", "1"]),
    ("function spans: added CPU per traced call, emulated ends vs a RET",
     ["function_spans.py", "--rounds", "3"]),
    ("receiver threads tracing an idle server", ["receiver_idle.py", "--seconds", "5"]),
    ("sk_msg propagation: a TCP send of a traced process and of any other",
     ["skmsg_send_cost.py", "--rounds", "3", "--sends", "20000"]),
    ("collector pipeline: otlp receiver -> batch -> otlp exporter on one core",
     ["pipeline_otlp.py", "--rates", "20000,50000,100000", "--seconds", "3", "--max-spans", "100000"]),
]


def main() -> int:
    t_all = time.monotonic()
    failed = 0
    for title, cmd in RUNS:
        t0 = time.monotonic()
        print(f"\n## {title}\n$ {Path(PY).name} benchmarks/{' '.join(cmd)}", flush=True)
        p = subprocess.run([PY, str(HERE / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                           timeout=max(30, LIMIT_S - (time.monotonic() - t_all)))
        lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
        print("\n".join(lines))
        if p.returncode != 0:
            failed += 1
            print(f"FAILED (exit {p.returncode}): {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
        print(f"({time.monotonic() - t0:.0f} s)", flush=True)
    total = time.monotonic() - t_all
    print(f"\nall benchmarks: {total:.0f} s (limit {LIMIT_S} s), {failed} failed")
    return 1 if failed or total > LIMIT_S else 0


if __name__ == "__main__":
    sys.exit(main())
