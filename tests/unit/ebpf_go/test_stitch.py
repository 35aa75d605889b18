"""Stitch: joins by connection and time, chained rewrites, bounded wait and memory, no wrong joins."""

from __future__ import annotations

import os
import random

from collector.spans import (
    KIND_CLIENT,
    KIND_INTERNAL,
    KIND_SERVER,
    Resource,
    ResourceSpans,
    Scope,
    ScopeSpans,
    Span,
    SpanBatch,
)
from receiver.ebpf_go.propagation.stitch import Stitcher

LOCAL = {"127.0.0.1"}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def rid() -> bytes:
    return os.urandom(16)


def sid() -> bytes:
    return os.urandom(8)


def server(trace: bytes, start: int, end: int, peer_port: int, peer: str = "127.0.0.1", parent: bytes = b"") -> Span:
    return Span(trace, sid(), "GET /chain", kind=KIND_SERVER, start_time_unix_nano=start, end_time_unix_nano=end,
                parent_span_id=parent, attributes={"network.peer.address": peer, "network.peer.port": peer_port})


def client(trace: bytes, parent: bytes, start: int, end: int, lport: int, peer: str = "127.0.0.1") -> Span:
    return Span(trace, sid(), "GET", kind=KIND_CLIENT, parent_span_id=parent, start_time_unix_nano=start,
                end_time_unix_nano=end, attributes={"network.local.address": "127.0.0.1", "network.local.port": lport,
                                                    "network.peer.address": peer, "network.peer.port": 8080})


def batch(service: str, *spans: Span) -> SpanBatch:
    return SpanBatch([ResourceSpans(Resource({"service.name": service}), [ScopeSpans(Scope("t"), list(spans))])])


def spans_of(b: SpanBatch) -> list[Span]:
    return [s for _, _, s in b.iter_spans()]


def make(clock: Clock, **kw: object) -> tuple[Stitcher, dict[str, int]]:
    counts: dict[str, int] = {}

    def count(o: str, n: int, protocol: str) -> None:
        assert protocol == "http/1.1"
        counts[o] = counts.get(o, 0) + n
    return Stitcher(window_s=2.0, local_addresses=LOCAL, count=count, clock=clock, **kw), counts  # type: ignore[arg-type]


def test_chain_of_three_becomes_one_trace() -> None:
    clock = Clock()
    st, counts = make(clock)
    ta, tb, tc = rid(), rid(), rid()
    a_srv = server(ta, 100, 1000, peer_port=50000)  # from the test client (local, untraced)
    a_cli = client(ta, a_srv.span_id, 150, 950, lport=41000)
    b_srv = server(tb, 200, 900, peer_port=41000)
    b_cli = client(tb, b_srv.span_id, 250, 850, lport=42000)
    c_srv = server(tc, 300, 800, peer_port=42000)
    b_int = Span(tb, sid(), "work", kind=KIND_INTERNAL, parent_span_id=b_srv.span_id)
    out = []
    out += spans_of(st.process(batch("C", c_srv)))
    out += spans_of(st.process(batch("B", b_cli)))
    out += spans_of(st.process(batch("B", b_srv)))
    out += spans_of(st.process(batch("A", a_cli)))
    out += spans_of(st.process(batch("A", a_srv)))
    assert out == []  # all five are candidates and wait
    late = spans_of(st.process(batch("B", b_int)))  # not a candidate: passes, already rewritten
    assert [s.trace_id for s in late] == [ta]
    clock.t = 2.5
    out = spans_of(st.flush())
    assert len(out) == 5 and {s.trace_id for s in out} == {ta}
    assert b_srv.parent_span_id == a_cli.span_id and c_srv.parent_span_id == b_cli.span_id
    assert a_srv.parent_span_id == b""
    assert counts == {"joined": 2, "unmatched": 1}


def test_non_candidates_pass_straight_through() -> None:
    clock = Clock()
    st, _ = make(clock)
    remote = server(rid(), 1, 2, peer_port=1234, peer="10.9.9.9")
    propagated = server(rid(), 1, 2, peer_port=1234, parent=sid())
    to_remote = client(rid(), b"", 1, 2, lport=5555, peer="10.9.9.9")
    assert len(spans_of(st.process(batch("X", remote, propagated, to_remote)))) == 3
    assert st.pending() == 0


def test_keepalive_connection_matches_by_time() -> None:
    clock = Clock()
    st, counts = make(clock)
    t1, t2 = rid(), rid()
    c1 = client(t1, b"", 100, 200, lport=40000)
    c2 = client(t2, b"", 300, 400, lport=40000)
    s1 = server(rid(), 120, 190, peer_port=40000)
    s2 = server(rid(), 320, 390, peer_port=40000)
    st.process(batch("A", c1, c2))
    st.process(batch("B", s2, s1))
    clock.t = 3
    st.flush()
    assert (s1.trace_id, s1.parent_span_id) == (t1, c1.span_id)
    assert (s2.trace_id, s2.parent_span_id) == (t2, c2.span_id)
    assert counts == {"joined": 2}


def test_request_that_waited_for_the_connection_is_not_joined_to_the_one_using_it() -> None:
    """Captured on the chain (stitch): two client spans on one connection both hold the server's
    start: one ran -135..+557 us (it waited for the connection), one -85..+63 us (it had it).
    The server span at 0 belongs to the one that ended first; the waiter's own request follows."""
    clock = Clock()
    st, counts = make(clock)
    t_wait, t_use = rid(), rid()
    waiter = client(t_wait, b"", 1_000_000 - 135_000, 1_000_000 + 557_000, lport=40001)
    user = client(t_use, b"", 1_000_000 - 85_000, 1_000_000 + 63_000, lport=40001)
    s_use = server(rid(), 1_000_000, 1_000_000 + 40_000, peer_port=40001)
    s_wait = server(rid(), 1_000_000 + 70_000, 1_000_000 + 500_000, peer_port=40001)
    st.process(batch("B", user, waiter))   # ring-buffer order: the user's span ended first
    st.process(batch("C", s_wait, s_use))
    clock.t = 3
    st.flush()
    assert (s_use.trace_id, s_use.parent_span_id) == (t_use, user.span_id)
    assert (s_wait.trace_id, s_wait.parent_span_id) == (t_wait, waiter.span_id)
    assert counts == {"joined": 2}


def test_unmatched_released_after_window_unchanged() -> None:
    clock = Clock()
    st, counts = make(clock)
    t = rid()
    s = server(t, 1, 2, peer_port=40000)
    st.process(batch("B", s))
    clock.t = 1.9
    assert spans_of(st.flush()) == []
    clock.t = 2.1
    assert spans_of(st.flush()) == [s] and s.trace_id == t and s.parent_span_id == b""
    assert counts == {"unmatched": 1}


def test_memory_bound_evicts_oldest() -> None:
    clock = Clock()
    st, counts = make(clock, max_pending=10)
    out = []
    for i in range(15):
        out += spans_of(st.process(batch("B", server(rid(), i, i + 1, peer_port=40000 + i))))
    assert len(out) == 5 and st.pending() == 10
    assert counts == {"evicted": 5}


def test_1000_requests_concurrency_20_no_wrong_joins() -> None:
    """20 keep-alive connections (local ports), 50 sequential requests each, interleaved in time
    and delivered out of order: every server span joins its own client span."""
    clock = Clock()
    st, counts = make(clock)
    rng = random.Random(7)
    pairs = []
    spans: list[tuple[str, Span]] = []
    for conn in range(20):
        t = conn * 7
        lport = 40000 + conn
        for _ in range(50):
            start = t + rng.randint(1, 5)
            end = start + rng.randint(20, 60)
            cl = client(rid(), b"", start, end, lport=lport)
            sv = server(rid(), start + rng.randint(1, 5), end - rng.randint(1, 5), peer_port=lport)
            pairs.append((cl, sv))
            spans += [("A", cl), ("B", sv)]
            t = end
    rng.shuffle(spans)
    for svc, s in spans:
        st.process(batch(svc, s))
    clock.t = 10
    st.flush()
    wrong = sum(1 for cl, sv in pairs if (sv.trace_id, sv.parent_span_id) != (cl.trace_id, cl.span_id))
    assert wrong == 0
    assert counts == {"joined": 1000}


def test_settled_client_spans_pass_without_waiting() -> None:
    """sk_msg mode: a client span whose traceparent was inserted is settled and never waits;
    one that was not injected still waits and joins its server span (the fallback)."""
    clock = Clock()
    st, counts = make(clock)
    ta, tb = rid(), rid()
    injected = client(ta, sid(), 100, 900, lport=43000)
    skipped = client(ta, sid(), 1000, 1900, lport=43001)
    out = spans_of(st.process(batch("A", injected, skipped), settled={injected.span_id}))
    assert out == [injected] and st.pending() == 1
    b_srv = server(tb, 1100, 1800, peer_port=43001)
    assert spans_of(st.process(batch("B", b_srv))) == []
    clock.t = 2.5
    left = spans_of(st.flush())
    assert {s.span_id for s in left} == {skipped.span_id, b_srv.span_id}
    assert b_srv.trace_id == ta and b_srv.parent_span_id == skipped.span_id
    assert counts == {"joined": 1}


def test_same_local_port_to_another_server_is_not_joined() -> None:
    """Linux reuses a local port for connections to different servers: the server's port (Host)
    must match the client's peer port."""
    clock = Clock()
    st, counts = make(clock)
    cli = client(rid(), sid(), 100, 900, lport=44000)          # to port 8080
    other = server(rid(), 200, 800, peer_port=44000)
    other.attributes["server.port"] = 9090                       # a request to another server
    mine = server(rid(), 300, 700, peer_port=44000)
    mine.attributes["server.port"] = 8080
    st.process(batch("A", cli))
    st.process(batch("X", other, mine))
    clock.t = 2.5
    st.flush()
    assert mine.parent_span_id == cli.span_id and mine.trace_id == cli.trace_id
    assert other.parent_span_id == b"" and other.trace_id != cli.trace_id
    assert counts == {"joined": 1, "unmatched": 1}


def rpc_span(kind: int, start: int, end: int, peer_port: int) -> Span:
    return Span(rid(), sid(), "otelgo.test.Echo/Echo", kind=kind, start_time_unix_nano=start, end_time_unix_nano=end,
                attributes={"rpc.system": "grpc", "network.peer.address": "127.0.0.1", "network.peer.port": peer_port})


def test_grpc_streams_join_exactly_100_concurrent_on_one_connection() -> None:
    # 100 calls at once on one HTTP/2 connection (127.0.0.1:5000 -> :7000), their intervals all
    # overlapping: a time window could not tell them apart, the stream id does. Each server span
    # joins the client span of its own stream; a server span whose stream no client span has stays
    # unmatched; both counted as grpc.
    clock = Clock()
    counts: dict[tuple[str, str], int] = {}

    def count(o: str, n: int, protocol: str) -> None:
        counts[o, protocol] = counts.get((o, protocol), 0) + n
    st = Stitcher(window_s=2.0, local_addresses=LOCAL, count=count, clock=clock)
    streams: dict[bytes, tuple[str, int, int, int]] = {}
    pairs = []
    order = list(range(100))
    random.Random(7).shuffle(order)
    for i in range(100):
        c = rpc_span(KIND_CLIENT, 1000 + i, 10_000 + order[i], 7000)
        s = rpc_span(KIND_SERVER, 2000 + order[i], 9000 + i, 5000)
        streams[c.span_id] = ("127.0.0.1", 5000, 7000, 2 * i + 1)
        streams[s.span_id] = ("127.0.0.1", 5000, 7000, 2 * i + 1)
        pairs.append((c, s))
    lone = rpc_span(KIND_SERVER, 3000, 4000, 5000)
    streams[lone.span_id] = ("127.0.0.1", 5000, 7000, 999)
    servers = [s for _, s in pairs]
    random.Random(8).shuffle(servers)
    out = spans_of(st.process(batch("b", *servers, lone), streams=streams))
    out += spans_of(st.process(batch("a", *(c for c, _ in pairs)), streams=streams))
    assert out == []                      # all held for the window
    clock.t += 2.5
    out = spans_of(st.flush())
    assert len(out) == 201
    for c, s in pairs:
        assert (s.parent_span_id, s.trace_id) == (c.span_id, c.trace_id)
    assert lone.parent_span_id == b""
    assert counts == {("joined", "grpc"): 100, ("unmatched", "grpc"): 1}


def test_grpc_spans_without_a_stream_key_are_not_candidates() -> None:
    # A gRPC client span carries no network.local.*: without its stream key it is no HTTP/1.1
    # candidate either, and passes at once.
    clock = Clock()
    st, counts = make(clock)
    c = rpc_span(KIND_CLIENT, 1, 2, 7000)
    assert spans_of(st.process(batch("a", c))) == [c] and counts == {}


def test_in_process_children_leave_with_their_roots_new_trace() -> None:
    # B's handler runs a query (a child span that ends first) under B's server span, which a
    # client span of A joins later: the query must end up in A's trace too, not in B's old one.
    # A child of a root that passes at once (not a candidate) leaves with it, unchanged.
    clock = Clock()
    st, counts = make(clock)
    ta, tb, tc = rid(), rid(), rid()
    b_server = server(tb, 200, 900, peer_port=5001)
    query = Span(tb, sid(), "SELECT", kind=KIND_CLIENT, parent_span_id=b_server.span_id,
                 start_time_unix_nano=300, end_time_unix_nano=400, flags=0x101)
    assert spans_of(st.process(batch("b", query))) == []          # waits for its root
    assert spans_of(st.process(batch("b", b_server))) == []       # the root waits for its client
    a_client = client(ta, sid(), 100, 1000, lport=5001)
    st.process(batch("a", a_client))
    clock.t += 2.5
    out = spans_of(st.flush())
    assert {s.span_id for s in out} == {query.span_id, b_server.span_id, a_client.span_id}
    assert query.trace_id == b_server.trace_id == ta and counts == {"joined": 1}
    ext_root = server(tc, 1, 9, peer_port=6000, peer="10.9.9.9")          # not local: no candidate
    kid = Span(tc, sid(), "SELECT", kind=KIND_CLIENT, parent_span_id=ext_root.span_id,
               start_time_unix_nano=2, end_time_unix_nano=3, flags=0x101)
    assert spans_of(st.process(batch("c", kid))) == []
    assert {s.span_id for s in spans_of(st.process(batch("c", ext_root)))} == {kid.span_id, ext_root.span_id}
    orphan = Span(rid(), sid(), "SELECT", kind=KIND_CLIENT, parent_span_id=sid(), flags=0x101,
                  start_time_unix_nano=1, end_time_unix_nano=2)
    assert spans_of(st.process(batch("d", orphan))) == []
    clock.t += 2.5
    assert spans_of(st.flush()) == [orphan]                               # its root never came: window
