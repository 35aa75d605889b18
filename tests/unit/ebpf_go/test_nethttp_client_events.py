"""net/http client records: address decoding (memoised per raw value) and the span's attributes."""

from __future__ import annotations

from collector.spans import KIND_CLIENT
from receiver.ebpf_go.probes import nethttp_client as nc


def test_ip_text_for_v4_v6_mapped_and_none_repeatedly() -> None:
    v4 = bytes([10, 0, 0, 2]) + b"\0" * 12
    v6 = bytes.fromhex("fe800000000000000000000000000001")
    mapped = bytes.fromhex("00000000000000000000ffff7f000001")
    for _ in range(2):  # second round from the memo
        assert nc._ip(v4, 4) == "10.0.0.2"
        assert nc._ip(v6, 16) == "fe80::1"
        assert nc._ip(mapped, 16) == "127.0.0.1"
        assert nc._ip(v4, 0) == ""
    assert nc._ip(v4, 16) == "a00:2::"  # same bytes, other length: another entry


def test_decode_and_span() -> None:
    ip = bytes([127, 0, 0, 1]) + b"\0" * 12
    raw = nc.EVENT.pack(2, 4242, 1000, 5000, 1, b"a" * 16, b"b" * 8, b"\0" * 8, 1, 0, 503, 0, 3, 4, 14, 6, 0,
                        50000, 8080, 1, 1, 0, 1, 1, 1, 4, 4, ip, ip, b"GET", b"http", b"127.0.0.1:8080",
                        b"/hello", b"")
    s = nc.to_span(nc.decode(raw), 10)
    assert s.kind == KIND_CLIENT and s.name == "GET" and s.start_time_unix_nano == 1010
    assert s.attributes["url.full"] == "http://127.0.0.1:8080/hello"
    assert (s.attributes["network.peer.address"], s.attributes["network.peer.port"]) == ("127.0.0.1", 8080)
    assert (s.attributes["network.local.address"], s.attributes["network.local.port"]) == ("127.0.0.1", 50000)
    assert s.attributes["error.type"] == "503" and s.parent_span_id == b""
