"""CPU and wake-ups of the ebpf_go receiver's threads while it traces an idle Go server.

    .venv/bin/python benchmarks/receiver_idle.py [--seconds 20] [--binary PATH]  (root)

The receiver runs in this process (`propagation: off`), attached to the Go 1.27 httpserver fixture
(or PATH) that gets no request; after 2 s of settling, each thread's CPU (`/proc/self/task/*/schedstat`)
and voluntary context switches (wake-ups) are sampled over the window.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Null:
    def consume(self, batch: Any) -> None:
        pass


def snapshot(names: dict[int, str]) -> dict[str, tuple[float, int]]:
    """thread name -> (CPU seconds, voluntary context switches)"""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) not in names:
            continue
        status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
        out[names[int(task.name)]] = (int((task / "schedstat").read_text().split()[0]) / 1e9,
                                      int(status["voluntary_ctxt_switches"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--binary", help="a Go server to trace (default: the httpserver fixture, Go 1.27)")
    args = ap.parse_args()
    from collector.component import ComponentID
    from collector.telemetry import ComponentTelemetry, SelfMetrics
    from receiver.ebpf_go.config import EbpfGoConfig
    from receiver.ebpf_go.receiver import factory
    from tests.support.gobuild import build_go_fixture
    binary = args.binary or str(build_go_fixture("httpserver", "1.27", "plain"))
    srv = subprocess.Popen([binary], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert srv.stdout is not None
    srv.stdout.readline()
    cfg = EbpfGoConfig.model_validate({"targets": [{"pid": srv.pid}], "propagation": "off"})
    r: Any = factory.create(ComponentID("ebpf_go"), cfg, ComponentTelemetry("receiver", "ebpf_go", SelfMetrics()),
                            Null())
    try:
        r.start(None)
        while srv.pid not in r.processes:
            time.sleep(0.1)
        time.sleep(2)
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        a, t0 = snapshot(names), time.monotonic()
        time.sleep(args.seconds)
        b, elapsed = snapshot(names), time.monotonic() - t0
        print("| thread | % of a core | wake-ups/s |\n|---|---|---|")
        for name in sorted(b):
            if name in a and name.startswith("ebpf_go-"):
                print(f"| {name} | {(b[name][0] - a[name][0]) / elapsed * 100:.2f} | "
                      f"{(b[name][1] - a[name][1]) / elapsed:.1f} |")
    finally:
        r.shutdown()
        srv.kill()
        srv.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
