"""What the net/http client probe + sk_msg traceparent insertion add per request (root).

Service A (tests/fixtures/go/httpchain, Go 1.26, GOMAXPROCS=1) calls a raw local HTTP/1.1 server
for each request it serves; a keep-alive client sends N sequential requests to A. Rounds alternate
without / with (sk_msg propagation + the client probe attached to A only: the server probe is
measured in http_server_overhead.py). Reported per request: wall µs at the client and A's CPU µs
(utime+stime: uprobe handlers run in A's thread; the sk_msg program runs in A's send).

    .venv/bin/python benchmarks/propagation_overhead.py --rounds 3 -n 5000
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from receiver.ebpf_go.gobinary import GoBinary  # noqa: E402
from receiver.ebpf_go.probes import nethttp_client as nc  # noqa: E402
from receiver.ebpf_go.propagation.skmsg import SkMsgPropagation  # noqa: E402
from tests.e2e.test_ebpf_propagation import TP_LINE, RawHTTP  # noqa: E402
from tests.support.collector import free_port, wait_for_port  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def run(port: int, pid: int, n: int) -> tuple[float, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c0, t0 = cpu_s(pid), time.perf_counter()
    for _ in range(n):
        conn.request("GET", "/chain")
        conn.getresponse().read()
    wall, cpu = time.perf_counter() - t0, cpu_s(pid) - c0
    conn.close()
    return wall / n * 1e6, cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-n", type=int, default=5000)
    args = ap.parse_args()
    from bcc import BPF
    path = str(build_go_fixture("httpchain", "1.26"))
    gb = GoBinary.open(path)
    raw = RawHTTP()
    sk = SkMsgPropagation(pin_dir="/sys/fs/bpf/otelgo_bench_prop")
    rows = []

    def phase(traced: bool) -> tuple[tuple[float, float], int]:
        # A fresh A per phase: its connection to the raw server is made while sock_ops is (or is
        # not) attached, so it is (or is not) in the sockhash.
        port = free_port()
        proc = subprocess.Popen([path, "-listen", f"127.0.0.1:{port}", "-next", f"http://127.0.0.1:{raw.port}/chain"],
                                stderr=subprocess.DEVNULL, env={**os.environ, "GOMAXPROCS": "1"})
        b = None
        try:
            wait_for_port(port, proc=proc)
            if traced:
                sk.start()
                sk.watch(proc.pid)   # as the receiver does for a traced process
                b = BPF(src_file=str(nc.BPF_SOURCE).encode(),
                        cflags=[*nc.cflags(gb, skmsg=True, pin_dir=sk.pin_dir), f"-I{nc.BPF_SOURCE.parent}"])
                nc.attach(b, gb, path, proc.pid)
            run(port, proc.pid, 500)
            with raw.lock:
                raw.requests.clear()
            res = run(port, proc.pid, args.n)
            with raw.lock:
                injected = sum(1 for q in raw.requests if TP_LINE.search(q))
            return res, injected
        finally:
            proc.kill()
            proc.wait()
            if b is not None:
                with contextlib.suppress(Exception):  # BCC's detach of an exited pid's PMU uprobes
                    b.cleanup()
                sk.stop()

    try:
        for r in range(args.rounds):
            base, _ = phase(False)
            traced, injected = phase(True)
            rows.append((r + 1, base, traced, injected))
            print(f"round {r + 1}: without {base[0]:.1f} / {base[1]:.1f} µs, with {traced[0]:.1f} / "
                  f"{traced[1]:.1f} µs (wall / A CPU per request); {injected}/{args.n} injected", flush=True)
    finally:
        raw.close()
    mw = statistics.median(t[0] - b0[0] for _, b0, t, _ in rows)
    mc = statistics.median(t[1] - b0[1] for _, b0, t, _ in rows)
    print(f"median added: wall {mw:+.1f} µs, A CPU {mc:+.1f} µs per request")


if __name__ == "__main__":
    main()
