"""gRPC server spans: one SERVER span per call (unary or streaming) served by grpc-go.

BPF side: grpc_server.c beside this file, which says what each hook reads. Hooked (entries only,
each at the emulated jcc after the stack check):
- `google.golang.org/grpc/internal/transport.(*http2Server).operateHeaders`: the incoming
  `traceparent`, from the decoded header fields of the new stream;
- `google.golang.org/grpc.(*Server).handleStream`: the span starts;
- `google.golang.org/grpc/internal/transport.(*http2Server).writeStatus` (`WriteStatus` before
  grpc 1.69): the span ends with the final status.
Not traced: `(*Server).ServeHTTP` (grpc served through net/http's HTTP/2 server: that request is a
net/http server span).

Span (semantic conventions v1.37): name `{rpc.service}/{rpc.method}`, kind SERVER, attributes
`rpc.system=grpc`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, `server.address`/`server.port`
(the connection's local end), `network.peer.address`/`network.peer.port`; status Error only for the
server-fault codes, with the status message as description.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.spans import KIND_SERVER, STATUS_ERROR, STATUS_UNSET, Span, make_span

from ...gobinary import GoBinary
from ...gobinary.itabs import itab_symbol
from ...gobinary.offsets import version_key
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

BPF_SOURCE = Path(__file__).resolve().with_name("grpc_server.c")
MODULE = "google.golang.org/grpc"
TRANSPORT = "google.golang.org/grpc/internal/transport"
OPERATE_HEADERS = f"{TRANSPORT}.(*http2Server).operateHeaders"
HANDLE_STREAM = f"{MODULE}.(*Server).handleStream"
WRITE_STATUS = (f"{TRANSPORT}.(*http2Server).writeStatus", f"{TRANSPORT}.(*http2Server).WriteStatus")
ITAB_TCPADDR = "go:itab.*net.TCPAddr,net.Addr"

# Codes that are the server's fault (semantic conventions, gRPC server spans): the span status is Error.
SERVER_FAULT_CODES = frozenset({2, 4, 12, 13, 14, 15})   # UNKNOWN DEADLINE_EXCEEDED UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS

# (constant, struct, field, fallback); grpc's own layouts change between releases: strict.
OFFSETS = (
    Offset("MHF_FIELDS_POS", "golang.org/x/net/http2.MetaHeadersFrame", "Fields", 8),
    Offset("FH_STREAMID_POS", "golang.org/x/net/http2.FrameHeader", "StreamID", 8),
    Offset("HF_SENSITIVE_POS", "golang.org/x/net/http2/hpack.HeaderField", "Sensitive", 32),
    Offset("STREAM_ID_POS", f"{TRANSPORT}.Stream", "id", None, strict=True),
    Offset("STREAM_CTX_POS", f"{TRANSPORT}.Stream", "ctx", None, strict=True),
    Offset("STREAM_METHOD_POS", f"{TRANSPORT}.Stream", "method", None, strict=True),
    Offset("TCPADDR_IP_POS", "net.TCPAddr", "IP", 0),
    Offset("TCPADDR_PORT_POS", "net.TCPAddr", "Port", 24),
    Offset("STATUS_S_POS", "google.golang.org/grpc/internal/status.Status", "s", 0),
    Offset("SPB_CODE_POS", "google.golang.org/genproto/googleapis/rpc/status.Status", "Code", 40),
    Offset("SPB_MESSAGE_POS", "google.golang.org/genproto/googleapis/rpc/status.Status", "Message", 48),
)
# grpc-go releases where the layout the C depends on changed (checked in their sources)
STREAM_BY_POINTER = "v1.69.0"   # handleStream gets *ServerStream{*Stream, ...}
STREAM_BY_VALUE = "v1.77.0"     # ServerStream{Stream, ...} (and ClientStream alike)
ATTEMPT_RENAMED = "v1.71.0"     # csAttempt.t, .s became .transport, .transportStream
PEER_FIELD = "v1.60.0"          # http2Server.peer (peer.Peer) replaced remoteAddr/localAddr; operateHeaders(ctx, frame, ...)

RECORD = Record("grpc_server_event", (
    *HEADER, *TRACE_CTX, Field("code", "I"), Field("method_len", "H"), Field("message_len", "H"),
    Field("peer.ip", "16s"), Field("peer.port", "H"), Field("peer.ip_len", "B"), Field(None, "5x"),
    Field("local.ip", "16s"), Field("local.port", "H"), Field("local.ip_len", "B"), Field(None, "5x"),
    Field("stream_id", "I"), Field(None, "4x"), Field("method", "128s"), Field("message", "128s")))
assert RECORD.size == 392, RECORD.size


def grpc_version(gb: GoBinary) -> str:
    """The grpc-go module version linked in; ProbeUnavailable when it is not pinned by a version."""
    v = gb.modules.get(MODULE, "")
    if not v or v == "(devel)":
        raise ProbeUnavailable(f"{MODULE} has no module version in the build info (replaced by a directory?)")
    if version_key(v) < version_key("v1.40.0"):
        raise ProbeUnavailable(f"{MODULE} {v} is older than v1.40.0, the oldest release traced")
    return v


class GrpcServer(Probe):
    name, title, scope, source = "grpc_server", "gRPC server", MODULE, BPF_SOURCE
    hooks = (
        Hook(HANDLE_STREAM, "uprobe_grpc_handleStream", required=True),
        Hook(OPERATE_HEADERS, "uprobe_grpc_operateHeaders", required=True),
    )   # the status writer: extra_points (its name changed in grpc 1.69)
    offsets = OFFSETS
    record = RECORD
    context = "writes"

    def binary_offsets(self, gb: GoBinary) -> tuple[Offset, ...]:
        v = version_key(grpc_version(gb))
        extra = []
        if v >= version_key(STREAM_BY_POINTER):
            extra.append(Offset("SS_STREAM_POS", f"{TRANSPORT}.ServerStream", "Stream", None, strict=True))
        if v >= version_key(PEER_FIELD):
            extra += [Offset("PEER_POS", f"{TRANSPORT}.http2Server", "peer", None, strict=True),
                      Offset("PEER_ADDR_POS", f"{MODULE}/peer.Peer", "Addr", None, strict=True),
                      Offset("PEER_LOCALADDR_POS", f"{MODULE}/peer.Peer", "LocalAddr", None, strict=True)]
        else:
            extra += [Offset("REMOTE_ADDR_POS", f"{TRANSPORT}.http2Server", "remoteAddr", None, strict=True),
                      Offset("LOCAL_ADDR_POS", f"{TRANSPORT}.http2Server", "localAddr", None, strict=True)]
        return (*OFFSETS, *extra)

    def constants(self, gb: GoBinary, build: Build) -> list[str]:
        v = version_key(grpc_version(gb))
        off = offset_flags(gb, self.binary_offsets(gb))
        flags = [f"-DOPH_FRAME_ARG={4 if v >= version_key(PEER_FIELD) else 2}",
                 f"-DHF_SIZE={off['HF_SENSITIVE_POS'] + 8}"]
        if v >= version_key(STREAM_BY_POINTER):
            flags.append(f"-DSTREAM_MODE={2 if v >= version_key(STREAM_BY_VALUE) else 1}")
        else:
            flags += ["-DSTREAM_MODE=0", "-DSS_STREAM_POS=0"]
        if v >= version_key(PEER_FIELD):
            flags += [f"-DREMOTE_ADDR_POS={off['PEER_POS'] + off['PEER_ADDR_POS']}",
                      f"-DLOCAL_ADDR_POS={off['PEER_POS'] + off['PEER_LOCALADDR_POS']}"]
        remote_local = ((off["PEER_POS"] + off["PEER_ADDR_POS"], off["PEER_POS"] + off["PEER_LOCALADDR_POS"])
                        if v >= version_key(PEER_FIELD) else (off["REMOTE_ADDR_POS"], off["LOCAL_ADDR_POS"]))
        if remote_local[1] != remote_local[0] + 16:
            raise ProbeUnavailable(f"grpc {grpc_version(gb)}: http2Server's remote and local address are not "
                                   "adjacent as in every known release")
        ends = [off[c] for c in ("STREAM_ID_POS", "STREAM_CTX_POS", "STREAM_METHOD_POS")]
        flags.append(f"-DSTREAM_BLOCK_LEN={max(ends) + 16}")
        flags.append(f"-DITAB_TCPADDR={itab_symbol(gb, ITAB_TCPADDR)}ULL")
        return flags

    def extra_points(self, gb: GoBinary, build: Build) -> list[tuple[int, str]]:
        writer = status_writer(gb)
        return [(gb.entry_probe(writer).addr, "uprobe_grpc_writeStatus")]

    def report(self, gb: GoBinary) -> dict[str, Any]:
        try:
            (addr, program), = self.extra_points(gb, Build("", 0, 0))
        except ProbeUnavailable as e:
            return {"end": {"mode": "", "points": [], "reason": str(e)}}
        return {"end": {"mode": "emulated", "points": [{"addr": addr, "program": program}],
                        "reason": f"entry of {status_writer(gb)}"}}

    def binary_state(self, gb: GoBinary, build: Build) -> StreamKeys:
        return StreamKeys()

    def spans(self, records: list[Any], state: Any, gb: GoBinary, mono_to_unix: int,
              build: Build) -> list[tuple[int, Span]]:
        state.h2_streams.clear()
        return to_spans(records, mono_to_unix, state.h2_streams)


@dataclass
class StreamKeys:
    """For the last `spans()` call: span id -> (client end address, client end port, server port,
    HTTP/2 stream id), what the stitcher joins gRPC client and server spans on (propagation/stitch.py)."""

    h2_streams: dict[bytes, tuple[str, int, int, int]] = field(default_factory=dict)


def status_writer(gb: GoBinary) -> str:
    for name in WRITE_STATUS:
        if gb.function(name) is not None:
            return name
    raise ProbeUnavailable(f"neither {WRITE_STATUS[0]} nor its older name WriteStatus is in the binary")


PROBE = GrpcServer()


def cflags(binary: GoBinary, *, pin_dir: str, max_inflight: int = 4096, ringbuf_pages: int = 64,
           ctx_readers: bool = True) -> list[str]:
    """The -D constants of grpc_server.c for this binary (tests and benchmarks compile it themselves)."""
    return include_flags(PROBE) + PROBE.cflags(binary, Build(pin_dir, max_inflight, ringbuf_pages, ctx_readers=ctx_readers))


# ---- records to spans

def split_method(full: str) -> tuple[str, str, str]:
    """`/pkg.Service/Method` -> (span name, rpc.service, rpc.method); a name without a service keeps it whole."""
    m = full[1:] if full.startswith("/") else full
    service, sep, method = m.rpartition("/")
    if not sep:
        return m or "grpc", "", m
    return m, service, method


def ip_text(raw: bytes, n: int) -> str:
    if n == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    if n == 16:
        a = ipaddress.IPv6Address(raw[:16])
        return str(a.ipv4_mapped) if a.ipv4_mapped else str(a)
    return ""


_METHOD_MEMO: dict[bytes, tuple[str, dict[str, Any]]] = {}
_ADDR_MEMO: dict[tuple[bytes, int], str] = {}
_MEMO_MAX = 4096


def method_attrs(raw: bytes) -> tuple[str, dict[str, Any]]:
    """(span name, the rpc.* attributes) of a method name, memoised (a server has few methods)."""
    hit = _METHOD_MEMO.get(raw)
    if hit is None:
        if len(_METHOD_MEMO) > _MEMO_MAX:
            _METHOD_MEMO.clear()
        name, service, method = split_method(raw.decode("utf-8", "replace"))
        attrs: dict[str, Any] = {"rpc.system": "grpc"}
        if service:
            attrs["rpc.service"] = service
        attrs["rpc.method"] = method
        hit = _METHOD_MEMO[raw] = (name, attrs)
    return hit


def ip_memo(raw: bytes, n: int) -> str:
    """ip_text, memoised: a process talks to few addresses, and parsing one costs ~0.8 µs, a lookup ~0.1."""
    key = (raw, n)
    text = _ADDR_MEMO.get(key)
    if text is None:
        if len(_ADDR_MEMO) > _MEMO_MAX:
            _ADDR_MEMO.clear()
        text = _ADDR_MEMO[key] = ip_text(raw, n)
    return text


def to_spans(records: list[tuple[Any, ...]], mono_to_unix_ns: int,
             streams: dict[bytes, tuple[str, int, int, int]] | None = None) -> list[tuple[int, Span]]:
    """Decoded records -> [(pid, span)]; each span's stream key into `streams` when given."""
    out: list[tuple[int, Span]] = []
    for (_kind, tgid, start, end, _g, trace_id, span_id, parent, flags, remote, code, method_len, message_len,
         peer_ip, peer_port, peer_n, local_ip, local_port, local_n, stream_id, method_b, message_b) in records:
        name, rpc = method_attrs(method_b[:method_len])
        attrs = dict(rpc)
        attrs["rpc.grpc.status_code"] = code
        if local_n:
            attrs["server.address"] = ip_memo(local_ip, local_n)
            attrs["server.port"] = local_port
        if peer_n:
            peer = attrs["network.peer.address"] = ip_memo(peer_ip, peer_n)
            attrs["network.peer.port"] = peer_port
            if streams is not None and stream_id and local_n:
                streams[span_id] = (peer, peer_port, local_port, stream_id)
        fault = code in SERVER_FAULT_CODES
        span = make_span(trace_id, span_id, name, parent if remote else b"", KIND_SERVER,
                         start + mono_to_unix_ns, end + mono_to_unix_ns, attrs,
                         STATUS_ERROR if fault else STATUS_UNSET, (flags & 0xFF) | 0x100 | (0x200 if remote else 0))
        if fault and message_len:
            span.status_message = message_b[:message_len].decode("utf-8", "replace")
        out.append((tgid, span))
    return out
