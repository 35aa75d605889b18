"""Ring-buffer reader throughput (receiver/ebpf_go/ringbuf.py): records per second on one core.

    flock /tmp/otelgo-ebpf.lock .venv/bin/python benchmarks/ringbuf_reader.py [--records 5000] [--rounds 20]  (root)

A real BPF ring buffer (4 MiB, like the receiver's default) is filled with N 688-byte records
(the size of a net/http server event) by a small XDP program run N times through
BPF_PROG_TEST_RUN, then drained by the reader; only the drain is timed. Rows: `read()` (bytes per
record), `read_unpacked(EVENT)` (one struct.unpack_from per record, what the server probe's
collector does), and `read_unpacked` + `nethttp_server.to_spans` (records to Span objects).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from receiver.ebpf_go import bpfsys  # noqa: E402
from receiver.ebpf_go.probes import nethttp_server  # noqa: E402
from receiver.ebpf_go.ringbuf import RingBuffer  # noqa: E402
from tests.unit.ebpf_go.test_ringbuf import _ringbuf_output_prog  # noqa: E402

SIZE = 1 << 22


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    n, size = args.records, nethttp_server.EVENT.size
    rb_fd = bpfsys.map_create(bpfsys.MapSpec("bench_rb", bpfsys.MAP_RINGBUF, 0, 0, SIZE))
    buf_fd = bpfsys.map_create(bpfsys.MapSpec("bench_buf", bpfsys.MAP_ARRAY, 4, 1024, 1))
    prog = _ringbuf_output_prog(rb_fd, buf_fd, size)
    rb = RingBuffer(rb_fd, SIZE)
    # A plausible record: a GET with a path, so that to_spans does its usual work.
    rec = bytearray(os.urandom(size))
    fields = list(nethttp_server.EVENT.unpack(bytes(rec)))
    fields[:5] = [1, os.getpid(), 1_000_000, 2_000_000, 0x1234]
    pkt = bytes(rec)
    try:
        pkt = nethttp_server.EVENT.pack(*fields)
    except Exception:  # noqa: BLE001 - keep random bytes if the layout changed
        pass
    results: dict[str, list[float]] = {"read() -> bytes": [], "read_unpacked(EVENT)": [],
                                       "read_unpacked + to_spans": []}
    for _ in range(args.rounds):
        for label in results:
            assert bpfsys.prog_test_run(prog, pkt, repeat=n) == 2
            t0 = time.perf_counter()
            if label.startswith("read()"):
                got = len(rb.read())
            elif label == "read_unpacked(EVENT)":
                got = len(rb.read_unpacked(nethttp_server.EVENT)[0])
            else:
                recs, _ = rb.read_unpacked(nethttp_server.EVENT)
                got = len(nethttp_server.to_spans(recs, 0))
            dt = time.perf_counter() - t0
            assert got == n, (label, got)
            results[label].append(dt / n)
    rb.close()
    for fd in (prog, rb_fd, buf_fd):
        os.close(fd)
    print(f"{n} records of {size} B per batch, {args.rounds} rounds, median")
    print("| path | ns/record | records/s (one core) |")
    print("|---|---|---|")
    for label, v in results.items():
        m = statistics.median(v)
        print(f"| {label} | {m * 1e9:.0f} | {1 / m:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
