"""What sk_msg propagation costs a TCP send, for a traced process and for every other one (root).

A socket in the sockhash of an sk_msg program sends through the kernel's sk_msg path (its bytes
copied into an sk_msg and the program run) on every send. Since the sock_ops program puts only the
connections of traced processes there, the other processes of the host should see no change. This
process sends 300-byte messages to a loopback sink, rounds alternating: no sk_msg attached,
attached with this process not traced ("other"), attached with it traced. Reported: CPU µs per
send (this thread's utime+stime) per variant, median of the rounds, and the median paired delta.

    .venv/bin/python benchmarks/skmsg_send_cost.py --rounds 7 --sends 20000
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from receiver.ebpf_go.propagation.skmsg import SkMsgPropagation  # noqa: E402

VARIANTS = ("off", "other", "traced")


def cpu_per_send(n: int) -> float:
    srv = socket.create_server(("127.0.0.1", 0))

    def sink() -> None:
        c, _ = srv.accept()
        with c:
            while c.recv(65536):
                pass
    t = threading.Thread(target=sink, daemon=True)
    t.start()
    cl = socket.create_connection(srv.getsockname()[:2])
    time.sleep(0.05)
    buf = b"x" * 300
    r0 = resource.getrusage(resource.RUSAGE_THREAD)
    for _ in range(n):
        cl.send(buf)
    r1 = resource.getrusage(resource.RUSAGE_THREAD)
    cl.close()
    t.join(5)
    srv.close()
    return ((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--sends", type=int, default=20000)
    args = ap.parse_args()
    got: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for v in VARIANTS:
            sk = None
            if v != "off":
                sk = SkMsgPropagation(pin_dir="/sys/fs/bpf/otelgo_bench_send")
                sk.start()
                if v == "traced":
                    sk.watch(os.getpid())
            try:
                got[v].append(cpu_per_send(args.sends))
            finally:
                if sk is not None:
                    sk.stop()
    off = got["off"]
    print(f"| variant | CPU µs per send (median of {args.rounds}) | added vs off (median paired delta) |")
    print("|---|---|---|")
    for v in VARIANTS:
        delta = statistics.median(a - b for a, b in zip(got[v], off, strict=True))
        print(f"| {v} | {statistics.median(got[v]):.2f} | {'' if v == 'off' else f'{delta:+.2f}'} |")


if __name__ == "__main__":
    main()
