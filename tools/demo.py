"""`make demo`: build the sample Go server, start it and the collector (config.yaml), send traffic.

    .venv/bin/python tools/demo.py [--go 1.27] [--requests 20] [--config config.yaml]   (root)

The collector prints the spans (debug exporter) on its own output; the demo then shows the
receiver's self-metrics (localhost:8888) and stops both. Nothing in the Go server is changed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.gobuild import build_go_fixture  # noqa: E402

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def get(url: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def accepted_spans() -> float:
    try:
        with urllib.request.urlopen("http://localhost:8888/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith('otelcol_receiver_accepted_spans_total{receiver="ebpf_go"'):
                    return float(line.rsplit(" ", 1)[1])
    except OSError:
        pass
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--go", default="1.27")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("demo: run as root (eBPF uprobes need it): sudo make demo", file=sys.stderr)
        return 1
    print(f"demo: building the sample server with Go {args.go} ...", flush=True)
    binary = build_go_fixture("httpserver", args.go, "plain")
    server = subprocess.Popen([str(binary), "-addr", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OTEL_SERVICE_NAME": "demo-shop"})
    assert server.stdout is not None
    addr = server.stdout.readline().split()[1]
    print(f"demo: server pid {server.pid} on http://{addr}", flush=True)
    collector = subprocess.Popen([str(ROOT / ".venv/bin/otelgo-collector"), "--config", args.config], cwd=ROOT)
    try:
        # Wait until the receiver has attached to the server: its requests then become spans.
        base = f"http://{addr}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and accepted_spans() == 0:
            get(f"{base}/hello")
            time.sleep(0.5)
        print("demo: sending traffic", flush=True)
        for i in range(args.requests):
            get(f"{base}/hello")
            get(f"{base}/items/{i}")
            get(f"{base}/echo", "POST", body=b"hi")
            get(f"{base}/status/{500 + i % 4}")
        get(f"{base}/items/traced", headers={"traceparent": TRACEPARENT})
        time.sleep(3)  # batch timeout 1s, then the debug exporter prints
        with urllib.request.urlopen("http://localhost:8888/metrics", timeout=5) as r:
            metrics = [m for m in r.read().decode().splitlines() if m.startswith("otelgo_ebpf_")
                       or m.startswith("otelcol_receiver_accepted_spans_total")]
        print("demo: self-metrics\n  " + "\n  ".join(metrics), flush=True)
    finally:
        collector.send_signal(signal.SIGTERM)
        try:
            collector.wait(20)
        except subprocess.TimeoutExpired:
            collector.kill()
        server.kill()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
