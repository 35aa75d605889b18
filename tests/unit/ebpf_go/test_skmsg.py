"""bpf/skmsg_traceparent.c on its own: pending contexts are put in the pinned map by the test (as the
uprobe side would), requests are sent by a Python client to a raw TCP server, and the bytes the
server receives are compared with the bytes sent."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.root

if os.geteuid() != 0 and os.environ.get("CI") != "true":
    pytest.skip("needs root and eBPF (never skipped under CI=true)", allow_module_level=True)

from receiver.ebpf_go.propagation.skmsg import PropagationError, SkMsgPropagation  # noqa: E402
from tests.support.held import open_fds, sock_ops_on_root  # noqa: E402

TRACE = bytes(range(1, 17))
SPAN = bytes(range(0xA0, 0xA8))
LINE = b"traceparent: 00-" + TRACE.hex().encode() + b"-" + SPAN.hex().encode() + b"-01\r\n"


@pytest.fixture(scope="module")
def skmsg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SkMsgPropagation]:
    p = SkMsgPropagation(pin_dir="/sys/fs/bpf/otelgo_test_skmsg")
    p.start()
    p.watch(os.getpid())   # this process stands for the traced Go service
    yield p
    p.stop()


class Capture:
    """A raw TCP server that records everything one connection sends."""

    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen()
        self.port = self.srv.getsockname()[1]
        self.data = b""
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        c, _ = self.srv.accept()
        with c:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                self.data += d

    def wait(self) -> bytes:
        self._t.join(5)
        self.srv.close()
        return self.data


def send(skmsg: SkMsgPropagation, payloads: list[bytes], method: bytes = b"GET", age_ms: float = 0,
         pending: bool = True) -> bytes:
    cap = Capture()
    cl = socket.create_connection(("127.0.0.1", cap.port))
    time.sleep(0.02)  # sock_ops runs on ESTABLISHED
    if pending:
        tab: Any = skmsg.table("tp_pending")
        k = tab.Key()
        k.tgid, k.lport, k.rport = os.getpid(), cl.getsockname()[1], cap.port
        v = tab.Leaf()
        for i in range(16):
            v.trace_id[i] = TRACE[i]
        for i in range(8):
            v.span_id[i] = SPAN[i]
        v.flags, v.method_len, v.method = 1, len(method), method
        v.ktime = time.monotonic_ns() - int(age_ms * 1e6)
        v.tid = (os.getpid() << 32) | threading.get_native_id()
        tab[k] = v
    for p in payloads:
        cl.sendall(p)
    cl.close()
    return cap.wait()


def outcome_delta(skmsg: SkMsgPropagation, before: dict[str, int]) -> dict[str, int]:
    after = skmsg.counts().outcomes
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def test_inserts_after_request_line(skmsg: SkMsgPropagation) -> None:
    before = skmsg.counts().outcomes
    req = b"GET /x?q=1 HTTP/1.1\r\nHost: a\r\nUser-Agent: t\r\n\r\n"
    got = send(skmsg, [req])
    assert got == b"GET /x?q=1 HTTP/1.1\r\n" + LINE + b"Host: a\r\nUser-Agent: t\r\n\r\n"
    assert outcome_delta(skmsg, before) == {"injected": 1}


def test_one_shot_keepalive_second_request_untouched(skmsg: SkMsgPropagation) -> None:
    req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    got = send(skmsg, [req, req])
    assert got == b"GET / HTTP/1.1\r\n" + LINE + b"Host: a\r\n\r\n" + req


def test_body_in_same_send_kept(skmsg: SkMsgPropagation) -> None:
    body = b"5\r\nhello\r\n0\r\n\r\n"
    req = b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    got = send(skmsg, [req], method=b"POST")
    assert got == req.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\n" + LINE, 1)


def test_headers_near_4k(skmsg: SkMsgPropagation) -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: "
    pad = b"p" * (4090 - len(head) - 4)
    req = head + pad + b"\r\n\r\n"
    assert len(req) == 4090
    got = send(skmsg, [req])
    assert got == req.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\n" + LINE, 1)


@pytest.mark.parametrize("header", [b"X-Traceparent: 1", b"Traceparentx: 1", b"Trace-Parent: 1", b"Tracepar: 1",
                                    b"traceparent 1", b"X: traceparent:"])
def test_lookalikes_are_not_a_traceparent_header(skmsg: SkMsgPropagation, header: bytes) -> None:
    before = skmsg.counts().outcomes
    req = b"GET / HTTP/1.1\r\nHost: a\r\n" + header + b"\r\n\r\n"
    assert send(skmsg, [req]) == req.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\n" + LINE, 1)
    assert outcome_delta(skmsg, before) == {"injected": 1}


@pytest.mark.parametrize("where", [0, 1, 2, 3, 500, 509, 510, 511, 512, 513, 1023, 1024])
def test_header_block_end_and_existing_header_across_chunk_edges(skmsg: SkMsgPropagation, where: int) -> None:
    # The scan goes 512 bytes per program run and looks back 3 bytes (for "\r\n\r") and ahead 12
    # (for "traceparent:") from each '\n': both must work where a chunk ends.
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: "
    pad = b"p" * (where + 512 - len(head))
    before = skmsg.counts().outcomes
    req = head + pad + b"\r\n\r\n"
    assert send(skmsg, [req]) == req.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\n" + LINE, 1)
    tp = head + pad + b"\r\ntRaCePaReNt: 00-ab-cd-01\r\n\r\n"
    assert send(skmsg, [tp]) == tp
    assert outcome_delta(skmsg, before) == {"injected": 1, "existing_traceparent": 1}


@pytest.mark.parametrize("case,payloads,method,age,reason", [
    ("existing", [b"GET / HTTP/1.1\r\nHost: a\r\nTraceParent: 00-ab-cd-01\r\n\r\n"], b"GET", 0,
     "existing_traceparent"),
    ("headers-over-scan", [b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * 5000 + b"\r\n\r\n"], b"GET", 0, "split_request"),
    ("split-headers", [b"GET / HTTP/1.1\r\nHost: a\r\n", b"X: y\r\n\r\n"], b"GET", 0, "split_request"),
    ("wrong-method", [b"POST / HTTP/1.1\r\nHost: a\r\n\r\n"], b"GET", 0, "not_http"),
    ("h2-preface", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"], b"GET", 0, "not_http"),
    ("http2-version", [b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"], b"GET", 0, "not_http1"),
    ("stale", [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], b"GET", 500, "stale"),
])
def test_uncertain_requests_unchanged(skmsg: SkMsgPropagation, case: str, payloads: list[bytes], method: bytes,
                                      age: float, reason: str) -> None:
    before = skmsg.counts().outcomes
    got = send(skmsg, payloads, method=method, age_ms=age)
    assert got == b"".join(payloads)
    assert outcome_delta(skmsg, before) == {reason: 1}


def test_no_pending_no_change(skmsg: SkMsgPropagation) -> None:
    before = skmsg.counts().outcomes
    req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert send(skmsg, [req], pending=False) == req
    assert outcome_delta(skmsg, before) == {}


def test_refused_when_another_sk_msg_program_holds_the_sockets(skmsg: SkMsgPropagation) -> None:
    # `skmsg`, attached first, stands for the other program (a second collector, a CNI): every new
    # connection joins its sockhash, so a second one would never see a send. It must say so at start
    # and leave nothing behind, and the first one keeps working.
    attached, fds0 = sock_ops_on_root(), open_fds()
    second = SkMsgPropagation(pin_dir="/sys/fs/bpf/otelgo_test_skmsg_second")
    with pytest.raises(PropagationError, match=r"^another sk_msg program holds this host's client sockets "
                                               r"\(a second otelgo-collector"):
        second.start()
    assert sock_ops_on_root() == attached
    assert open_fds() == fds0
    assert os.listdir("/sys/fs/bpf/otelgo_test_skmsg_second") == []
    os.rmdir("/sys/fs/bpf/otelgo_test_skmsg_second")
    assert skmsg.counts().sockets_skipped == {"held_elsewhere": 0, "not_added": 0}
    req = b"GET /still HTTP/1.1\r\nHost: a\r\n\r\n"
    assert send(skmsg, [req]) == req.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\n" + LINE, 1)


def test_connections_of_a_process_not_traced_are_left_on_the_plain_path(skmsg: SkMsgPropagation) -> None:
    # Only a traced process's sockets join the sockhash (each send there goes through the kernel's
    # sk_msg path): with this process unwatched, even a pending context changes nothing, and the
    # program never runs for the connection (no outcome counted, the pending entry left).
    before = skmsg.counts().outcomes
    req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    skmsg.unwatch(os.getpid())
    try:
        assert send(skmsg, [req]) == req
    finally:
        skmsg.watch(os.getpid())
    assert outcome_delta(skmsg, before) == {}
    assert len(list(skmsg.table("tp_pending").keys())) == 1
    for k in list(skmsg.table("tp_pending").keys()):
        skmsg.table("tp_pending").delete(k)
    assert send(skmsg, [req]) == req.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\n" + LINE, 1)   # watched again
    assert outcome_delta(skmsg, before) == {"injected": 1}
