"""Where the net/http client probe's BPF time goes, per request, and what its span ids cost (root).

Service A (tests/fixtures/go/httpchain, Go 1.26) calls a raw local HTTP/1.1 server for each of N
sequential requests; only the client probe is attached (no server probe: the context walk finds no
server span and runs its full length, the worst case). The kernel's BPF stats give each program's
runs and run time. Rounds alternate two builds: span ids from the per-CPU splitmix64 (as shipped)
and from bpf_get_prandom_u32 (-DAB_PRANDOM_IDS).

    .venv/bin/python benchmarks/client_probe_cost.py --rounds 5 -n 2000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from receiver.ebpf_go.bpfprogram import release_bpf  # noqa: E402
from receiver.ebpf_go.gobinary import GoBinary  # noqa: E402
from receiver.ebpf_go.probes import nethttp_client as nc  # noqa: E402
from tests.e2e.test_ebpf_propagation import RawHTTP  # noqa: E402
from tests.support.bpffs import make_pin_dir  # noqa: E402
from tests.support.collector import free_port, wait_for_port  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402

BUILDS = {"splitmix ids": [], "prandom ids": ["-DAB_PRANDOM_IDS"]}


def prog_stats() -> dict[str, tuple[int, int]]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    return {p["name"]: (p.get("run_time_ns", 0), p.get("run_cnt", 0)) for p in json.loads(out)
            if p.get("name", "").startswith("uprobe_client")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=2000)
    args = ap.parse_args()
    from bcc import BPF
    path = str(build_go_fixture("httpchain", "1.26"))
    gb = GoBinary.open(path)
    raw = RawHTTP()
    port = free_port()
    proc = subprocess.Popen([path, "-listen", f"127.0.0.1:{port}", "-next", f"http://127.0.0.1:{raw.port}/chain"],
                            stderr=subprocess.DEVNULL)
    pin = make_pin_dir("otelgo_bench_client")
    total: dict[str, list[float]] = {b: [] for b in BUILDS}
    per_prog: dict[str, list[tuple[float, float]]] = {}
    subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
    try:
        wait_for_port(port, proc=proc)
        for _ in range(args.rounds):
            for build, extra in BUILDS.items():
                b = BPF(src_file=str(nc.BPF_SOURCE).encode(),
                        cflags=[*nc.cflags(gb, skmsg=False, pin_dir=pin), f"-I{nc.BPF_SOURCE.parent}", *extra])
                nc.attach(b, gb, path, proc.pid)
                b[b"events"].open_ring_buffer(lambda *a: 0)
                s0 = prog_stats()
                for _ in range(args.n):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/chain", timeout=10) as r:
                        r.read()
                s1 = prog_stats()
                release_bpf(b)
                total[build].append(sum(s1[k][0] - s0.get(k, (0, 0))[0] for k in s1) / args.n)
                if build == "splitmix ids":
                    for k in s1:
                        dt, dc = s1[k][0] - s0.get(k, (0, 0))[0], s1[k][1] - s0.get(k, (0, 0))[1]
                        per_prog.setdefault(k, []).append((dc / args.n, dt / max(dc, 1)))
    finally:
        subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)
        proc.kill()
        proc.wait()
        raw.close()
        for f in os.listdir(pin):
            os.unlink(os.path.join(pin, f))
        os.rmdir(pin)
    print(f"| program (splitmix ids) | runs per request | ns per run (median of {args.rounds}) |")
    print("|---|---|---|")
    for k, xs in sorted(per_prog.items()):
        print(f"| {k} | {statistics.median(x[0] for x in xs):.2f} | {statistics.median(x[1] for x in xs):.0f} |")
    print(f"\n| build | BPF ns per request, median of {args.rounds} | rounds |")
    print("|---|---|---|")
    for build, xs in total.items():
        print(f"| {build} | {statistics.median(xs):.0f} | {', '.join(f'{x:.0f}' for x in xs)} |")
    d = statistics.median(a - b for a, b in zip(total["prandom ids"], total["splitmix ids"], strict=True))
    print(f"\nprandom - splitmix, median paired delta: {d:+.0f} ns per request")


if __name__ == "__main__":
    main()
