"""Propagation end to end with real Go programs (tests/fixtures/go/httpchain).

Until the ebpf_go receiver runs server spans in the collector, these tests drive the pieces
directly: the sk_msg propagation (receiver/ebpf_go/propagation/skmsg.py) plus the client probe
(bpf/nethttp_client.c) attached to service A, whose downstream is a raw TCP server recording the
exact bytes it receives.
"""

from __future__ import annotations

import concurrent.futures
import ctypes as ct
import os
import re
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.root

if os.geteuid() != 0 and os.environ.get("CI") != "true":
    pytest.skip("needs root and eBPF (never skipped under CI=true)", allow_module_level=True)

from receiver.ebpf_go.bpfprogram import release_bpf  # noqa: E402
from receiver.ebpf_go.gobinary import GoBinary  # noqa: E402
from receiver.ebpf_go.probes import nethttp_client as nc  # noqa: E402
from receiver.ebpf_go.propagation.skmsg import SkMsgPropagation  # noqa: E402
from tests.support.bpffs import make_pin_dir  # noqa: E402
from tests.support.collector import free_port, wait_for_port  # noqa: E402
from tests.support.gobuild import build_go_fixture  # noqa: E402

TP_LINE = re.compile(rb"\r\ntraceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-01\r\n")


class RawHTTP:
    """An HTTP/1.1 server that records each request's raw bytes and answers 200 "ok"."""

    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(512)
        self.port = self.srv.getsockname()[1]
        self.requests: list[bytes] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c: socket.socket) -> None:
        buf = b""
        with c:
            while True:
                while b"\r\n\r\n" not in buf:
                    d = c.recv(65536)
                    if not d:
                        return
                    buf += d
                head, _, rest = buf.partition(b"\r\n\r\n")
                if b"transfer-encoding: chunked" in head.lower():
                    while b"0\r\n\r\n" not in rest:
                        rest += c.recv(65536)
                    i = rest.index(b"0\r\n\r\n") + 5
                    body, buf = rest[:i], rest[i:]
                else:
                    body, buf = b"", rest
                with self.lock:
                    self.requests.append(head + b"\r\n\r\n" + body)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.srv.close()


class Traced:
    """Service A (httpchain) -> RawHTTP, with sk_msg propagation and the client probe on A."""

    def __init__(self, skmsg: SkMsgPropagation, next_url: str | None = None, extra: tuple[str, ...] = ()) -> None:
        path = str(build_go_fixture("httpchain", "1.26"))
        gb = GoBinary.open(path)
        self.raw = RawHTTP()
        self.port = free_port()
        nxt = next_url or f"http://127.0.0.1:{self.raw.port}/chain"
        self.proc = subprocess.Popen([path, "-name", "A", "-listen", f"127.0.0.1:{self.port}", "-next", nxt, *extra],
                                     stderr=subprocess.DEVNULL)
        self.skmsg = skmsg
        skmsg.watch(self.proc.pid)   # as the receiver does for a traced process: its connections join the sockhash
        wait_for_port(self.port, proc=self.proc)
        from bcc import BPF
        self.bpf = BPF(src_file=str(nc.BPF_SOURCE).encode(),
                       cflags=[*nc.cflags(gb, skmsg=True, pin_dir=skmsg.pin_dir), f"-I{nc.BPF_SOURCE.parent}"])
        nc.attach(self.bpf, gb, path, self.proc.pid)
        self.events: list[nc.ClientEvent] = []
        self.bpf[b"events"].open_ring_buffer(self._cb)

    def _cb(self, _ctx: Any, data: Any, size: int) -> None:
        self.events.append(nc.decode(ct.string_at(data, size)))

    def get(self, query: str = "") -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/chain{query}", timeout=10) as r:
            return bytes(r.read())

    def drain(self) -> list[nc.ClientEvent]:
        time.sleep(0.1)
        self.bpf.ring_buffer_consume()
        return self.events

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.skmsg.unwatch(self.proc.pid)
        release_bpf(self.bpf)
        self.raw.close()


@pytest.fixture(scope="module")
def skmsg() -> Iterator[SkMsgPropagation]:
    p = SkMsgPropagation(pin_dir="/sys/fs/bpf/otelgo_test_e2e")
    p.start()
    yield p
    p.stop()


@pytest.fixture
def traced(skmsg: SkMsgPropagation) -> Iterator[Traced]:
    t = Traced(skmsg)
    yield t
    t.close()


def check_injected(raw: bytes, ev: nc.ClientEvent) -> None:
    m = TP_LINE.search(raw)
    assert m, raw[:200]
    assert m.group(1) == ev.trace_id.hex().encode() and m.group(2) == ev.span_id.hex().encode()
    assert len(TP_LINE.findall(raw)) == 1


def unmodified(raw: bytes) -> bytes:
    return TP_LINE.sub(b"\r\n", raw, count=1)


@pytest.mark.parametrize("query", ["", "?pad=3900", "?body=chunked"])
def test_client_request_gets_exactly_one_traceparent_line(traced: Traced, query: str) -> None:
    traced.get(query)
    (ev,) = traced.drain()
    (raw,) = traced.raw.requests
    check_injected(raw, ev)
    assert ev.propagation == "injected" and ev.write_seen and ev.local_port > 0
    expected_line = f"{'POST' if 'chunked' in query else 'GET'} /chain{query} HTTP/1.1\r\n".encode()
    assert raw.startswith(expected_line)
    # the rest is what Go wrote: the same request without the line parses and has the right length
    rest = unmodified(raw)
    assert b"traceparent" not in rest.lower()
    if "chunked" in query:
        assert rest.endswith(b"0\r\n\r\n") and b"x" * 3000 in rest.replace(b"\r\n", b"")


def test_keepalive_and_100_concurrent(traced: Traced) -> None:
    with concurrent.futures.ThreadPoolExecutor(100) as ex:
        list(ex.map(lambda _: traced.get(), range(100)))
    for _ in range(3):
        traced.get()  # keep-alive reuse
    evs = traced.drain()
    assert len(evs) == 103 and len(traced.raw.requests) == 103
    by_span = {e.span_id.hex().encode(): e for e in evs}
    for raw in traced.raw.requests:
        m = TP_LINE.search(raw)
        assert m and m.group(2) in by_span
        assert by_span[m.group(2)].trace_id.hex().encode() == m.group(1)
    assert all(e.propagation == "injected" for e in evs)
    other = sum(1 for e in evs if not e.same_thread)
    print(f"same-thread mismatches: {other}/{len(evs)}")


def test_headers_over_bufio_buffer_left_alone(traced: Traced) -> None:
    traced.get("?pad=5000")
    (ev,) = traced.drain()
    (raw,) = traced.raw.requests
    assert b"traceparent" not in raw.lower() and ev.propagation == "split_request"


def test_existing_traceparent_not_duplicated(traced: Traced) -> None:
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    req = urllib.request.Request(f"http://127.0.0.1:{traced.port}/chain?fwd_tp=1", headers={"traceparent": tp})
    urllib.request.urlopen(req, timeout=10).read()
    (ev,) = traced.drain()
    (raw,) = traced.raw.requests
    assert raw.lower().count(b"traceparent") == 1 and tp.encode() in raw
    assert ev.propagation == "existing_traceparent"


def test_http2_tls_span_without_injection(skmsg: SkMsgPropagation) -> None:
    path = str(build_go_fixture("httpchain", "1.26"))
    tport = free_port()
    tls = subprocess.Popen([path, "-name", "T", "-listen", f"127.0.0.1:{tport}", "-tls"], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(tport, proc=tls)
        t = Traced(skmsg, next_url=f"https://127.0.0.1:{tport}/chain", extra=("-insecure",))
        try:
            assert b"T tp=" in t.get()
            (ev,) = t.drain()
            assert ev.proto_major == 2 and ev.status == 200
            assert not ev.write_seen and ev.propagation == "not_seen"  # counted as not propagated
            span = nc.to_span(ev, 0)
            assert span.attributes["network.protocol.version"] == "2"
            assert span.attributes["url.full"] == f"https://127.0.0.1:{tport}/chain"
        finally:
            t.close()
    finally:
        tls.kill()
        tls.wait()


def test_injection_overhead(skmsg: SkMsgPropagation) -> None:
    """Per-request cost of the client probes + sk_msg insertion, sequential keep-alive requests."""
    path = str(build_go_fixture("httpchain", "1.26"))
    raw = RawHTTP()
    port = free_port()
    proc = subprocess.Popen([path, "-listen", f"127.0.0.1:{port}", "-next", f"http://127.0.0.1:{raw.port}/chain"],
                            stderr=subprocess.DEVNULL)
    # Watched from the start: the keep-alive connection the untraced rounds open is the one the traced
    # rounds use (only a watched process's new connections join the sockhash).
    skmsg.watch(proc.pid)
    t = None
    try:
        wait_for_port(port, proc=proc)

        def run(n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/chain", timeout=10) as r:
                    r.read()
            return (time.perf_counter() - t0) / n
        run(50)
        base = min(run(300) for _ in range(3))
        t = Traced.__new__(Traced)
        from bcc import BPF
        gb = GoBinary.open(path)
        t.bpf = BPF(src_file=str(nc.BPF_SOURCE).encode(),
                    cflags=[*nc.cflags(gb, skmsg=True, pin_dir=skmsg.pin_dir), f"-I{nc.BPF_SOURCE.parent}"])
        nc.attach(t.bpf, gb, path, proc.pid)
        run(50)
        traced = min(run(300) for _ in range(3))
        print(f"per request: untraced {base * 1e6:.0f} us, traced+injected {traced * 1e6:.0f} us, "
              f"added {(traced - base) * 1e6:.1f} us")
        assert any(TP_LINE.search(r) for r in raw.requests[-10:])
    finally:
        if t is not None and getattr(t, "bpf", None) is not None:
            release_bpf(t.bpf)
        proc.kill()
        proc.wait()
        skmsg.unwatch(proc.pid)
        raw.close()


# ---------------------------------------------------------------- probe_write: the writer program
#
# This kernel refuses bpf_probe_write_user (integrity lockdown), so the writer never runs here.
# What can be shown: it compiles and calls helper 36 (and no other mode's program does); this
# kernel refuses exactly that program; with each write turned into a read of the same address
# (PW_VERIFY_ONLY, tests only) the whole program passes this kernel's verifier, and, attached to a
# real Go client, takes the decisions it would take (outcome per span) while writing nothing.

PW_PIN = "/sys/fs/bpf/otelgo_test_pw"


def _calls(code: bytes) -> set[int]:
    """Helper ids called by a program's bytecode (BPF_JMP|BPF_CALL with src_reg 0)."""
    out = set()
    for i in range(0, len(code), 8):
        op, regs, _off, imm = struct.unpack_from("<BBhi", code, i)
        if op == 0x85 and regs >> 4 == 0:
            out.add(imm)
    return out


@pytest.fixture
def pw_pin() -> Iterator[str]:
    make_pin_dir(os.path.basename(PW_PIN))
    yield PW_PIN
    for f in os.listdir(PW_PIN):
        os.unlink(os.path.join(PW_PIN, f))
    os.rmdir(PW_PIN)


def _compile(gb: GoBinary, pin: str, *extra: str, **kw: Any) -> Any:
    from bcc import BPF
    return BPF(src_file=str(nc.BPF_SOURCE).encode(),
               cflags=[*nc.cflags(gb, pin_dir=pin, **kw), *extra, f"-I{nc.BPF_SOURCE.parent}"])


@pytest.mark.parametrize("go", ["1.26", "1.23"])  # swiss maps, classic maps
def test_writer_compiles_calls_helper_36_and_only_in_probe_write_mode(pw_pin: str, go: str) -> None:
    gb = GoBinary.open(str(build_go_fixture("httpchain", go)))
    b = _compile(gb, pw_pin, skmsg=False, probe_write=True)
    try:
        assert 36 in _calls(b.dump_func(b"uprobe_client_writeSubset"))
        assert 36 not in _calls(b.dump_func(b"uprobe_client_Request_write"))
    finally:
        release_bpf(b)
    for skmsg in (True, False):  # the sk_msg and stitch/off builds: no writer, no helper 36 anywhere
        b = _compile(gb, pw_pin, skmsg=skmsg)
        try:
            with pytest.raises(Exception, match="Unknown program"):
                b.dump_func(b"uprobe_client_writeSubset")
            for fn in (b"uprobe_client_roundTrip", b"uprobe_client_Request_write", b"uprobe_client_roundTrip_return"):
                assert 36 not in _calls(b.dump_func(fn))
        finally:
            release_bpf(b)


def test_this_kernel_refuses_the_writer_but_verifies_the_rest(pw_pin: str) -> None:
    from bcc import BPF
    gb = GoBinary.open(str(build_go_fixture("httpchain", "1.26")))
    b = _compile(gb, pw_pin, skmsg=False, probe_write=True)
    try:
        with pytest.raises(Exception, match="uprobe_client_writeSubset"):
            b.load_func(b"uprobe_client_writeSubset", BPF.KPROBE)
    finally:
        release_bpf(b)
    b = _compile(gb, pw_pin, "-DPW_VERIFY_ONLY", skmsg=False, probe_write=True)
    try:
        assert 36 not in _calls(b.dump_func(b"uprobe_client_writeSubset"))
        assert b.load_func(b"uprobe_client_writeSubset", BPF.KPROBE).fd >= 0
    finally:
        release_bpf(b)


def test_writer_dry_run_decides_on_a_real_go_client(pw_pin: str) -> None:
    """PW_VERIFY_ONLY attached to service A (-> RawHTTP): the outcome of each request is the one the
    writer would reach, and the request goes out unchanged (a dry run writes nothing)."""
    path = str(build_go_fixture("httpchain", "1.26"))
    gb = GoBinary.open(path)
    raw = RawHTTP()
    port = free_port()
    proc = subprocess.Popen([path, "-name", "A", "-listen", f"127.0.0.1:{port}", "-next",
                             f"http://127.0.0.1:{raw.port}/chain"], stderr=subprocess.DEVNULL)
    b = None
    try:
        wait_for_port(port, proc=proc)
        b = _compile(gb, pw_pin, "-DPW_VERIFY_ONLY", skmsg=False, probe_write=True)
        done = nc.attach(b, gb, path, proc.pid, probe_write=True)
        assert any(fn == "uprobe_client_writeSubset" for _, fn in done), done
        events: list[nc.ClientEvent] = []
        b[b"events"].open_ring_buffer(lambda _c, d, n: events.append(nc.decode(ct.string_at(d, n))))

        def get(query: str, headers: dict[str, str] | None = None) -> nc.ClientEvent:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/chain{query}", headers=headers or {})
            urllib.request.urlopen(req, timeout=10).read()
            time.sleep(0.1)
            b.ring_buffer_consume()
            (ev,) = events
            events.clear()
            return ev

        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        # request line + Host + User-Agent = 4060 bytes: 36 of the 4 KiB buffer left at writeSubset
        long_query = "?x=" + "q" * (3986 - len(str(raw.port)))
        cases = [("", None, "injected"), ("?pad=5000", None, "injected"), ("?body=chunked", None, "injected"),
                 ("?fwd_tp=1", {"traceparent": tp}, "existing_traceparent"), (long_query, None, "no_room")]
        for query, headers, want in cases:
            ev = get(query, headers)
            assert (ev.propagation, ev.write_seen) == (want, True), (query[:20], ev.propagation)
        # dry run: nothing was written, each request is exactly what Go produced
        assert len(raw.requests) == len(cases)
        assert [r.lower().count(b"traceparent") for r in raw.requests] == [0, 0, 0, 1, 0]
        line_end = raw.requests[4].index(b"\r\n") + 2
        assert raw.requests[4][:line_end] == f"GET /chain{long_query} HTTP/1.1\r\n".encode()
        head = raw.requests[4][:raw.requests[4].index(b"\r\n\r\n") + 4]
        free = 4096 - (len(head) - len(b"Accept-Encoding: gzip\r\n\r\n"))  # what writeSubset found free
        assert 0 <= free < 70, free
        # 20 concurrent requests: each one decided on its own connection's writer
        with concurrent.futures.ThreadPoolExecutor(20) as ex:
            list(ex.map(lambda _: urllib.request.urlopen(f"http://127.0.0.1:{port}/chain", timeout=10).read(),
                        range(20)))
        time.sleep(0.2)
        b.ring_buffer_consume()
        assert sorted(e.propagation for e in events) == ["injected"] * 20
    finally:
        proc.kill()
        proc.wait()
        if b is not None:
            release_bpf(b)
        raw.close()


def test_receiver_in_probe_write_mode_compiles_attaches_and_counts_the_writer(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """The receiver's probe_write wiring, as far as this kernel lets it run: with the kernel check
    answered "allowed" and the writer built as a dry run (PW_VERIFY_ONLY), the receiver picks
    probe_write, compiles the client probe with the writer, hooks writeSubset, counts the writer's
    outcomes per request in the propagation metrics, and keeps the stitcher as the fallback."""
    from collector.component import ComponentID
    from collector.telemetry import ComponentTelemetry, SelfMetrics
    from receiver.ebpf_go import propagation
    from receiver.ebpf_go.config import EbpfGoConfig
    from receiver.ebpf_go.propagation import probe_write
    from receiver.ebpf_go.receiver import factory
    from tests.e2e.test_ebpf_http_server import Collect
    from tests.support.collector import wait_for

    allowed = probe_write.Capability(True, "allowed (test)")
    real_choose, real_cflags = propagation.choose, nc.PROBE.cflags
    monkeypatch.setattr(propagation, "choose",
                        lambda *a, **kw: real_choose(*a, **{**kw, "probe_write_check": lambda: allowed}))
    monkeypatch.setattr(nc.PROBE, "cflags", lambda gb, build: [*real_cflags(gb, build)]
                        + (["-DPW_VERIFY_ONLY"] if build.probe_write else []))
    path = str(build_go_fixture("httpchain", "1.26"))
    raw = RawHTTP()
    port = free_port()
    proc = subprocess.Popen([path, "-name", "A", "-listen", f"127.0.0.1:{port}", "-next",
                             f"http://127.0.0.1:{raw.port}/chain"], stderr=subprocess.DEVNULL)
    metrics = SelfMetrics()
    sink = Collect()
    cfg = EbpfGoConfig.model_validate({"discovery_interval": "100ms", "targets": [{"pid": proc.pid}],
                                       "propagation": "probe_write", "bpf_cache_dir": str(tmp_path)})
    r = factory.create(ComponentID("ebpf_go"), cfg, ComponentTelemetry("receiver", "ebpf_go", metrics), sink)
    try:
        wait_for_port(port, proc=proc)
        r.start(None)
        wait_for(lambda: r.propagation is not None, 30, "propagation mode chosen (on its own thread)")
        assert r.enabled and r.propagation is not None and r.propagation.mode == "probe_write"
        assert r.common.probe_write and not r.common.skmsg and r.drain.stitcher is not None
        wait_for(lambda: proc.pid in r.processes, 30, "pid traced")
        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        for query, headers in (("", {}), ("", {}), ("", {}), ("?fwd_tp=1", {"traceparent": tp})):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/chain{query}", headers=headers)
            urllib.request.urlopen(req, timeout=10).read()

        def client_spans() -> int:
            return sum(1 for b in sink.batches for _rs, ss, _s in b.iter_spans() if ss.scope.name.endswith("client"))
        wait_for(lambda: client_spans() >= 4, 15, "4 client spans")

        def value(name: str, **labels: str) -> float:
            return metrics.registry.get_sample_value(name, labels) or 0.0
        assert value("otelgo_ebpf_propagation_injected_total") == 3
        assert value("otelgo_ebpf_propagation_skipped_total", reason="existing_traceparent") == 1
        assert [q.lower().count(b"traceparent") for q in raw.requests] == [0, 0, 0, 1]  # a dry run writes nothing
    finally:
        r.shutdown()
        proc.kill()
        proc.wait()
        raw.close()
