"""Where the net/http server probe's cost goes: variants of bpf/nethttp_server.c side by side.

    .venv/bin/python benchmarks/server_probe_ab.py [--rounds 3] [--seconds 3] [--variants a,b,...]   (root)

Compiles variants of the server program with pieces switched off (-D flags, see the file's head),
or attached differently, then measures the server's CPU per request under `wrk -t1 -c4` for each,
in rotating order within every round (the first variant of round r is variant r mod n), all against
the one server process (Go 1.27 httpserver fixture, GOMAXPROCS=1, pinned to CPU 0; wrk on CPU 1).
Reports per variant the median server CPU µs/request and what it adds to "none" (no probes).
The VM's 2 cores may be shared with other work: only the side-by-side differences mean anything.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_server_overhead import cpu_seconds  # noqa: E402

from receiver.ebpf_go import loader  # noqa: E402
from receiver.ebpf_go.gobinary import GoBinary  # noqa: E402
from receiver.ebpf_go.probes import nethttp_server  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402

EMPTY_BPF = "int uprobe_server_ServeHTTP(void *ctx) { return 0; }\n" \
            "int uprobe_server_ServeHTTP_return(void *ctx) { return 0; }\n"


@dataclass
class Variant:
    name: str
    defines: list[str] = field(default_factory=list)
    where: str = "both"          # both | entry | ret
    pid_filter: bool = True      # attach per pid (as the receiver does) or pid=-1
    empty_text: bool = False     # a trivial program instead of nethttp_server.c
    bpf: Any = None


VARIANTS = {
    "none": Variant("none"),
    "full": Variant("full"),
    "empty": Variant("empty", empty_text=True),
    "empty-entry": Variant("empty-entry", empty_text=True, where="entry"),
    "empty-ret": Variant("empty-ret", empty_text=True, where="ret"),
    "empty-global": Variant("empty-global", empty_text=True, pid_filter=False),
    "no-headers": Variant("no-headers", ["-DAB_NO_HEADERS"]),
    "no-ctx-spans": Variant("no-ctx-spans", ["-DAB_NO_CTX_SPANS"]),
    "no-strings": Variant("no-strings", ["-DAB_NO_STRINGS"]),
    "no-ringbuf": Variant("no-ringbuf", ["-DAB_NO_RINGBUF", "-DAB_NO_STRINGS"]),
    "full-global": Variant("full-global", pid_filter=False),
}


def wrk(url: str, seconds: int) -> tuple[float, int]:
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c4", f"-d{seconds}s", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--go", default="1.27")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--variants", default="none,full,empty,empty-entry,empty-ret,no-headers,no-ctx-spans,"
                                          "no-strings,no-ringbuf")
    args = ap.parse_args()
    os.sched_setaffinity(0, {1})
    bcc = loader.import_bcc()
    ksrc, _ = loader.find_kernel_headers("auto")
    exe = build_go_fixture("httpserver", args.go, "plain")
    gb = GoBinary.open(str(exe))
    pin_dir = f"/sys/fs/bpf/otelgo-ab-{os.getpid()}"
    os.makedirs(pin_dir, exist_ok=True)
    base = nethttp_server.cflags(gb, pin_dir=pin_dir, max_inflight=16384, ringbuf_pages=1024)
    variants = [VARIANTS[v] for v in args.variants.split(",")]
    for v in variants:
        if v.name == "none":
            continue
        if v.empty_text:
            v.bpf = bcc.BPF(text=EMPTY_BPF.encode())
        else:
            v.bpf = loader.compile_program(nethttp_server.BPF_SOURCE, base + v.defines, ksrc).bpf
            v.bpf["events"].open_ring_buffer(lambda _c, _d, _n: 0)
    sym = nethttp_server.SYMBOL
    entry = gb.entry_probe(sym).addr
    rets = gb.return_sites(sym)
    srv = subprocess.Popen(["taskset", "-c", "0", str(exe)], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "GOMAXPROCS": "1"})
    assert srv.stdout is not None
    url = f"http://{srv.stdout.readline().split()[1]}/hello"
    pid = srv.pid
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    rps_: dict[str, list[float]] = {v.name: [] for v in variants}
    try:
        wrk(url, 1)
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                if v.bpf is not None:
                    points = ([(entry, "uprobe_server_ServeHTTP")] if v.where in ("both", "entry") else []) + \
                             ([(a, "uprobe_server_ServeHTTP_return") for a in rets] if v.where in ("both", "ret")
                              else [])
                    for addr, fn in points:
                        v.bpf.attach_uprobe(name=f"/proc/{pid}/exe".encode(), addr=addr, fn_name=fn.encode(),
                                            pid=pid if v.pid_filter else -1)
                c0 = cpu_seconds(pid)
                rps, total = wrk(url, args.seconds)
                cpu[v.name].append((cpu_seconds(pid) - c0) / total * 1e6)
                rps_[v.name].append(rps)
                if v.bpf is not None:
                    v.bpf.ring_buffer_consume() if not v.empty_text else None
                    for ev, fd in list(v.bpf.uprobe_fds.items()):
                        bcc.lib.bpf_close_perf_event_fd(fd)
                        v.bpf._del_uprobe_fd(ev)
    finally:
        srv.kill()
        srv.wait()
        for v in variants:
            if v.bpf is not None:
                v.bpf.cleanup()
        shutil.rmtree(pin_dir, ignore_errors=True)
    none = statistics.median(cpu["none"]) if cpu.get("none") else 0.0
    print(f"Go {args.go} httpserver, {args.rounds} rotating rounds of {args.seconds}s per variant, wrk -t1 -c4")
    print("| variant | req/s (median) | server CPU µs/req (median) | added vs none | rounds (µs/req) |")
    print("|---|---|---|---|---|")
    for v in variants:
        m = statistics.median(cpu[v.name])
        print(f"| {v.name} | {statistics.median(rps_[v.name]):,.0f} | {m:.1f} | {m - none:+.1f} | "
              f"{' '.join(f'{x:.1f}' for x in cpu[v.name])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
