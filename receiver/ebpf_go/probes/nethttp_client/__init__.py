"""net/http client spans (`(*Transport).roundTrip`) and the trace context handed to sk_msg.

BPF side: nethttp_client.c beside this file. `PROBE` declares the hooks, offsets and record
(probes/spec.py); this module adds its own constants (itabs, the propagation mode) and turns
ring-buffer records into spans (`decode`, `to_span`). Span shape (OpenTelemetry HTTP client semantic conventions): name
`{method}`, kind CLIENT, `http.request.method`, `url.full` (user info replaced by `REDACTED`),
`server.address`, `server.port`, `http.response.status_code`, `network.protocol.version`,
`network.local.address`/`network.local.port` and `network.peer.address`/`network.peer.port` of
the TCP connection (read from Go memory at `(*Request).write`), status Error on 4xx/5xx and on
transport errors (`error.type`).

With `probe_write=True` (propagation mode probe_write, decided by propagation.choose) the program
also contains the writer of traceparent_probe_write.h (beside this file) and `attach` hooks
`net/http.Header.writeSubset`; otherwise neither is there: a program calling
bpf_probe_write_user does not load at all on a locked-down kernel.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.spans import KIND_CLIENT, STATUS_ERROR, Span

from ...gobinary import GoBinary
from ...gobinary.gomaps import header_map_flags
from ..spec import (
    HEADER,
    TRACE_CTX,
    Build,
    Field,
    Hook,
    Offset,
    Probe,
    ProbeUnavailable,
    Record,
    include_flags,
    offset_flags,
)

BPF_SOURCE = Path(__file__).resolve().with_name("nethttp_client.c")
ROUND_TRIP = "net/http.(*Transport).roundTrip"
REQUEST_WRITE = "net/http.(*Request).write"
WRITE_SUBSET = "net/http.Header.writeSubset"
EVENT_KIND_HTTP_CLIENT = 2

# (constant, struct, field, fallback offset used when neither DWARF nor the table knows it)
OFFSETS = (
    Offset("REQ_METHOD_POS", "net/http.Request", "Method", 0),
    Offset("REQ_URL_POS", "net/http.Request", "URL", 16),
    Offset("REQ_HEADER_POS", "net/http.Request", "Header", 56),
    Offset("REQ_CTX_POS", "net/http.Request", "ctx", None),
    Offset("URL_SCHEME_POS", "net/url.URL", "Scheme", 0),
    Offset("URL_USER_POS", "net/url.URL", "User", 32),
    Offset("URL_HOST_POS", "net/url.URL", "Host", 40),
    Offset("URL_PATH_POS", "net/url.URL", "Path", 56),
    Offset("URL_RAWQUERY_POS", "net/url.URL", "RawQuery", None),
    Offset("USERINFO_PASSWORDSET_POS", "net/url.Userinfo", "passwordSet", 32),
    Offset("RESP_STATUS_POS", "net/http.Response", "StatusCode", 16),
    Offset("RESP_PROTO_MAJOR_POS", "net/http.Response", "ProtoMajor", 40),
    Offset("RESP_PROTO_MINOR_POS", "net/http.Response", "ProtoMinor", 48),
    Offset("BUFIO_WR_POS", "bufio.Writer", "wr", 48),
    Offset("PCONN_CONN_POS", "net/http.persistConn", "conn", None),
    Offset("CONN_FD_POS", "net.conn", "fd", 0),
    Offset("NETFD_LADDR_POS", "net.netFD", "laddr", None),
    Offset("NETFD_RADDR_POS", "net.netFD", "raddr", None),
    Offset("TCPADDR_IP_POS", "net.TCPAddr", "IP", 0),
    Offset("TCPADDR_PORT_POS", "net.TCPAddr", "Port", 24),
    Offset("TLSCONN_CONN_POS", "crypto/tls.Conn", "conn", 0),
)
ITABS = {
    "ITAB_TCPCONN": "go:itab.*net.TCPConn,net.Conn",
    "ITAB_TLSCONN": "go:itab.*crypto/tls.Conn,net.Conn",
    "ITAB_PCONNWRITER": "go:itab.net/http.persistConnWriter,io.Writer",
}
# The writer's (probe_write only): the bufio.Writer it appends to, and how it checks the Header map.
WRITER_OFFSETS = (
    Offset("BUFIO_ERR_POS", "bufio.Writer", "err", 0),
    Offset("BUFIO_BUF_POS", "bufio.Writer", "buf", 16),
    Offset("BUFIO_N_POS", "bufio.Writer", "n", 40),
)
WRITER_ITABS = {"ITAB_BUFIOWRITER": "go:itab.*bufio.Writer,io.Writer"}

# ---- events: struct http_client_event in nethttp_client.c, checked field by field at compile time.

RECORD = Record("http_client_event", (
    *HEADER, *TRACE_CTX, Field("status", "Q"), Field("err_itab", "Q"), Field("method_len", "H"),
    Field("scheme_len", "H"), Field("host_len", "H"), Field("path_len", "H"), Field("query_len", "H"),
    Field("lport", "H"), Field("rport", "H"), Field("proto_major", "B"), Field("proto_minor", "B"),
    Field("user", "B"), Field("prop_outcome", "B"), Field("same_thread", "B"), Field("write_seen", "B"),
    Field("laddr_len", "B"), Field("raddr_len", "B"), Field(None, "2x"), Field("laddr", "16s"), Field("raddr", "16s"),
    Field("method", "16s"), Field("scheme", "8s"), Field("host", "128s"), Field("path", "128s"),
    Field("query", "128s")))
EVENT = RECORD.layout
assert EVENT.size == 552, EVENT.size


class NetHttpClient(Probe):
    name, title, scope, source = "net_http_client", "net/http client", "net/http/client", BPF_SOURCE
    hooks = (
        Hook(ROUND_TRIP, "uprobe_client_roundTrip", "uprobe_client_roundTrip_return", required=True),
        Hook(REQUEST_WRITE, "uprobe_client_Request_write"),                      # addresses, sk_msg handoff
        Hook(WRITE_SUBSET, "uprobe_client_writeSubset", when="probe_write"),     # the traceparent writer
    )
    offsets = OFFSETS
    record = RECORD
    context = "reads"
    uses_propagation = True
    decode_in_place = False

    def constants(self, gb: GoBinary, build: Build) -> list[str]:
        if build.skmsg and build.probe_write:
            raise ValueError("skmsg and probe_write are two propagation modes: one at a time")
        itabs = _itab_addresses(gb)
        flags = [f"-D{const}={itabs.get(sym, 0)}ULL" for const, sym in ITABS.items()]
        flags.append(f"-DSKMSG={1 if build.skmsg else 0}")
        if build.probe_write:
            flags += writer_cflags(gb, itabs)
        return flags

    def binary_state(self, gb: GoBinary, build: Build) -> ClientState:
        return ClientState(error_types(gb))

    def spans(self, records: list[Any], state: Any, gb: GoBinary, mono_to_unix: int,
              build: Build) -> list[tuple[int, Span]]:
        out = []
        injected = state.injected
        injected.clear()
        outcomes = state.outcomes
        outcomes.clear()
        errs = state.error_types
        for raw in records:
            ev = decode(raw)
            if ev.propagation == "injected":
                injected.add(ev.span_id)
            if build.probe_write:
                outcomes[ev.propagation] = outcomes.get(ev.propagation, 0) + 1
            out.append((ev.tgid, to_span(ev, mono_to_unix, errs.get(ev.err_itab, ""))))
        return out


@dataclass
class ClientState:
    """Per binary: `error.type` names by itab; for the last `spans()` call only: span ids whose
    `traceparent` was inserted (the receiver lets those pass the stitcher without waiting) and, in
    probe_write mode, the writer's outcomes by name (sk_msg counts its own in a BPF array)."""

    error_types: dict[int, str]
    injected: set[bytes] = field(default_factory=set)
    outcomes: dict[str, int] = field(default_factory=dict)


PROBE = NetHttpClient()


def cflags(binary: GoBinary, *, skmsg: bool, pin_dir: str, max_inflight: int = 4096, ringbuf_pages: int = 64,
           probe_write: bool = False) -> list[str]:
    """The -D constants of nethttp_client.c for this binary (tests and benchmarks compile it
    themselves). `probe_write` compiles the writer in (mode probe_write; never together with `skmsg`)."""
    return include_flags(PROBE) + PROBE.cflags(binary, Build(pin_dir, max_inflight, ringbuf_pages, skmsg=skmsg, probe_write=probe_write))


def writer_cflags(binary: GoBinary, itabs: dict[str, int] | None = None) -> list[str]:
    """The writer's constants (traceparent_probe_write.h), PROBE_WRITE=1 included."""
    for fn in (REQUEST_WRITE, WRITE_SUBSET):
        if binary.function(fn) is None:
            raise ProbeUnavailable(f"{fn} not in the binary: the traceparent writer cannot run")
    itabs = _itab_addresses(binary) if itabs is None else itabs
    flags = ["-DPROBE_WRITE=1", *(f"-D{c}={v}" for c, v in offset_flags(binary, WRITER_OFFSETS).items())]
    flags += [f"-D{c}={itabs.get(sym, 0)}ULL" for c, sym in WRITER_ITABS.items()]
    return flags + header_map_flags(binary)


def _itab_addresses(binary: GoBinary) -> dict[str, int]:
    """Static itab addresses (non-PIE only: a PIE's are relocated at run time, so 0 = unchecked)."""
    if binary.is_pie:
        return {}
    syms = binary.elf.symbols() or []
    wanted = set(ITABS.values()) | set(WRITER_ITABS.values())
    return {s.name: s.value for s in syms if s.name in wanted}


def attach(bpf: Any, binary: GoBinary, path: str, pid: int = -1, probe_write: bool = False) -> list[tuple[int, str]]:
    """Attach the probes (with `probe_write`, the writer's too: the program must have been compiled
    with `cflags(..., probe_write=True)`); [(address, BPF function)]."""
    return PROBE.attach(bpf, binary, path, pid, Build("", 0, 0, probe_write=probe_write))


# prop_outcome: 1-8 from the sk_msg program (skmsg_traceparent.c OUTCOME_*), 1, 4 and 9-12 from the
# probe_write writer (traceparent_line.h PW_*); 0: neither changed nor looked at the request.
PROPAGATION_OUTCOMES = {0: "not_seen", 1: "injected", 2: "stale", 3: "not_http", 4: "existing_traceparent",
                        5: "split_request", 6: "pull_failed", 7: "push_failed", 8: "not_http1",
                        9: "no_room", 10: "not_checked", 11: "write_failed", 12: "writer_state"}


@dataclass
class ClientEvent:
    tgid: int
    start_ns: int
    end_ns: int
    goroutine: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    flags: int
    status: int
    err_itab: int
    method: str
    scheme: str
    host: str
    path: str
    query: str
    user: int
    local_addr: str
    local_port: int
    peer_addr: str
    peer_port: int
    proto_major: int
    proto_minor: int
    propagation: str
    same_thread: bool
    write_seen: bool


_IP_MEMO: dict[tuple[bytes, int], str] = {}  # (raw, length) -> text: few distinct local/peer addresses


def _ip(raw: bytes, n: int) -> str:
    key = (raw, n)
    text = _IP_MEMO.get(key)
    if text is None:
        if len(_IP_MEMO) > 4096:
            _IP_MEMO.clear()
        text = _IP_MEMO[key] = _ip_text(raw, n)
    return text


def _ip_text(raw: bytes, n: int) -> str:
    if n == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    if n == 16:
        a = ipaddress.IPv6Address(raw[:16])
        return str(a.ipv4_mapped or a)
    return ""


def decode(data: bytes | memoryview) -> ClientEvent:
    (kind, tgid, start, end, g, trace_id, span_id, parent, flags, _remote, status, err_itab, ml, sl, hl, pl, ql,
     lport, rport, pmaj, pmin, user, outcome, same, wseen, lal, ral, laddr, raddr, method, scheme, host, path,
     query) = EVENT.unpack_from(data)
    return ClientEvent(
        tgid, start, end, g, trace_id, span_id, parent, flags, status, err_itab,
        method[:ml].decode(errors="replace") or "GET", scheme[:sl].decode(errors="replace"),
        host[:hl].decode(errors="replace"), path[:pl].decode(errors="replace"),
        query[:ql].decode(errors="replace"), user, _ip(laddr, lal), lport, _ip(raddr, ral), rport, pmaj, pmin,
        PROPAGATION_OUTCOMES.get(outcome, "unknown"), bool(same), bool(wseen))


def url_full(ev: ClientEvent) -> str:
    user = {0: "", 1: "REDACTED@", 2: "REDACTED:REDACTED@"}.get(ev.user, "")
    scheme = ev.scheme or "http"
    q = f"?{ev.query}" if ev.query else ""
    return f"{scheme}://{user}{ev.host}{ev.path}{q}"


def split_host_port(host: str, scheme: str) -> tuple[str, int]:
    default = 443 if scheme == "https" else 80
    if host.startswith("["):
        h, _, rest = host[1:].partition("]")
        return h, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else default
    h, sep, p = host.rpartition(":")
    if sep and p.isdigit():
        return h, int(p)
    return host, default


def to_span(ev: ClientEvent, mono_to_unix_ns: int, error_type: str = "") -> Span:
    """A CLIENT span from one event; `mono_to_unix_ns` converts bpf_ktime (CLOCK_MONOTONIC) to epoch
    time; `error_type` names the transport error's Go type when the caller could resolve it."""
    method = ev.method
    addr, port = split_host_port(ev.host, ev.scheme)
    attrs: dict[str, Any] = {"http.request.method": method, "url.full": url_full(ev),
                             "server.address": addr, "server.port": port}
    if ev.status:
        attrs["http.response.status_code"] = ev.status
    if ev.proto_major:
        attrs["network.protocol.version"] = (f"{ev.proto_major}.{ev.proto_minor}" if ev.proto_major == 1
                                             else str(ev.proto_major))
    if ev.local_port:
        attrs["network.local.address"] = ev.local_addr
        attrs["network.local.port"] = ev.local_port
    if ev.peer_port:
        attrs["network.peer.address"] = ev.peer_addr
        attrs["network.peer.port"] = ev.peer_port
    status, message = 0, ""
    if ev.err_itab:
        status, message = STATUS_ERROR, "transport error"
        attrs["error.type"] = error_type or "_OTHER"
    elif ev.status >= 400:
        status = STATUS_ERROR
        attrs["error.type"] = str(ev.status)
    parent = ev.parent_span_id if any(ev.parent_span_id) else b""
    return Span(ev.trace_id, ev.span_id, method, parent_span_id=parent, kind=KIND_CLIENT,
                start_time_unix_nano=ev.start_ns + mono_to_unix_ns, end_time_unix_nano=ev.end_ns + mono_to_unix_ns,
                attributes=attrs, status_code=status, status_message=message, flags=0x100 | (ev.flags & 0xFF))


def error_types(binary: GoBinary) -> dict[int, str]:
    """itab address -> Go type name for `error` implementations (non-PIE), for `error.type`."""
    if binary.is_pie:
        return {}
    out = {}
    for s in binary.elf.symbols() or []:
        if s.name.startswith("go:itab.") and s.name.endswith(",error"):
            out[s.value] = s.name[len("go:itab."):-len(",error")].lstrip("*")
    return out
