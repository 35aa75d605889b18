"""The BPF loader end to end, through the real collector CLI: programs compiled in a child process
(never BCC or LLVM in the collector), images cached on disk (the second start compiles nothing),
a compile error leaves the collector running, and the uprobes are gone after shutdown.

Needs root and eBPF: marked `root`, skipped when not root unless CI=true.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from receiver.ebpf_go.gobinary import GoBinary
from tests.support.ci import needs_root
from tests.support.collector import CollectorProcess, wait_for
from tests.support.gobuild import build_go_fixture
from tests.support.goserver import Server
from tests.support.procmaps import bcc_or_llvm_mapped

pytestmark = [*needs_root(), pytest.mark.timeout(300)]

SYMBOL = "net/http.serverHandler.ServeHTTP"


def config(binary: Path, out: Path, **receiver: Any) -> dict[str, Any]:
    return {"receivers": {"ebpf_go": {"targets": [{"exe_path": str(binary)}], "discovery_interval": "100ms",
                                      "propagation": "sk_msg", **receiver}},
            "exporters": {"file": {"path": str(out)}},
            "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["file"]}}}}


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def run_collector(binary: Path, srv: Server, entry: int, tmp_path: Path, cache: Path, run: int) -> tuple[str, str]:
    """Start the collector, wait for spans of `srv`, stop it; (log, metrics scraped while running)."""
    out = tmp_path / f"out{run}.jsonl"
    col = CollectorProcess(config(binary, out, bpf_cache_dir=str(cache)), tmp_path)
    try:
        wait_for(lambda: f"tracing pid {srv.pid}" in col.log(), 60, "probes attached")
        assert srv.byte_at(entry) == 0xCC   # the entry uprobe is in the process's text

        def spans() -> bool:
            srv.get("/hello")
            return out.exists() and out.stat().st_size > 0
        wait_for(spans, 20, "spans")
        assert bcc_or_llvm_mapped(col.proc.pid) == []
        metrics = col.scrape()
    finally:
        assert col.stop() == 0
    return col.log(), metrics


def test_cache_hit_no_bcc_in_collector_and_detach(tmp_path: Path) -> None:
    binary = build_go_fixture("httpserver", "1.27", "plain")
    entry = GoBinary.open(str(binary)).entry_probe(SYMBOL).addr
    cache = tmp_path / "cache"
    srv = Server(binary)
    original = srv.byte_at(entry)
    assert original != 0xCC
    try:
        log, metrics = run_collector(binary, srv, entry, tmp_path, cache, 1)
        assert srv.byte_at(entry) == original, "uprobe left in the traced process after shutdown"
        assert re.search(r"net_http_server program for \S+ \(go1\.27[^)]*\): compiled in \d", log), log[-3000:]
        assert metric(metrics, "otelgo_ebpf_bpf_programs_total", origin="compiled") >= 1
        assert len(list(cache.glob("*.json"))) == 2   # the server probe (no net/http client in it), sk_msg
        assert "propagation mode sk_msg" in log

        log, metrics = run_collector(binary, srv, entry, tmp_path, cache, 2)
        assert srv.byte_at(entry) == original, "uprobe left in the traced process after shutdown"
        assert "net_http_server program for" in log and "loaded from the image cache" in log, log[-3000:]
        assert ": compiled in" not in log, log[-3000:]
        assert metric(metrics, "otelgo_ebpf_bpf_programs_total", origin="compiled") == 0
        assert metric(metrics, "otelgo_ebpf_bpf_programs_total", origin="disk") >= 1
    finally:
        srv.stop()


def test_compile_error_is_one_line_and_collector_keeps_running(tmp_path: Path) -> None:
    binary = build_go_fixture("httpserver", "1.27", "plain")
    headers = tmp_path / "headers"
    (headers / "include/linux").mkdir(parents=True)
    (headers / "include/linux/kconfig.h").write_text("#error otelgo test: broken kernel headers\n")
    srv = Server(binary)
    try:
        col = CollectorProcess(config(binary, tmp_path / "out.jsonl", kernel_headers=str(headers),
                                      bpf_cache_dir=str(tmp_path / "cache"), propagation="off"), tmp_path)
        try:
            wait_for(lambda: "probe off" in col.log() and "net_http_server" in col.log(), 60, "compile failure")
            time.sleep(0.5)
            assert col.proc.poll() is None
            metrics = col.scrape()                     # still serving
            assert metric(metrics, "otelgo_ebpf_bpf_programs_total", origin="error") >= 1
            assert bcc_or_llvm_mapped(col.proc.pid) == []
        finally:
            assert col.stop() == 0
        lines = [ln for ln in col.log().splitlines() if "net_http_server probe off" in ln]
        assert lines, col.log()[-3000:]
        assert "BPF compile of nethttp_server.c failed:" in lines[0] and "error:" in lines[0], lines[0]
        assert not list((tmp_path / "cache").glob("*.json"))
    finally:
        srv.stop()
