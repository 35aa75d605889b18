"""The platform floor: what one bare uprobe hit costs here, on a single-stepped and an emulated instruction.

Run: .venv/bin/python benchmarks/uprobe_floor.py [--calls 200000]   (root)

A tiny C program calls two functions in a timed loop: one starting with `cmp` (single-stepped out
of line by the kernel, like Go's stack check and every `ret`), one starting with `push` (emulated,
like the `jbe` after Go's stack check). Each is timed without a probe and with a BPF program that
only counts, in the same run; the difference per call is the cost of one hit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from receiver.ebpf_go.bpfprogram import release_bpf  # noqa: E402

C_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
__attribute__((naked, noinline)) void f_cmp(void)  { __asm__ volatile("cmp %rsp, %rbp\n\tret\n"); }
__attribute__((naked, noinline)) void f_push(void) { __asm__ volatile("push %rbp\n\tpop %rbp\n\tret\n"); }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    long n = atol(argv[1]);
    char line[16];
    /* wait for "go" on stdin so probes can be attached between rounds */
    while (fgets(line, sizeof line, stdin)) {
        double t0 = now(); for (long i = 0; i < n; i++) f_cmp();  double t1 = now();
        for (long i = 0; i < n; i++) f_push(); double t2 = now();
        printf("%.9f %.9f\n", (t1 - t0) / n, (t2 - t1) / n); fflush(stdout);
    }
    return 0;
}
"""

BPF_TEXT = """
BPF_ARRAY(hits, u64, 1);
int on_hit(void *ctx) { int k = 0; u64 *v = hits.lookup(&k); if (v) __sync_fetch_and_add(v, 1); return 0; }
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from bcc import BPF  # Debian's python3-bpfcc, linked into the venv by tools/setup.sh

    work = Path(tempfile.mkdtemp(prefix="uprobe-floor-"))
    (work / "floor.c").write_text(C_SOURCE)
    exe = work / "floor"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(work / "floor.c")], check=True)
    proc = subprocess.Popen([str(exe), str(args.calls)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin and proc.stdout

    def round_() -> tuple[float, float]:
        proc.stdin.write("go\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        a, b = proc.stdout.readline().split()  # type: ignore[union-attr]
        return float(a), float(b)

    base_cmp, base_push, probed_cmp, probed_push = [], [], [], []
    for _ in range(args.rounds):
        c, p = round_()
        base_cmp.append(c)
        base_push.append(p)
        b = BPF(text=BPF_TEXT)
        b.attach_uprobe(name=str(exe), sym="f_cmp", fn_name="on_hit", pid=proc.pid)
        b.attach_uprobe(name=str(exe), sym="f_push", fn_name="on_hit", pid=proc.pid)
        c, p = round_()
        probed_cmp.append(c)
        probed_push.append(p)
        hits = b["hits"][0].value
        release_bpf(b)
        assert hits == 2 * args.calls, f"expected {2 * args.calls} hits, saw {hits}"
    proc.stdin.close()
    proc.wait()
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    result = {
        "single_stepped_us": (med(probed_cmp) - med(base_cmp)) * 1e6,
        "emulated_us": (med(probed_push) - med(base_push)) * 1e6,
        "calls": args.calls, "rounds": args.rounds,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"one uprobe hit: single-stepped (cmp) {result['single_stepped_us']:.2f} µs, "
              f"emulated (push) {result['emulated_us']:.2f} µs  ({args.calls} calls x {args.rounds} rounds, medians)")


if __name__ == "__main__":
    sys.exit(main())
