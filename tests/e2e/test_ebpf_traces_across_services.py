"""Traces across services through the real CLI: three Go services A -> B -> C over HTTP/1.1
(tests/fixtures/go/httpchain), all traced by one `otelgo-collector` with the file exporter.

One module-scoped collector per propagation mode (`auto`, `sk_msg`, `stitch`, and `probe_write`,
which this locked-down kernel refuses: it falls back to sk_msg), and a fresh chain
of processes per collector (so that no keep-alive connection outlives the sock_ops program that
put it into the sockhash). Each request to A carries an id in its URL path (`/chain/<id>`), which
every hop passes on: that is how the test finds the five spans a request caused and checks that
no span joined another request's trace. The services run with `-capture`: each records the exact
bytes its HTTP client wrote to every connection and the exact bytes its server read, so a test
compares, per hop and per request, what B (C) received with what A (B) sent.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.root

if os.geteuid() != 0 and os.environ.get("CI") != "true":
    pytest.skip("needs root and eBPF (never skipped under CI=true)", allow_module_level=True)

from collector.spans import KIND_CLIENT, KIND_SERVER, Span, from_json_dict  # noqa: E402
from receiver.ebpf_go import hostfs  # noqa: E402
from tests.support.collector import CollectorProcess, json_lines  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402
from tests.support.httpchain import Chain  # noqa: E402

# probe_write: this kernel refuses bpf_probe_write_user (lockdown), so it falls back to sk_msg
MODES = ["auto", "sk_msg", "stitch", "probe_write"]


def refused() -> str:
    """The collector mounts securityfs at start (in this mount namespace too), so it names the mode."""
    mode = hostfs.read_lockdown()
    why = f"kernel lockdown is {mode}" if mode not in (None, "none") else "kernel lockdown likely"
    return ("the kernel refuses bpf_probe_write_user (verifier: program of this type cannot use helper "
            f"bpf_probe_write_user#36); {why}")


ID = re.compile(r"/chain/([A-Za-z0-9_-]+)")


class Traced:
    """The collector, the chain it traces, and the spans it wrote."""

    def __init__(self, mode: str, workdir: Path) -> None:
        self.mode = mode
        self.out = workdir / "spans.jsonl"
        # A private copy of the fixture: its path selects exactly this chain's processes.
        self.binary = workdir / "httpchain"
        shutil.copy(build_go_fixture("httpchain", "1.26"), self.binary)
        cfg: dict[str, Any] = {
            "receivers": {"ebpf_go": {"targets": [{"exe_path": str(self.binary)}], "propagation": mode,
                                      "discovery_interval": "200ms",
                                      "instrumentations": {"database_sql": False}}},
            "exporters": {"file": {"path": str(self.out), "flush_interval": "100ms"}},
            "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "exporters": ["file"]}}}}
        self.col = CollectorProcess(cfg, workdir)
        (workdir / "bytes").mkdir()
        self.chain = Chain(workdir / "bytes")
        try:
            self.chain.start(self.binary)
            self.wait_metric("otelgo_ebpf_processes_instrumented", 3, timeout=90)
        except Exception:
            self.close()
            raise
        self._lines = 0
        self._by_id: dict[str, list[tuple[str, Span]]] = {}

    def close(self) -> None:
        self.chain.stop()
        rc = self.col.stop()
        assert rc == 0, self.col.log()[-3000:]

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in self.col.scrape().splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                out[k] = float(v)
        return out

    def metric(self, name: str, **labels: str) -> float:
        total = 0.0
        for k, v in self.metrics().items():
            base, _, rest = k.partition("{")
            if base == name and all(f'{lk}="{lv}"' in rest for lk, lv in labels.items()):
                total += v
        return total

    def wait_metric(self, name: str, value: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric(name) >= value:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{name} < {value} after {timeout}s:\n{self.col.log()[-3000:]}")

    def _read(self) -> None:
        """Index the new lines of the file exporter's output by request id."""
        docs = json_lines(self.out, skip=self._lines)
        roles = self.chain.role_of_pid
        for doc in docs:
            for rs, _, span in from_json_dict(doc).iter_spans():
                a = span.attributes
                m = ID.search(str(a.get("url.path") or a.get("url.full") or ""))
                if m is None:
                    continue
                role = roles.get(int(rs.resource.attributes.get("process.pid", 0)), "?")
                side = "server" if span.kind == KIND_SERVER else "client" if span.kind == KIND_CLIENT else "?"
                self._by_id.setdefault(m.group(1), []).append((f"{role} {side}", span))
        self._lines += len(docs)

    def traces(self, ids: list[str], timeout: float = 30) -> dict[str, dict[str, Span]]:
        """Wait until every id has its five spans (and one window more for strays); by id, role -> span."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read()
            if all(len(self._by_id.get(i, ())) >= 5 for i in ids):
                break
            time.sleep(0.3)
        time.sleep(0.5)
        self._read()
        out = {}
        for i in ids:
            got = self._by_id.get(i, [])
            roles = [r for r, _ in got]
            assert sorted(roles) == sorted(ROLES), f"request {i}: spans {roles} ({self.mode})"
            out[i] = dict(got)
        return out


ROLES = ["A server", "A client", "B server", "B client", "C server"]


def check_trace(spans: dict[str, Span], rid: str, all_spans_by_trace: dict[bytes, int] | None = None,
                upstream: tuple[bytes, bytes] | None = None) -> None:
    """Five spans, one trace id, parents A server <- A client <- B server <- B client <- C server."""
    a_srv = spans["A server"]
    trace = a_srv.trace_id
    assert {s.trace_id for s in spans.values()} == {trace}, (rid, {r: s.trace_id.hex() for r, s in spans.items()})
    if upstream is None:
        assert a_srv.parent_span_id == b"", rid
    else:
        assert (trace, a_srv.parent_span_id) == upstream, rid
    chain = ["A server", "A client", "B server", "B client", "C server"]
    for parent, child in zip(chain, chain[1:], strict=False):
        assert spans[child].parent_span_id == spans[parent].span_id, (rid, child, parent)
    if all_spans_by_trace is not None:
        assert all_spans_by_trace[trace] == 5, (rid, all_spans_by_trace[trace])


@pytest.fixture(scope="module", params=MODES)
def traced(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    t = Traced(request.param, tmp_path_factory.mktemp(f"chain-{request.param}"))
    yield t
    t.close()


def expected_mode(t: Traced) -> str:
    return "stitch" if t.mode == "stitch" else "sk_msg"  # auto, probe_write: sk_msg on these machines


def test_mode_chosen_and_reported(traced: Traced) -> None:
    mode = expected_mode(traced)
    assert traced.metric("otelgo_ebpf_propagation_mode", mode=mode) == 1
    for other in ("probe_write", "sk_msg", "stitch", "off"):
        if other != mode:
            assert traced.metric("otelgo_ebpf_propagation_mode", mode=other) == 0
    log = traced.col.log()
    assert f"propagation mode {mode} (requested {traced.mode})" in log
    fallback = f"propagation: probe_write unavailable, {refused()}: falling back to sk_msg"
    assert log.count(fallback) == (1 if traced.mode == "probe_write" else 0), log[-3000:]
    if traced.mode == "probe_write":  # the test load's refusal is in the mode line
        assert "propagation mode sk_msg (requested probe_write): sock_ops on " in log
        assert f"[probe_write: {refused()}]" in log
    if traced.mode == "auto":  # sk_msg comes first in auto: probe_write is not even test-loaded
        assert "propagation mode sk_msg (requested auto): sock_ops on " in log
        assert "[probe_write:" not in log


def test_each_request_gives_one_trace_of_five_spans(traced: Traced) -> None:
    injected0 = traced.metric("otelgo_ebpf_propagation_injected_total")
    joined0 = traced.metric("otelgo_ebpf_stitch_total", outcome="joined")
    ids = [f"seq{i}" for i in range(5)]
    for i in ids:
        body = traced.chain.get(i)
        # what B and C received: a traceparent only when sk_msg inserted one
        tps = re.findall(rb"[BC] tp=(\S*)", body)
        assert len(tps) == 2 and all(tps) == (expected_mode(traced) == "sk_msg"), body
    got = traced.traces(ids)
    for i in ids:
        check_trace(got[i], i)
    traced.wait_metric("otelgo_ebpf_propagation_injected_total", injected0 + (10 if expected_mode(traced) ==
                                                                             "sk_msg" else 0), timeout=5)
    injected = traced.metric("otelgo_ebpf_propagation_injected_total") - injected0
    joined = traced.metric("otelgo_ebpf_stitch_total", outcome="joined") - joined0
    if expected_mode(traced) == "sk_msg":
        assert (injected, joined) == (10, 0)   # both hops injected: nothing left to stitch
        assert traced.metric("otelgo_ebpf_propagation_skipped_total") == 0
    else:
        assert (injected, joined) == (0, 10)


def test_uninstrumented_upstream_traceparent_continues(traced: Traced) -> None:
    trace, parent = os.urandom(16), os.urandom(8)
    tp = f"00-{trace.hex()}-{parent.hex()}-01"
    traced.chain.get("upstream", {"traceparent": tp})
    got = traced.traces(["upstream"])
    check_trace(got["upstream"], "upstream", upstream=(trace, parent))


def test_keepalive_and_100_concurrent(traced: Traced) -> None:
    ids = [f"c{i}" for i in range(100)]
    with concurrent.futures.ThreadPoolExecutor(100) as ex:
        list(ex.map(traced.chain.get, ids))
    conn = http.client.HTTPConnection("127.0.0.1", traced.chain.ports["A"], timeout=20)
    for k in range(5):  # one keep-alive connection from the upstream too
        conn.request("GET", f"/chain/ka{k}")
        assert conn.getresponse().read().startswith(b"A tp=")
        ids.append(f"ka{k}")
    conn.close()
    got = traced.traces(ids)
    by_trace: dict[bytes, int] = {}
    for spans in got.values():
        for s in spans.values():
            by_trace[s.trace_id] = by_trace.get(s.trace_id, 0) + 1
    for i in ids:
        check_trace(got[i], i, by_trace)


def test_1000_requests_concurrency_20_no_wrong_join(traced: Traced) -> None:
    ids = [f"k{i}" for i in range(1000)]
    counts0 = {o: traced.metric("otelgo_ebpf_stitch_total", outcome=o) for o in ("joined", "unmatched", "evicted")}
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(20) as ex:
        list(ex.map(traced.chain.get, ids))
    took = time.monotonic() - t0
    got = traced.traces(ids, timeout=60)
    by_trace: dict[bytes, int] = {}
    for spans in got.values():
        for s in spans.values():
            by_trace[s.trace_id] = by_trace.get(s.trace_id, 0) + 1
    wrong = [i for i in ids if not _ok(got[i], i, by_trace)]
    counts = {o: traced.metric("otelgo_ebpf_stitch_total", outcome=o) - counts0[o] for o in counts0}
    print(f"mode {traced.mode}: 1000 requests at concurrency 20 in {took:.1f}s; stitch outcomes {counts}; "
          f"wrong or incomplete traces {len(wrong)}; injected "
          f"{traced.metric('otelgo_ebpf_propagation_injected_total'):.0f}, skipped "
          f"{traced.metric('otelgo_ebpf_propagation_skipped_total'):.0f}")
    assert wrong == []
    # 2 local hops per request; A's server span (local upstream, no traceparent) waits and stays unmatched.
    if expected_mode(traced) == "stitch":
        assert counts == {"joined": 2000, "unmatched": 1000, "evicted": 0}
    else:
        assert counts == {"joined": 0, "unmatched": 1000, "evicted": 0}


def _ok(spans: dict[str, Span], rid: str, by_trace: dict[bytes, int]) -> bool:
    try:
        check_trace(spans, rid, by_trace)
        return True
    except AssertionError:
        return False


def test_skipped_injection_falls_back_to_stitch(traced: Traced) -> None:
    """Headers over Go's 4 KiB bufio buffer: sk_msg leaves both hops unchanged (split_request);
    the stitcher joins them, so the trace is whole in every mode."""
    skipped0 = traced.metric("otelgo_ebpf_propagation_skipped_total", reason="split_request")
    joined0 = traced.metric("otelgo_ebpf_stitch_total", outcome="joined")
    body = traced.chain.get("big?pad=5000")
    assert re.findall(rb"[BC] tp=(\S*)", body) == [b"", b""], body  # nothing inserted
    got = traced.traces(["big"])
    check_trace(got["big"], "big")
    assert traced.metric("otelgo_ebpf_stitch_total", outcome="joined") - joined0 == 2
    if expected_mode(traced) == "sk_msg":
        traced.wait_metric("otelgo_ebpf_propagation_skipped_total", skipped0 + 2, timeout=5)


# ---------------------------------------------------------------- the bytes on the wire, per hop


def split_requests(stream: bytes) -> tuple[list[bytes], bytes]:
    """The HTTP/1.1 requests of one connection's byte stream, each exactly as on the wire (head,
    then the body by Content-Length or chunked encoding, no trailers), and what follows the last
    complete one."""
    out: list[bytes] = []
    i = 0
    while (end := stream.find(b"\r\n\r\n", i)) >= 0:
        j = end + 4
        head = stream[i:j].lower()
        if b"\r\ntransfer-encoding: chunked\r\n" in head:
            while True:
                eol = stream.find(b"\r\n", j)
                if eol < 0:
                    return out, stream[i:]
                size = int(stream[j:eol].split(b";")[0], 16)
                j = eol + 2 + size + 2          # the chunk, its CRLF; after "0\r\n" the final CRLF
                if j > len(stream):
                    return out, stream[i:]
                assert stream[j - 2:j] == b"\r\n", stream[i:j][-200:]
                if size == 0:
                    break
        else:
            m = re.search(rb"\r\ncontent-length: *(\d+)\r\n", head)
            j += int(m.group(1)) if m else 0
            if j > len(stream):
                return out, stream[i:]
        out.append(stream[i:j])
        i = j
    return out, stream[i:]


def test_split_requests() -> None:
    get = b"GET /chain/a HTTP/1.1\r\nHost: h\r\n\r\n"
    post = b"POST /chain/b HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz"
    chunked = b"POST /chain/c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n"
    assert split_requests(get + post + chunked + get[:10]) == ([get, post, chunked], get[:10])
    assert split_requests(chunked[:-1]) == ([], chunked[:-1])


@dataclass
class Wire:
    conn: str    # "<client address>-<server address>" of the TCP connection
    data: bytes  # one request, exactly as recorded


def wire_requests(capture: Path, service: str, kind: str) -> dict[str, list[Wire]]:
    """Request id -> the requests carrying it in the byte streams `service` recorded (`kind`:
    "sent" by its client, "recv" by its server). Every stream must be whole requests only."""
    out: dict[str, list[Wire]] = {}
    for f in sorted(capture.glob(f"{service}-{kind}-*.bin")):
        conn = f.name[len(f"{service}-{kind}-"):-len(".bin")]
        reqs, rest = split_requests(f.read_bytes())
        assert rest == b"", (f.name, rest[:300])
        for r in reqs:
            m = ID.search(r[:r.index(b"\r\n")].decode())
            if m is not None:
                out.setdefault(m.group(1), []).append(Wire(conn, r))
    return out


# request id -> query: plain GETs, a chunked POST, headers near the 4 KiB bufio buffer, and headers
# over it (sk_msg leaves those unchanged: split_request)
WIRE_CASES = {"wire0": "", "wire1": "", "wirechunked": "?body=chunked", "wirepad": "?pad=3900",
              "wirebig": "?pad=5000"}


def test_each_hop_receives_exactly_the_bytes_sent_plus_one_traceparent_line(traced: Traced) -> None:
    """Per hop (A -> B, B -> C) and per request: the bytes the server read are the bytes the client
    wrote, with exactly one `traceparent: 00-<trace>-<client span>-01` line inserted after the
    request line when sk_msg propagates (auto, sk_msg), and byte for byte the same otherwise
    (stitch; and headers over 4 KiB, which sk_msg leaves alone)."""
    for rid, query in WIRE_CASES.items():
        traced.chain.get(rid + query)
    got = traced.traces(list(WIRE_CASES))
    inserted = 0
    for client, server in (("A", "B"), ("B", "C")):
        sent = wire_requests(traced.chain.capture, client, "sent")
        recv = wire_requests(traced.chain.capture, server, "recv")
        for rid, query in WIRE_CASES.items():
            (s,) = sent[rid]
            (r,) = recv[rid]
            assert s.conn == r.conn, (rid, client, server)   # the same TCP connection
            assert b"traceparent" not in s.data.lower(), (rid, client)
            assert s.data.startswith(f"{'POST' if 'chunked' in query else 'GET'} /chain/{rid}{query} "
                                     "HTTP/1.1\r\n".encode()), s.data[:100]
            span = got[rid][f"{client} client"]
            if expected_mode(traced) == "sk_msg" and "pad=5000" not in query:
                line = f"traceparent: 00-{span.trace_id.hex()}-{span.span_id.hex()}-01\r\n".encode()
                k = s.data.index(b"\r\n") + 2
                assert r.data == s.data[:k] + line + s.data[k:], (rid, client, server, r.data[:300])
                inserted += 1
            else:
                assert r.data == s.data, (rid, client, server, r.data[:300], s.data[:300])
    assert inserted == (8 if expected_mode(traced) == "sk_msg" else 0)
