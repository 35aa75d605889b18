"""Where the net/http server probe's cost goes: variants of bpf/nethttp_server.c side by side.

    .venv/bin/python benchmarks/server_probe_ab.py [--rounds 3] [--seconds 3] [--variants a,b,...]   (root)

Compiles variants of the server program with pieces switched off (-DAB_* flags of the program as of
--ab-rev, the last with such switches: today's program has none),
or attached differently, then measures the server's CPU per request under `wrk -t1 -c4` for each,
in rotating order within every round (the first variant of round r is variant r mod n), all against
the one server process (Go 1.27 httpserver fixture, GOMAXPROCS=1, pinned to CPU 0; wrk on CPU 1).
Reports per variant the median server CPU µs/request, what it adds to "none" (no probes), the same
paired by round (each round's value minus that round's "none", then the median: the machine's load
drifts between rounds), and the BPF programs' own run time per request (kernel BPF stats, enabled
by BPF_ENABLE_STATS for the run): the program body without the cost of the probe hit itself, far
less noisy than the server's CPU time. "before" compiles bpf/nethttp_server.c as of --before-rev
with today's cflags (before/after in one run). --headers adds User-Agent and traceparent to wrk's
requests (which otherwise carry only Host: the header map is then empty and not walked).
Where the span ends: "full" and the AB switches = entry + every RET of ServeHTTP (the probe before
issue 8); "end" = entry + the emulated end points (probes/nethttp_server.py end_plan, what the
receiver attaches now); "empty-*" = programs that only return 0 at the same points (the in-situ
floor of those points). The ring buffer is drained by a thread during each run, as the receiver does.
The VM's 2 cores may be shared with other work: only the side-by-side differences mean anything.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_server_overhead import cpu_seconds  # noqa: E402

from receiver.ebpf_go import bpfsys, preflight  # noqa: E402
from receiver.ebpf_go.bpfprogram import compile_program  # noqa: E402
from receiver.ebpf_go.gobinary import GoBinary  # noqa: E402
from receiver.ebpf_go.probes import nethttp_server  # noqa: E402
from tests.support.bpffs import make_pin_dir  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402

# The server program before the issue-8 body cuts (the A/B switches only): variant "before".
BEFORE_REV = "63eb9d3"
# The last revision whose server program has the AB_* switches (they left the production C with the
# probe packages): the AB variants compile bpf/nethttp_server.c as of it, with its own headers.
AB_REV = "c44cf6b"
EMPTY_BPF = "".join(f"int {fn}(void *ctx) {{ return 0; }}\n" for fn in (
    "uprobe_server_ServeHTTP", "uprobe_server_ServeHTTP_return", "uprobe_server_end_h1", "uprobe_server_end_h2"))


@dataclass
class Variant:
    name: str
    defines: list[str] = field(default_factory=list)
    entry: bool = True           # the entry probe (jcc after the stack check)
    end: str = "ret"             # "ret": every RET of ServeHTTP; "emulated": end_plan's points; "": none
    pid_filter: bool = True      # attach per pid (as the receiver does) or pid=-1
    empty_text: bool = False     # a trivial program instead of nethttp_server.c
    before: bool = False         # nethttp_server.c as of --before-rev (same cflags)
    bpf: Any = None


VARIANTS = {
    "none": Variant("none"),
    "full": Variant("full"),
    "end": Variant("end", end="emulated"),
    "empty": Variant("empty", empty_text=True),
    "empty-entry": Variant("empty-entry", empty_text=True, end=""),
    "empty-ret": Variant("empty-ret", empty_text=True, entry=False),
    "empty-end": Variant("empty-end", empty_text=True, end="emulated"),
    "empty-endonly": Variant("empty-endonly", empty_text=True, entry=False, end="emulated"),
    "empty-global": Variant("empty-global", empty_text=True, pid_filter=False),
    "no-headers": Variant("no-headers", ["-DAB_NO_HEADERS"]),
    "no-ctx-spans": Variant("no-ctx-spans", ["-DAB_NO_CTX_SPANS"]),
    "no-strings": Variant("no-strings", ["-DAB_NO_STRINGS"]),
    "no-ringbuf": Variant("no-ringbuf", ["-DAB_NO_RINGBUF", "-DAB_NO_STRINGS"]),
    "full-global": Variant("full-global", pid_filter=False),
    "end-no-headers": Variant("end-no-headers", ["-DAB_NO_HEADERS"], end="emulated"),
    "end-no-ctx-spans": Variant("end-no-ctx-spans", ["-DAB_NO_CTX_SPANS"], end="emulated"),
    "end-no-strings": Variant("end-no-strings", ["-DAB_NO_STRINGS"], end="emulated"),
    "end-no-ringbuf": Variant("end-no-ringbuf", ["-DAB_NO_RINGBUF", "-DAB_NO_STRINGS"], end="emulated"),
    "end-empty-body": Variant("end-empty-body", ["-DAB_EMPTY"], end="emulated"),
    "end-hash": Variant("end-hash", ["-DAB_HASH"], end="emulated"),
    "end-no-lookup": Variant("end-no-lookup", ["-DAB_NO_MORESTACK_LOOKUP"], end="emulated"),
    "end-no-entry-read": Variant("end-no-entry-read", ["-DAB_NO_ENTRY_READ"], end="emulated"),
    "end-no-ids": Variant("end-no-ids", ["-DAB_NO_IDS"], end="emulated"),
    "before": Variant("before", end="emulated", before=True),
    "end-prandom-ids": Variant("end-prandom-ids", ["-DAB_PRANDOM_IDS"], end="emulated"),
    "end-split-line": Variant("end-split-line", ["-DAB_SPLIT_LINE"], end="emulated"),
    "end-elem-read": Variant("end-elem-read", ["-DAB_ELEM_READ"], end="emulated"),
    "end-ctx-spans": Variant("end-ctx-spans", ["-DCTX_SPANS=1"], end="emulated"),
    "end-field-reads": Variant("end-field-reads", ["-DAB_FIELD_READS"], end="emulated"),
}


BPF_ENABLE_STATS = 32   # bpf(2) command: run-time stats on while the returned fd is open


def enable_bpf_stats() -> int:
    """Count each program's run time (kernel.bpf_stats_enabled, held by an fd: off when it closes)."""
    return bpfsys._bpf(BPF_ENABLE_STATS, bpfsys._attr(struct.pack("<I", 0)), "enabling BPF run-time stats")


def prog_run_time(fds: list[int]) -> tuple[int, int]:
    """(run_time_ns, run_cnt) summed over these program fds (struct bpf_prog_info, offsets 192/200)."""
    total = cnt = 0
    for fd in fds:
        info = ctypes.create_string_buffer(232)
        attr = bpfsys._attr(struct.pack("<IIQ", fd, len(info), ctypes.addressof(info)))
        bpfsys._bpf(bpfsys.BPF_OBJ_GET_INFO_BY_FD, attr, "reading program info")
        t, c = struct.unpack_from("<QQ", info.raw, 192)
        total, cnt = total + t, cnt + c
    return total, cnt


def wrk(url: str, seconds: int, headers: list[str] | None = None) -> tuple[float, int]:
    hdr = [a for h in headers or [] for a in ("-H", h)]
    out = subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c4", f"-d{seconds}s", *hdr, url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return rps, total


def server_source_at(rev: str, tmp: Path) -> Path:
    """bpf/nethttp_server.c as of `rev`, with the headers of its bpf/ directory beside it (a quoted
    include is found beside the file first, so today's headers do not mix in)."""
    dest = tmp / f"bpf-{rev}"
    if not dest.exists():
        dest.mkdir()
        archive = subprocess.run(["git", "archive", rev, "bpf/"], cwd=Path(__file__).resolve().parents[1],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "bpf" / "nethttp_server.c"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--go", default="1.27")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--variants", default="none,full,end,empty,empty-end,empty-entry,empty-ret,empty-endonly")
    ap.add_argument("--before-rev", default=BEFORE_REV,
                    help="git revision whose bpf/nethttp_server.c the variant 'before' compiles")
    ap.add_argument("--ab-rev", default=AB_REV,
                    help="git revision whose bpf/nethttp_server.c (with its AB_* switches) the AB variants compile")
    ap.add_argument("--headers", action="store_true",
                    help="send User-Agent and traceparent (wrk sends only Host): the header walk finds both")
    args = ap.parse_args()
    headers = ["User-Agent: wrk/4.2 (server_probe_ab)",
               "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"] if args.headers else []
    os.sched_setaffinity(0, {1})
    ksrc, _ = preflight.find_kernel_headers("auto")
    exe = build_go_fixture("httpserver", args.go, "plain")
    gb = GoBinary.open(str(exe))
    pin_dir = make_pin_dir(f"otelgo-ab-{os.getpid()}")
    base = nethttp_server.cflags(gb, pin_dir=pin_dir, max_inflight=16384, ringbuf_pages=1024)
    variants = [VARIANTS[v] for v in args.variants.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        empty_src = Path(tmp) / "empty.c"
        empty_src.write_text(EMPTY_BPF)
        for v in variants:
            if v.name == "none":
                continue
            # A variant's -DNAME=value replaces the base's NAME (e.g. -DCTX_SPANS=1).
            names = {d.split("=")[0] for d in v.defines}
            flags = [f for f in base if f.split("=")[0] not in names] + v.defines
            if v.empty_text:
                v.bpf = compile_program(empty_src, [], ksrc).bpf
            elif v.before or any(d.startswith("-DAB_") for d in v.defines):
                old = server_source_at(args.before_rev if v.before else args.ab_rev, Path(tmp))
                v.bpf = compile_program(old, flags, ksrc).bpf
            else:
                v.bpf = compile_program(nethttp_server.BPF_SOURCE, flags, ksrc).bpf
    sym = nethttp_server.SYMBOL
    entry = gb.entry_probe(sym).addr
    ends = {"ret": nethttp_server.end_plan(gb, "ret").points, "emulated": nethttp_server.end_plan(gb, "emulated").points,
            "": []}
    srv = subprocess.Popen(["taskset", "-c", "0", str(exe)], stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "GOMAXPROCS": "1"})
    assert srv.stdout is not None
    url = f"http://{srv.stdout.readline().split()[1]}/hello"
    pid = srv.pid
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    rps_: dict[str, list[float]] = {v.name: [] for v in variants}
    records: dict[str, int] = {v.name: 0 for v in variants}
    body: dict[str, list[float]] = {v.name: [] for v in variants}   # BPF run time ns per request
    stats_fd = enable_bpf_stats()
    try:
        wrk(url, 1)
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                stop = threading.Event()
                drain: threading.Thread | None = None
                if v.bpf is not None:
                    points = ([(entry, "uprobe_server_ServeHTTP")] if v.entry else []) + ends[v.end]
                    for addr, fn in points:
                        v.bpf.attach_uprobe(name=f"/proc/{pid}/exe".encode(), addr=addr, fn_name=fn.encode(),
                                            pid=pid if v.pid_filter else -1)
                    if not v.empty_text:
                        rb = v.bpf.ring_buffer("events")

                        def run(rb: Any = rb, name: str = v.name, stop: threading.Event = stop) -> None:
                            while not stop.is_set():
                                rb.wait(0.05)
                                records[name] += len(rb.read())
                        drain = threading.Thread(target=run, daemon=True)
                        drain.start()
                fds = list(v.bpf.prog_fds.values()) if v.bpf is not None else []
                t0, _ = prog_run_time(fds)
                c0 = cpu_seconds(pid)
                rps, total = wrk(url, args.seconds, headers)
                cpu[v.name].append((cpu_seconds(pid) - c0) / total * 1e6)
                body[v.name].append((prog_run_time(fds)[0] - t0) / total)
                rps_[v.name].append(rps)
                if v.bpf is not None:
                    stop.set()
                    if drain is not None:
                        drain.join()
                    for key in list(v.bpf.uprobe_fds):
                        v.bpf.detach(key)
    finally:
        os.close(stats_fd)
        srv.kill()
        srv.wait()
        for v in variants:
            if v.bpf is not None:
                v.bpf.close()
        shutil.rmtree(pin_dir, ignore_errors=True)
    none = statistics.median(cpu["none"]) if cpu.get("none") else 0.0
    print(f"Go {args.go} httpserver, {args.rounds} rotating rounds of {args.seconds}s per variant, wrk -t1 -c4"
          + (" with User-Agent and traceparent" if headers else " (Host header only)"))
    # Paired: each round's value minus the same round's "none" (neighbours in time), then the median.
    paired = {v.name: [x - n for x, n in zip(cpu[v.name], cpu["none"], strict=True)] if "none" in cpu else []
              for v in variants}
    print("| variant | end at | req/s (median) | server CPU µs/req (median) | added vs none | added, paired by "
          "round | BPF run time ns/req | records | rounds (µs/req) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        m = statistics.median(cpu[v.name])
        where = "-" if v.bpf is None else ("entry + " if v.entry else "") + (v.end or "no end")
        pm = f"{statistics.median(paired[v.name]):+.1f}" if paired[v.name] else "-"
        bt = f"{statistics.median(body[v.name]):.0f}" if v.bpf is not None else "-"
        print(f"| {v.name} | {where} | {statistics.median(rps_[v.name]):,.0f} | {m:.1f} | {m - none:+.1f} | {pm} | "
              f"{bt} | {records[v.name] if not v.empty_text and v.bpf is not None else '-'} | "
              f"{' '.join(f'{x:.1f}' for x in cpu[v.name])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
