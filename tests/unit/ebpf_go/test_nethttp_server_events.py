"""net/http server records -> spans: names, attributes, status, parents, time conversion."""

from __future__ import annotations

from collector.spans import KIND_SERVER, STATUS_ERROR, STATUS_UNSET
from receiver.ebpf_go.probes import StructCollector, nethttp_server
from receiver.ebpf_go.probes.nethttp_server import EVENT, route_of, split_host_port, to_spans

TID = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
SID = bytes.fromhex("1122334455667788")
PID_ = bytes.fromhex("b7ad6b7169203331")


def record(method: str = "GET", path: str = "/items/1", status: int = 200, pattern: str = "GET /items/{id}",
           remote: str = "10.0.0.2:5555", host: str = "example.com:8080", ua: str = "ua/1",
           parent: bytes = b"\0" * 8, remote_parent: int = 0, major: int = 1, minor: int = 1,
           tls: int = 0, route_join: int = 0) -> bytes:
    def fixed(s: str, n: int) -> tuple[bytes, int]:
        b = s.encode()
        return b.ljust(n, b"\0")[:n], min(len(b), n)
    m, ml = fixed(method, 16)
    p, pl = fixed(path, 128)
    r, rl = fixed(remote, 64)
    h, hl = fixed(host, 128)
    pa, pal = fixed(pattern, 128)
    u, ul = fixed(ua, 128)
    return EVENT.pack(1, 4242, 1_000, 5_000, 0xC000, TID, SID, parent, 1, remote_parent, status,
                      ml, 0, pl, rl, hl, pal, ul, major, minor, tls, route_join, m, p, r, h, pa, u)


def spans_of(*raws: bytes, offset: int = 10**18) -> list:
    return to_spans([EVENT.unpack(r) for r in raws], offset)


def test_layout_matches_the_c_struct() -> None:
    assert EVENT.size == 688  # sizeof(struct http_server_event) in bpf/nethttp_server.c


def test_full_span() -> None:
    ((pid, s),) = spans_of(record())
    assert pid == 4242
    assert s.name == "GET /items/{id}" and s.kind == KIND_SERVER and s.status_code == STATUS_UNSET
    assert (s.trace_id, s.span_id, s.parent_span_id) == (TID, SID, b"")
    assert (s.start_time_unix_nano, s.end_time_unix_nano) == (10**18 + 1_000, 10**18 + 5_000)
    assert s.attributes == {
        "http.request.method": "GET", "url.path": "/items/1", "url.scheme": "http",
        "http.response.status_code": 200, "http.route": "/items/{id}", "server.address": "example.com",
        "server.port": 8080, "network.peer.address": "10.0.0.2", "network.peer.port": 5555,
        "network.protocol.version": "1.1", "user_agent.original": "ua/1",
    }


def test_chi_levels_are_joined_by_chis_rule() -> None:
    """chi's RoutePattern(): the mount point's `/*` gives way to the sub-router's part, one trailing
    slash goes; a record without route_join keeps its template as it came (gin's `/users/`)."""
    cases = [("/api/v1/*/users/{uid}/orders", "/api/v1/users/{uid}/orders"), ("/admin/*/stats", "/admin/stats"),
             ("/a/*/b/*/c", "/a/b/c"), ("/admin/*/", "/admin"), ("/admin/*", "/admin/*"), ("/*/", "/")]
    for joined, route in cases:
        ((_, s),) = spans_of(record(pattern=joined, route_join=1))
        assert (s.name, s.attributes["http.route"]) == (f"GET {route}", route), joined
    ((_, s),) = spans_of(record(pattern="/users/"))
    assert s.attributes["http.route"] == "/users/"


def test_remote_parent_error_status_no_route_tls_ipv6() -> None:
    ((_, s),) = spans_of(record(status=503, pattern="", parent=PID_, remote_parent=1, tls=1,
                                remote="[::1]:4000", host="svc", ua=""))
    assert s.name == "GET" and s.status_code == STATUS_ERROR and s.parent_span_id == PID_
    assert s.flags & 0x300 == 0x300
    a = s.attributes
    assert a["url.scheme"] == "https" and "http.route" not in a and "user_agent.original" not in a
    assert (a["network.peer.address"], a["network.peer.port"]) == ("::1", 4000)
    assert a["server.address"] == "svc" and "server.port" not in a


def test_status_zero_is_200_and_unknown_method_is_other() -> None:
    ((_, s),) = spans_of(record(method="PURGE", status=0, pattern="/cache/"))
    assert s.name == "HTTP /cache/"
    assert s.attributes["http.request.method"] == "_OTHER"
    assert s.attributes["http.request.method_original"] == "PURGE"
    assert s.attributes["http.response.status_code"] == 200


def test_method_read_with_the_path_from_the_request_line() -> None:
    # One read from "GET /items/1": the path at `path`, the method 4 bytes before it (method[12:15]),
    # method_off in the high byte of method_len.
    raw = bytearray(record())
    raw[96:112] = b"\0" * 12 + b"GET "
    raw[80:82] = (3 | (12 << 8)).to_bytes(2, "little")
    ((_, s),) = spans_of(bytes(raw))
    assert s.name == "GET /items/{id}" and s.attributes["http.request.method"] == "GET"
    assert s.attributes["url.path"] == "/items/1"


def test_http2_has_no_status_read() -> None:
    ((_, s),) = spans_of(record(status=0, major=2, minor=0))
    assert "http.response.status_code" not in s.attributes
    assert s.attributes["network.protocol.version"] == "2"


def test_route_and_host_port_helpers() -> None:
    assert route_of("GET /items/{id}") == "/items/{id}"
    assert route_of("example.com/a/") == "/a/"
    assert route_of("/x") == "/x"
    assert split_host_port("1.2.3.4:80") == ("1.2.3.4", 80)
    assert split_host_port("[fe80::1]:443") == ("fe80::1", 443)
    assert split_host_port("host") == ("host", None)


def test_struct_collector_decodes_from_memory() -> None:
    from receiver.ebpf_go.ringbuf import RingBuffer
    from tests.unit.ebpf_go.test_ringbuf import FakeRing
    ring = FakeRing(8192)
    col = StructCollector(nethttp_server.EVENT)
    col.bind(RingBuffer(ring.fd, ring.size))
    raw = record()
    ring.put(raw)
    ring.put(raw[:10])  # too short: counted, skipped
    (rec,) = col.take()
    assert rec == EVENT.unpack(raw) and col.short == 1 and col.take() == []
    ring.close()


def test_same_request_shape_shares_nothing_mutable_and_keeps_attribute_order() -> None:
    (_, a), (_, b), (_, c) = spans_of(record(path="/items/1", remote="10.0.0.2:5555"),
                                      record(path="/items/2", remote="10.0.0.3:6666"),
                                      record(path="/items/3", remote="10.0.0.3"))
    assert list(a.attributes) == [
        "http.request.method", "http.route", "url.path", "url.scheme", "http.response.status_code",
        "server.address", "server.port", "network.peer.address", "network.peer.port",
        "network.protocol.version", "user_agent.original"]
    assert (b.attributes["url.path"], b.attributes["network.peer.port"]) == ("/items/2", 6666)
    assert c.attributes["network.peer.address"] == "10.0.0.3" and "network.peer.port" not in c.attributes
    a.attributes["http.route"] = "changed"
    a.attributes["url.scheme"] = "changed"
    a.attributes["network.protocol.version"] = "changed"
    ((_, d),) = spans_of(record(path="/items/4"))
    assert (d.attributes["http.route"], d.attributes["url.scheme"], d.attributes["network.protocol.version"]) == \
        ("/items/{id}", "http", "1.1")


def test_many_distinct_shapes_past_the_memo_bound() -> None:
    raws = [record(pattern=f"GET /p{i}/{{id}}", status=200 + i % 300, ua=f"ua/{i}") for i in range(5000)]
    for (_, s), i in zip(spans_of(*raws), range(5000), strict=True):
        assert s.name == f"GET /p{i}/{{id}}" and s.attributes["user_agent.original"] == f"ua/{i}"
        assert s.attributes["http.response.status_code"] == 200 + i % 300
        assert s.status_code == (STATUS_ERROR if 500 <= 200 + i % 300 <= 599 else STATUS_UNSET)
