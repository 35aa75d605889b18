"""Head sampling in the kernel (`receivers::ebpf_go::sampler`), end to end through the real CLI:
tests/fixtures/go/funcapp's /item handler (a server span, function spans for main.lookupItem and
the store's methods, an HTTP client call with the request's context) traced with each sampler type,
the downstream a Python server that keeps the `traceparent` each call carried (sk_msg inserts it).

What a user checks: the decision of every request is the one an SDK with the same sampler makes
(sampler.decide: the trace id's low 56 bits against the threshold, or the remote parent's flag in
the parentbased types); a sampled request gives its whole trace (server, function and client
spans) and an unsampled one no span at all, yet its `traceparent` still goes downstream, with the
same trace id and flags 00; the counts of sampled and unsampled spans per probe; and the answers
are those of the untraced program.
"""

from __future__ import annotations

import http.server
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from receiver.ebpf_go.sampler import SamplerConfig, decide
from tests.e2e.test_ebpf_database_sql import _read_spans, metric_values, wait_instrumented
from tests.e2e.test_function_spans import Downstream, FuncApp
from tests.support.collector import CollectorProcess, run_cli
from tests.support.gobuild import build_go_fixture

needs_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true", reason="needs root and eBPF")
pytestmark = [pytest.mark.timeout(300)]

ROOTS = 48            # requests without a traceparent
# requests with one: (trace id, flags); ids on both sides of the 0.5 threshold (byte 9 >= 0x80: R >= T)
REMOTE = [(bytes.fromhex(f"{i:02x}" * 9 + ("f0" if i % 2 else "10") + "00" * 6), flags)
          for i in range(1, 9) for flags in (0, 1)]


class Keeper(Downstream):
    """The downstream: answers as funcapp's store expects and keeps every traceparent it was sent."""

    seen: list[str] = []

    def do_GET(self) -> None:   # noqa: N802
        Keeper.seen.append(self.headers.get("traceparent", ""))
        super().do_GET()


@pytest.fixture
def keeper() -> Iterator[str]:
    Keeper.seen = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Keeper)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def _config(out: Path, binary: Path, pid: int, sampler: dict[str, Any]) -> dict[str, Any]:
    return {
        "receivers": {"ebpf_go": {
            "targets": [{"exe_path": str(binary), "pid": [pid]}], "sampler": sampler, "bpf_cache_dir": "",
            "functions": [{"symbol": "main.lookupItem"}, {"symbol": "example.com/funcapp/store.(*Store).*"}]}},
        "exporters": {"file": {"path": str(out), "flush_interval": "50ms"}},
        "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["file"]}}},
    }


def _get(app: FuncApp, path: str, traceparent: str | None) -> tuple[int, str]:
    import urllib.request
    req = urllib.request.Request(f"http://{app.addr}{path}", headers={"traceparent": traceparent} if traceparent else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read().decode()


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("sampler", [{"type": "parentbased_traceidratio", "ratio": 0.5},
                                     {"type": "traceidratio", "ratio": 0.5},
                                     {"type": "always_off"}], ids=lambda s: s["type"])
def test_head_sampling(sampler: dict[str, Any], keeper: str, tmp_path: Path) -> None:
    cfg = SamplerConfig.model_validate(sampler)
    binary = build_go_fixture("funcapp", "1.24", "plain")
    app = FuncApp(binary, keeper)
    out = tmp_path / "spans.jsonl"
    col = CollectorProcess(_config(out, binary, app.pid, sampler), tmp_path)
    try:
        wait_instrumented(col, app.pid, ("net_http_server", "functions", "net_http_client"))
        answers = [_get(app, f"/item?id={i}", None) for i in range(ROOTS)]
        answers += [_get(app, "/item?id=99", f"00-{tid.hex()}-00f067aa0ba902b7-{flags:02x}") for tid, flags in REMOTE]
        time.sleep(1.5)                       # the counters' next read
        metrics = metric_values(col.scrape())
    finally:
        code = col.stop()                     # spans the stitcher holds (parentless from a local peer) leave
        app.stop()
    spans = [s for _, _, s in _read_spans(out)]
    assert code == 0, col.log()[-3000:]
    assert answers == [(200, f"item at /item/{i}") for i in range(ROOTS)] + [(200, "item at /item/99")] * len(REMOTE)
    # what went downstream: one traceparent per request, in order, the remote ones with their trace ids
    sent = [tp.split("-") for tp in Keeper.seen]
    assert len(sent) == ROOTS + len(REMOTE) and all(len(p) == 4 and p[0] == "00" for p in sent), Keeper.seen
    assert [bytes.fromhex(p[1]) for p in sent[ROOTS:]] == [tid for tid, _ in REMOTE]
    expected = [decide(cfg, bytes.fromhex(p[1]), None) for p in sent[:ROOTS]]
    expected += [decide(cfg, tid, flags) for tid, flags in REMOTE]
    assert [int(p[3], 16) & 1 for p in sent] == [int(e) for e in expected], "the decisions are an SDK's"
    if cfg.type != "always_off":
        assert 0 < sum(expected[:ROOTS]) < ROOTS, "a ratio of 0.5 over 48 roots: both decisions seen"
    kept_requests = [bytes.fromhex(p[1]) for p, e in zip(sent, expected, strict=True) if e]
    kept = set(kept_requests)   # a remote trace id is sent twice (flags 00 and 01): both kept by traceidratio
    # a sampled request: its whole trace (server, lookupItem, Get, Put, client); an unsampled one: nothing
    by_trace: dict[bytes, list[str]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s.name)
    assert set(by_trace) == kept
    for tid, names in by_trace.items():
        whole = ["GET", "GET /item", "main.lookupItem", "store.(*Store).Get", "store.(*Store).Put"]
        assert sorted(names) == sorted(whole * kept_requests.count(tid)), (tid.hex(), names)
    n_kept, n_dropped = len(kept_requests), ROOTS + len(REMOTE) - len(kept_requests)
    for probe, per_request in (("net_http_server", 1), ("net_http_client", 1), ("functions", 3)):
        for decision, n in (("sampled", n_kept), ("unsampled", n_dropped)):
            key = ("otelgo_ebpf_sampler_spans_total", (("decision", decision), ("probe", probe)))
            assert metrics.get(key, 0.0) == n * per_request, (probe, decision, metrics.get(key))


def test_sampler_config_errors_are_one_line(tmp_path: Path) -> None:
    cases = [({"type": "traceidratio"}, "ebpf_go::sampler: ratio: traceidratio needs a ratio between 0 and 1"),
             ({"type": "always_on", "ratio": 0.5}, "ebpf_go::sampler: ratio: always_on takes no ratio"),
             ({"type": "parentbased_traceidratio", "ratio": 1.5}, "ebpf_go::sampler: ratio: 1.5 must be between 0 and 1"),
             ({"type": "sometimes"}, "ebpf_go::sampler::type: input should be")]
    for sampler, message in cases:
        cfg = tmp_path / "c.yaml"
        cfg.write_text("receivers:\n  ebpf_go:\n    sampler: " + repr(sampler).replace("'", '"') + "\n"
                       "exporters:\n  debug: {}\nservice:\n  pipelines:\n    traces:\n"
                       "      receivers: [ebpf_go]\n      exporters: [debug]\n")
        p = run_cli("validate", "--config", str(cfg))
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, (sampler, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_the_threshold_is_the_w3c_one() -> None:
    """T = 2^56 - round(ratio * 2^56) on the trace id's low 56 bits: ratio 1 keeps every id, 0 none,
    0.25 exactly those with R >= 0.75 * 2^56."""
    def tid(r: int) -> bytes:
        return b"\xaa" * 9 + r.to_bytes(7, "big")
    one = 1 << 56
    for ratio, r, sampled in [(1.0, 0, True), (0.0, one - 1, False), (0.25, 3 * one // 4, True),
                              (0.25, 3 * one // 4 - 1, False), (0.5, one // 2, True), (0.5, one // 2 - 1, False)]:
        cfg = SamplerConfig(type="traceidratio", ratio=ratio)
        assert decide(cfg, tid(r), None) is sampled, (ratio, r)
        assert decide(cfg, tid(r), 1) is sampled       # not parent-based: the parent's flag does not count
    pb = SamplerConfig(type="parentbased_traceidratio", ratio=0.0)
    assert decide(pb, tid(0), 1) and not decide(pb, tid(one - 1), 0) and not decide(pb, tid(one - 1), None)
    assert decide(SamplerConfig(type="parentbased_always_off"), tid(0), 1)
    assert not decide(SamplerConfig(type="parentbased_always_on"), tid(0), 0)
