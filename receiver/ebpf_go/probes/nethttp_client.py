"""net/http client spans (`(*Transport).roundTrip`) and the trace context handed to sk_msg.

BPF side: bpf/nethttp_client.c. This module says which symbols to probe, which constants the C
needs (`cflags`), attaches the probes (`attach`), and turns ring-buffer records into spans
(`decode`, `to_span`). Span shape (OpenTelemetry HTTP client semantic conventions): name
`{method}`, kind CLIENT, `http.request.method`, `url.full` (user info replaced by `REDACTED`),
`server.address`, `server.port`, `http.response.status_code`, `network.protocol.version`,
`network.local.address`/`network.local.port` and `network.peer.address`/`network.peer.port` of
the TCP connection (read from Go memory at `(*Request).write`), status Error on 4xx/5xx and on
transport errors (`error.type`).

With `probe_write=True` (propagation mode probe_write, decided by propagation.choose) the program
also contains the writer of bpf/traceparent_probe_write.h and `attach` hooks
`net/http.Header.writeSubset`; otherwise neither is there: a program calling
bpf_probe_write_user does not load at all on a locked-down kernel.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collector.spans import KIND_CLIENT, STATUS_ERROR, Span

from ..gobinary import GoBinary

BPF_SOURCE = Path(__file__).resolve().parents[3] / "bpf" / "nethttp_client.c"
ROUND_TRIP = "net/http.(*Transport).roundTrip"
REQUEST_WRITE = "net/http.(*Request).write"
WRITE_SUBSET = "net/http.Header.writeSubset"
EVENT_KIND_HTTP_CLIENT = 2

# (constant, struct, field, fallback offset used when neither DWARF nor the table knows it)
OFFSETS: list[tuple[str, str, str, int | None]] = [
    ("REQ_METHOD_POS", "net/http.Request", "Method", 0),
    ("REQ_URL_POS", "net/http.Request", "URL", 16),
    ("REQ_HEADER_POS", "net/http.Request", "Header", 56),
    ("REQ_CTX_POS", "net/http.Request", "ctx", None),
    ("URL_SCHEME_POS", "net/url.URL", "Scheme", 0),
    ("URL_USER_POS", "net/url.URL", "User", 32),
    ("URL_HOST_POS", "net/url.URL", "Host", 40),
    ("URL_PATH_POS", "net/url.URL", "Path", 56),
    ("URL_RAWQUERY_POS", "net/url.URL", "RawQuery", None),
    ("USERINFO_PASSWORDSET_POS", "net/url.Userinfo", "passwordSet", 32),
    ("RESP_STATUS_POS", "net/http.Response", "StatusCode", 16),
    ("RESP_PROTO_MAJOR_POS", "net/http.Response", "ProtoMajor", 40),
    ("RESP_PROTO_MINOR_POS", "net/http.Response", "ProtoMinor", 48),
    ("BUFIO_WR_POS", "bufio.Writer", "wr", 48),
    ("PCONN_CONN_POS", "net/http.persistConn", "conn", None),
    ("CONN_FD_POS", "net.conn", "fd", 0),
    ("NETFD_LADDR_POS", "net.netFD", "laddr", None),
    ("NETFD_RADDR_POS", "net.netFD", "raddr", None),
    ("TCPADDR_IP_POS", "net.TCPAddr", "IP", 0),
    ("TCPADDR_PORT_POS", "net.TCPAddr", "Port", 24),
    ("TLSCONN_CONN_POS", "crypto/tls.Conn", "conn", 0),
]
ITABS = {
    "ITAB_TCPCONN": "go:itab.*net.TCPConn,net.Conn",
    "ITAB_TLSCONN": "go:itab.*crypto/tls.Conn,net.Conn",
    "ITAB_PCONNWRITER": "go:itab.net/http.persistConnWriter,io.Writer",
}
# The writer's (probe_write only): the bufio.Writer it appends to, and how it checks the Header map.
WRITER_OFFSETS: list[tuple[str, str, str, int | None]] = [
    ("BUFIO_ERR_POS", "bufio.Writer", "err", 0),
    ("BUFIO_BUF_POS", "bufio.Writer", "buf", 16),
    ("BUFIO_N_POS", "bufio.Writer", "n", 40),
]
WRITER_ITABS = {"ITAB_BUFIOWRITER": "go:itab.*bufio.Writer,io.Writer"}


class ProbeUnavailable(RuntimeError):
    """This binary lacks something the client probe needs (message says what)."""


def cflags(binary: GoBinary, *, skmsg: bool, pin_dir: str, max_inflight: int = 4096, ringbuf_pages: int = 64,
           wakeup_every: int = 32, ctx_walk_max: int = 16, probe_write: bool = False) -> list[str]:
    """The -D constants of bpf/nethttp_client.c for this binary. `probe_write` compiles the writer
    in (mode probe_write; never together with `skmsg`)."""
    if skmsg and probe_write:
        raise ValueError("skmsg and probe_write are two propagation modes: one at a time")
    flags = [f"-D{const}={value}" for const, value in _offsets(binary, OFFSETS)]
    itabs = _itab_addresses(binary)
    for const, sym in ITABS.items():
        flags.append(f"-D{const}={itabs.get(sym, 0)}ULL")
    flags += [f"-DSKMSG={1 if skmsg else 0}", f'-DPIN_DIR="{pin_dir}"', f"-DMAX_INFLIGHT={max_inflight}",
              f"-DRINGBUF_PAGES={ringbuf_pages}", f"-DWAKEUP_EVERY={wakeup_every}",
              f"-DCTX_WALK_MAX={ctx_walk_max}"]
    if probe_write:
        flags += writer_cflags(binary, itabs)
    return flags


def writer_cflags(binary: GoBinary, itabs: dict[str, int] | None = None) -> list[str]:
    """The writer's constants (bpf/traceparent_probe_write.h), PROBE_WRITE=1 included."""
    from .nethttp_server import CLASSIC, SWISS, swiss_maps

    for fn in (REQUEST_WRITE, WRITE_SUBSET):
        if binary.function(fn) is None:
            raise ProbeUnavailable(f"{fn} not in the binary: the traceparent writer cannot run")
    itabs = _itab_addresses(binary) if itabs is None else itabs
    flags = ["-DPROBE_WRITE=1", *(f"-D{c}={v}" for c, v in _offsets(binary, WRITER_OFFSETS))]
    flags += [f"-D{c}={itabs.get(sym, 0)}ULL" for c, sym in WRITER_ITABS.items()]
    swiss = swiss_maps(binary)
    flags.append(f"-DSWISS_MAPS={1 if swiss else 0}")
    flags += [f"-D{c}={v}" for c, v in (SWISS if swiss else CLASSIC).items()]
    return flags


def _offsets(binary: GoBinary, table: list[tuple[str, str, str, int | None]]) -> list[tuple[str, int]]:
    out = []
    for const, st, field, fallback in table:
        off = binary.struct_offset(st, field)
        value = off.value if off is not None else fallback
        if value is None:
            raise ProbeUnavailable(f"no offset for {st}.{field} (no DWARF and not in the offsets table)")
        out.append((const, value))
    return out


def _itab_addresses(binary: GoBinary) -> dict[str, int]:
    """Static itab addresses (non-PIE only: a PIE's are relocated at run time, so 0 = unchecked)."""
    if binary.is_pie:
        return {}
    syms = binary.elf.symbols() or []
    wanted = set(ITABS.values()) | set(WRITER_ITABS.values())
    return {s.name: s.value for s in syms if s.name in wanted}


def attach(bpf: Any, binary: GoBinary, path: str, pid: int = -1, probe_write: bool = False) -> list[str]:
    """Attach the probes (with `probe_write`, the writer's too: the program must have been compiled
    with `cflags(..., probe_write=True)`); returns a description of each attached probe."""
    done = []
    if binary.function(ROUND_TRIP) is None:
        raise ProbeUnavailable(f"{ROUND_TRIP} not in the binary")
    ep = binary.entry_probe(ROUND_TRIP)
    bpf.attach_uprobe(name=path, addr=ep.addr, fn_name=b"uprobe_client_roundTrip", pid=pid)
    done.append(f"{ROUND_TRIP} entry at {ep.addr:#x} ({ep.kind})")
    rets = binary.return_sites(ROUND_TRIP)
    for addr in rets:
        bpf.attach_uprobe(name=path, addr=addr, fn_name=b"uprobe_client_roundTrip_return", pid=pid)
    done.append(f"{ROUND_TRIP} {len(rets)} RET sites")
    if binary.function(REQUEST_WRITE) is not None:
        wp = binary.entry_probe(REQUEST_WRITE)
        bpf.attach_uprobe(name=path, addr=wp.addr, fn_name=b"uprobe_client_Request_write", pid=pid)
        done.append(f"{REQUEST_WRITE} entry at {wp.addr:#x} ({wp.kind})")
        if probe_write:
            sp = binary.entry_probe(WRITE_SUBSET)
            bpf.attach_uprobe(name=path, addr=sp.addr, fn_name=b"uprobe_client_writeSubset", pid=pid)
            done.append(f"{WRITE_SUBSET} entry at {sp.addr:#x} ({sp.kind}): traceparent writer")
    elif probe_write:
        raise ProbeUnavailable(f"{REQUEST_WRITE} not in the binary: the traceparent writer cannot be armed")
    return done


# ---- events

EVENT = struct.Struct("<IIQQQ16s8s8sBB6xQQHHHHHHHBBBBBBBB2x16s16s16s8s128s128s128s")
assert EVENT.size == 552, EVENT.size

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
