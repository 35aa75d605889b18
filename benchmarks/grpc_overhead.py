"""Server and client CPU added per gRPC call by the ebpf_go receiver's gRPC probes, side by side,
against the floor of the hits those probes use.

    .venv/bin/python benchmarks/grpc_overhead.py [--rounds 5] [-n 50000] [--n-stream 20000,5000]
        [--modes without,floor,with]   (root)

Two grpcapp processes (tests/fixtures/go/grpcapp, system Go, GOMAXPROCS=1) pinned to CPU 0: S, the
server, and C, the client (`-target` = S's gRPC address). This script and the receiver (in-process:
grpc_server and grpc_client only, propagation off, targets both pids) use CPU 1. C's
`GET /bench?n=N` makes N sequential unary Echo("ok") calls on one connection with
context.Background(); `/benchstream?n=N&msgs=M` N server-streaming Count(M) calls (M = 1 and 100).
Per call: the loop's wall time, and S's and C's CPU, each process separately: utime+stime, read in
ns from the process's CPU clock (clock_getcpuclockid: the sum /proc/pid/stat gives in 10 ms ticks,
too coarse here); uprobe handlers run in the traced thread and count there. Modes, alternating in every round:
- without: nothing attached;
- floor: BPF programs that only `return 0`, named as the probes' and attached at exactly the
  addresses the probes use (`PROBE.attach_points`), to each pid: what the hits alone cost;
- with: the receiver, attached to both pids; every call must have become one client and one server span;
- with-server / with-client (optional): the receiver with only one of the two probes on.
"added" = mode − without, per side; the ratio added/floor-added is the probes' cost over the hits'.
The hits per call are counted once, before the rounds, with counting programs at the same points.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from collector.component import ComponentID  # noqa: E402
from collector.spans import KIND_CLIENT, KIND_SERVER, SpanBatch  # noqa: E402
from collector.telemetry import ComponentTelemetry, SelfMetrics  # noqa: E402
from receiver.ebpf_go.bpfprogram import release_bpf  # noqa: E402
from receiver.ebpf_go.gobinary import GoBinary  # noqa: E402
from receiver.ebpf_go.probes import Build, grpc_client, grpc_server  # noqa: E402
from receiver.ebpf_go.receiver import factory  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402

PROBES = (grpc_server.PROBE, grpc_client.PROBE)
MODES = ("without", "floor", "with", "with-server", "with-client")
WITH_PROBES = {"with": ("grpc_server", "grpc_client"), "with-server": ("grpc_server",),
               "with-client": ("grpc_client",)}
KINDS = ("unary", "stream1", "stream100")


def endpoint(kind: str, n: int) -> str:
    """C's endpoint for n calls of this kind."""
    return {"unary": f"/bench?n={n}", "stream1": f"/benchstream?n={n}&msgs=1",
            "stream100": f"/benchstream?n={n}&msgs=100"}[kind]


def fn_names(gb: GoBinary) -> list[str]:
    """The BPF function names the two probes attach in this binary (hooks and extra points)."""
    return sorted({fn for p in PROBES for _, fn in p.attach_points(gb, Build("", 0, 0))})


def bpf_text(names: list[str], counting: bool) -> str:
    """One program per name: empty (`return 0`), or counting its hits per pid."""
    if not counting:
        return "".join(f"int {fn}(struct pt_regs *ctx) {{ return 0; }}\n" for fn in names)
    out = ["struct key { u32 pid; u32 fn; };\nBPF_HASH(hits, struct key, u64, 64);\n"]
    for i, fn in enumerate(names):
        out.append(f"int {fn}(struct pt_regs *ctx) {{ struct key k = {{bpf_get_current_pid_tgid() >> 32, {i}}}; "
                   f"hits.increment(k); return 0; }}\n")
    return "".join(out)


def attach_floor(gb: GoBinary, path: str, pids: list[int], counting: bool = False) -> tuple[Any, int]:
    """The empty (or counting) programs at the probes' own points, per pid; (BPF object, points per pid)."""
    from bcc import BPF  # Debian's python3-bpfcc, linked into the venv by tools/setup.sh

    b = BPF(text=bpf_text(fn_names(gb), counting))
    n = 0
    for pid in pids:
        n = sum(len(probe.attach(b, gb, path, pid, Build("", 0, 0))) for probe in PROBES)
    return b, n


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in ns resolution: its CPU clock (MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED))."""
    return time.clock_gettime(((~pid) << 3) | 2)


def prog_stats() -> dict[str, tuple[int, int]]:
    """(run_time_ns, run_cnt) of every loaded uprobe_grpc_* program, by its (15-character) name."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout
    stats: dict[str, tuple[int, int]] = {}
    for p in json.loads(out):
        if p.get("name", "").startswith("uprobe_grpc"):
            t, c = stats.get(p["name"], (0, 0))
            stats[p["name"]] = (t + p.get("run_time_ns", 0), c + p.get("run_cnt", 0))
    return stats


class KindCount:
    """Spans by kind (a consumer of the receiver)."""

    def __init__(self) -> None:
        self.client = 0
        self.server = 0

    def consume(self, batch: SpanBatch) -> None:
        for _, _, s in batch.iter_spans():
            if s.kind == KIND_CLIENT:
                self.client += 1
            elif s.kind == KIND_SERVER:
                self.server += 1


class App:
    def __init__(self, binary: Path, *args: str) -> None:
        self.proc = subprocess.Popen(["taskset", "-c", "0", str(binary), *args], stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "GOMAXPROCS": "1"})
        assert self.proc.stdout is not None
        self.grpc = self.proc.stdout.readline().split()[1]
        self.http = self.proc.stdout.readline().split()[1]
        self.pid = self.proc.pid  # taskset execs grpcapp: same pid

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def bench(c: App, s: App, path: str, n: int) -> tuple[float, float, float]:
    """(loop wall µs per call, S CPU µs per call, C CPU µs per call) for one run of C's endpoint."""
    s0, c0 = cpu_seconds(s.pid), cpu_seconds(c.pid)
    with urllib.request.urlopen(f"http://{c.http}{path}", timeout=600) as r:
        body = r.read().decode()
    s1, c1 = cpu_seconds(s.pid), cpu_seconds(c.pid)
    return float(body.split()[1]) / 1e3, (s1 - s0) / n * 1e6, (c1 - c0) / n * 1e6


def start_receiver(pids: list[int], probes: tuple[str, ...], sink: KindCount) -> Any:
    cfg = factory.config_model.model_validate({
        "targets": [{"pid": p} for p in pids], "discovery_interval": "100ms", "propagation": "off",
        "instrumentations": {"net_http_server": False, "net_http_client": False, "database_sql": False,
                             "grpc_server": "grpc_server" in probes, "grpc_client": "grpc_client" in probes}})
    r: Any = factory.create(ComponentID("ebpf_go"), cfg, ComponentTelemetry("receiver", "ebpf_go", SelfMetrics()), sink)
    r.start(None)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 60:
        if all(p in r.processes for p in pids):
            tbs = list(r.binaries.values())
            if (len(tbs) == 1 and len(tbs[0].programs) == len(probes)
                    and all(p in pp.program.links for pp in tbs[0].programs for p in pids)):
                return r
        time.sleep(0.05)
    r.shutdown()
    raise RuntimeError(f"grpcapp pids {pids} not instrumented with {probes} within 60 s")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=50000, help="unary calls per /bench")
    ap.add_argument("--n-stream", default="20000,5000", help="calls per /benchstream with msgs=1 and msgs=100")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="after the rounds, one more unary run with the receiver and kernel.bpf_stats_enabled: "
                         "each program's run time per call (not in the tables: the stats cost time themselves)")
    ap.add_argument("--modes", default="without,floor,with", help=f"comma-separated, in round order: {MODES}")
    args = ap.parse_args()
    modes = args.modes.split(",")
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes {m}: one of {MODES}")
    if "without" not in modes:
        ap.error("--modes needs 'without' (every figure is a difference to it)")
    n1, n100 = (int(x) for x in args.n_stream.split(","))
    ns = {"unary": args.n, "stream1": n1, "stream100": n100}
    calls = sum(ns.values())
    os.sched_setaffinity(0, {1})
    binary = build_go_fixture("grpcapp", "system")
    gb = GoBinary.open(str(binary))
    # results[mode][kind] = [(wall, S cpu, C cpu) per round]
    res: dict[str, dict[str, list[tuple[float, float, float]]]] = {m: {k: [] for k in KINDS} for m in modes}
    spans: dict[str, list[tuple[int, int]]] = {m: [] for m in modes if m in WITH_PROBES}
    s = App(binary)
    c = App(binary, "-target", s.grpc)
    try:
        pids = [s.pid, c.pid]
        for kind, n in ns.items():
            bench(c, s, endpoint(kind, n // 10), n // 10)   # warm-up
        # hits per call, counted at the floor's points (not timed)
        b, points = attach_floor(gb, str(binary), pids, counting=True)
        names = fn_names(gb)
        hits: dict[str, dict[tuple[int, str], float]] = {}
        for kind, n in ns.items():
            b["hits"].clear()
            bench(c, s, endpoint(kind, n // 10), n // 10)
            hits[kind] = {(k.pid, names[k.fn]): v.value / (n // 10) for k, v in b["hits"].items()}
        release_bpf(b)
        for _ in range(args.rounds):
            for mode in modes:
                sink = KindCount()
                handle: Any = None
                if mode == "floor":
                    handle, _ = attach_floor(gb, str(binary), pids)
                elif mode in WITH_PROBES:
                    handle = start_receiver(pids, WITH_PROBES[mode], sink)
                try:
                    for kind in KINDS:
                        res[mode][kind].append(bench(c, s, endpoint(kind, ns[kind]), ns[kind]))
                    if mode in WITH_PROBES:
                        want = calls
                        t0 = time.monotonic()
                        while time.monotonic() - t0 < 10 and (
                                ("grpc_client" in WITH_PROBES[mode] and sink.client < want)
                                or ("grpc_server" in WITH_PROBES[mode] and sink.server < want)):
                            time.sleep(0.05)
                        time.sleep(0.2)
                finally:
                    if mode == "floor":
                        release_bpf(handle)
                    elif handle is not None:
                        handle.shutdown()
                if mode in WITH_PROBES:
                    spans[mode].append((sink.client, sink.server))
        body: dict[str, tuple[float, float]] = {}
        if args.bpf_stats:
            r = start_receiver(pids, WITH_PROBES["with"], KindCount())
            subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=1"], check=True)
            try:
                st0 = prog_stats()
                bench(c, s, endpoint("unary", args.n), args.n)
                st1 = prog_stats()
            finally:
                subprocess.run(["sysctl", "-qw", "kernel.bpf_stats_enabled=0"], check=False)
                r.shutdown()
            for name, (t, cnt) in st1.items():
                t0_, c0_ = st0.get(name, (0, 0))
                if cnt > c0_:
                    body[name] = ((t - t0_) / (cnt - c0_), (cnt - c0_) / args.n)
    finally:
        c.stop()
        s.stop()

    print(f"grpcapp (Go {gb.go_version}, {gb.modules.get(grpc_server.MODULE, '?')}), S and C GOMAXPROCS=1 on CPU 0; "
          f"{args.rounds} rounds of {', '.join(modes)}; {points} probe points per process")
    print("hits per call (S | C): " + "; ".join(
        f"{kind}: " + ", ".join(f"{fn.removeprefix('uprobe_grpc_')} {v:.2f}" for (pid, fn), v in sorted(h.items())
                                if pid == s.pid) + " | " + ", ".join(
            f"{fn.removeprefix('uprobe_grpc_')} {v:.2f}" for (pid, fn), v in sorted(h.items()) if pid == c.pid)
        for kind, h in hits.items()))
    hits_s = {k: sum(v for (pid, _), v in h.items() if pid == s.pid) for k, h in hits.items()}
    hits_c = {k: sum(v for (pid, _), v in h.items() if pid == c.pid) for k, h in hits.items()}
    labels = {"unary": f"unary (n={args.n})", "stream1": f"stream msgs=1 (n={n1})", "stream100": f"stream msgs=100 (n={n100})"}
    for kind in KINDS:
        print(f"\n{labels[kind]}: per call, loop wall µs / S CPU µs / C CPU µs")
        print("| round | " + " | ".join(modes) + " |")
        print("|---|" + "---|" * len(modes))
        for i in range(args.rounds):
            cells = [f"{res[m][kind][i][0]:.1f} / {res[m][kind][i][1]:.2f} / {res[m][kind][i][2]:.2f}" for m in modes]
            print(f"| {i + 1} | {' | '.join(cells)} |")
    if spans:
        print(f"\nspans per round (calls: {calls}), client / server: " + "; ".join(
            f"{m} " + ", ".join(f"{cl} / {sv}" for cl, sv in got) for m, got in spans.items()))
    print("\nmedians, per call: CPU added over 'without' (µs), S = server process, C = client process")
    print("| calls | hits S / C | side | " + " | ".join(f"{m} added" for m in modes if m != "without")
          + (" | with / floor |" if "floor" in modes and "with" in modes else " |"))
    print("|---|---|---|" + "---|" * (len(modes) - 1) + ("---|" if "floor" in modes and "with" in modes else ""))
    ok = True
    for kind in KINDS:
        for side, col in (("server", 1), ("client", 2)):
            base = statistics.median(x[col] for x in res["without"][kind])
            added = {m: statistics.median(x[col] for x in res[m][kind]) - base for m in modes if m != "without"}
            ratio = ""
            if "floor" in modes and "with" in modes:
                ratio = f" | {added['with'] / added['floor']:.2f}×" if added["floor"] > 0 else " | n/a"
            print(f"| {labels[kind]} | {hits_s[kind]:.2f} / {hits_c[kind]:.2f} | {side} (base {base:.2f}) | "
                  + " | ".join(f"{added[m]:+.2f}" for m in added) + ratio + " |")
    for mode, got in spans.items():
        for cl, sv in got:
            want_c = calls if "grpc_client" in WITH_PROBES[mode] else 0
            want_s = calls if "grpc_server" in WITH_PROBES[mode] else 0
            if (cl, sv) != (want_c, want_s):
                ok = False
                print(f"{mode}: {cl} client and {sv} server spans, expected {want_c} and {want_s}")
    if body:
        print("BPF run time per unary call (kernel.bpf_stats_enabled, one extra run): " + "; ".join(
            f"{name}: {ns:.0f} ns x {runs:.2f}" for name, (ns, runs) in sorted(body.items()))
              + f"; total {sum(ns * runs for ns, runs in body.values()) / 1e3:.2f} µs (both processes)")
    print(f"spans: every call one client and one server span in 'with' rounds: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
