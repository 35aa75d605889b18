"""A host of many Go services, through the real CLI: 12 processes of six binaries (Go 1.21 to 1.27,
stripped, PIE, gin, gRPC). Every one is traced; a request to each right before SIGTERM is in the
exported file after exit (every span flushed); the collector exits 0 within the promise (10 s, far
inside systemd's and the DaemonSet's 90 s: deploy/README.md) and leaves nothing attached: no pin, no
sock_ops program, no uprobe in any service (their text is byte for byte the file's again).

The figures (24 processes, attach time, RSS, shutdown, links against perf events) are
benchmarks/many_services.py's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from collector.spans import KIND_SERVER, from_json_dict
from tests.support.ci import needs_root
from tests.support.collector import CollectorProcess, json_lines, wait_for
from tests.support.held import sock_ops_on_root
from tests.support.services import start_services

pytestmark = [*needs_root(), pytest.mark.timeout(600)]

SHUTDOWN_PROMISE_S = 10.0


def instrumented(col: CollectorProcess) -> float:
    for line in col.scrape().splitlines():
        if line.startswith("otelgo_ebpf_processes_instrumented "):
            return float(line.split()[1])
    return 0.0


def int3_free(pid: int) -> bool:
    """No uprobe breakpoint left in the process: its executable mappings read as the file does."""
    exe = os.readlink(f"/proc/{pid}/exe")
    with open(f"/proc/{pid}/maps") as f:
        maps = [ln.split() for ln in f if len(ln.split()) >= 6 and "x" in ln.split()[1]]
    data = Path(exe).read_bytes()
    with open(f"/proc/{pid}/mem", "rb") as mem:
        for m in maps:
            if os.path.realpath(m[5]) != os.path.realpath(exe):
                continue
            lo, hi = (int(x, 16) for x in m[0].split("-"))
            off = int(m[2], 16)
            mem.seek(lo)
            if mem.read(hi - lo) != data[off:off + hi - lo].ljust(hi - lo, b"\0"):
                return False
    return True


def test_many_services_traced_flushed_and_released_in_time(tmp_path: Path) -> None:
    sock_ops_before = sock_ops_on_root()
    services = start_services(per_binary=2)
    out = tmp_path / "spans.jsonl"
    cfg = {"receivers": {"ebpf_go": {"targets": [{"pid": [s.pid for s in services]}],
                                     "discovery_interval": "200ms"}},
           "exporters": {"file": {"path": str(out)}},
           "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["file"]}}}}
    try:
        col = CollectorProcess(cfg, tmp_path)
        wait_for(lambda: instrumented(col) == len(services), 120, f"{len(services)} processes traced")
        pin_dirs = [p for p in Path("/sys/fs/bpf").iterdir() if p.name.startswith(f"otelgo-{col.proc.pid}-")]
        assert pin_dirs, "no pins while tracing"
        assert not any(int3_free(s.pid) for s in services), "a traced service without a uprobe in its text"
        for s in services:
            s.get()
        t0 = time.monotonic()
        rc = col.stop(timeout=60)
        took = time.monotonic() - t0
        print(f"{len(services)} processes of 6 binaries: SIGTERM to exit {took:.2f} s")
        assert rc == 0, col.log()[-3000:]
        assert took <= SHUTDOWN_PROMISE_S, f"shutdown took {took:.1f} s"
        spans = [(rs.resource.attributes["process.pid"], s) for d in json_lines(out)
                 for rs, _, s in from_json_dict(d).iter_spans() if s.kind == KIND_SERVER]
        assert sorted(pid for pid, _ in spans) == sorted(s.pid for s in services), "a span not flushed"
        assert not any(p.exists() for p in pin_dirs)
        assert sock_ops_on_root() == sock_ops_before
        assert all(int3_free(s.pid) for s in services), "a uprobe left in a service"
    finally:
        for s in services:
            s.stop()
