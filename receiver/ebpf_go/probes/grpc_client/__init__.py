"""gRPC client spans: one CLIENT span per call (unary or streaming) made by grpc-go.

BPF side: grpc_client.c beside this file, which says what each hook reads. Hooked (entries only,
each at the emulated jcc after the stack check): `grpc.newClientStream` (start, parent from the
call's context), `grpc.(*clientStream).newAttemptLocked` (binds the call to its stream),
`grpc.(*clientStream).finish` (end and final error).

Span (semantic conventions v1.37): name `{rpc.service}/{rpc.method}`, kind CLIENT, attributes
`rpc.system=grpc`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, `server.address` and
`server.port` from the ClientConn's target; status Error for every code but OK, with the status
message as description.

The code of a failed call: finish's error is a `*status.Error` for everything grpc-go reports
(server statuses, deadlines, cancellations, connection failures); its itab is found once per binary
as the one `(*status.Status).Err` returns (gobinary/itabs.py, works on stripped binaries). Another
error type is UNKNOWN, as `status.Code(err)` says, but io.EOF (a stream's normal end, which finish
turns into success) is OK: recognised by its text, since its pointer is only known at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.spans import KIND_CLIENT, STATUS_ERROR, STATUS_UNSET, Span, make_span

from ...gobinary import GoBinary
from ...gobinary.itabs import itab_symbol, load_bias, returned_itab
from ...gobinary.offsets import version_key
from ..grpc_server import (
    ATTEMPT_RENAMED,
    ITAB_TCPADDR,
    MODULE,
    STREAM_BY_POINTER,
    STREAM_BY_VALUE,
    TRANSPORT,
    grpc_version,
    ip_memo,
    method_attrs,
)
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

BPF_SOURCE = Path(__file__).resolve().with_name("grpc_client.c")
NEW_CLIENT_STREAM = f"{MODULE}.newClientStream"
NEW_ATTEMPT = f"{MODULE}.(*clientStream).newAttemptLocked"
FINISH = f"{MODULE}.(*clientStream).finish"
STATUS_ERR = "google.golang.org/grpc/internal/status.(*Status).Err"
CODE_UNKNOWN = 2
CODE_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")

OFFSETS = (
    Offset("CC_TARGET_POS", f"{MODULE}.ClientConn", "target", None, strict=True),
    Offset("STATUS_ERROR_S_POS", "google.golang.org/grpc/internal/status.Error", "s", 0),
    Offset("STATUS_S_POS", "google.golang.org/grpc/internal/status.Status", "s", 0),
    Offset("SPB_CODE_POS", "google.golang.org/genproto/googleapis/rpc/status.Status", "Code", 40),
    Offset("SPB_MESSAGE_POS", "google.golang.org/genproto/googleapis/rpc/status.Status", "Message", 48),
)

RECORD = Record("grpc_client_event", (
    *HEADER, *TRACE_CTX, Field("err_tab", "Q"), Field("code", "i"), Field("method_len", "H"),
    Field("target_len", "H"), Field("message_len", "H"), Field("parent_from_ctx", "B"), Field("eof", "B"),
    Field("stream_id", "I"),
    Field("local.ip", "16s"), Field("local.port", "H"), Field("local.ip_len", "B"), Field(None, "5x"),
    Field("peer.ip", "16s"), Field("peer.port", "H"), Field("peer.ip_len", "B"), Field(None, "5x"),
    Field("method", "128s"), Field("target", "128s"), Field("message", "128s")))
assert RECORD.size == 528, RECORD.size


def stream_offsets(gb: GoBinary) -> tuple[Offset, ...]:
    """What finish reads for the stitcher (the attempt's stream id, its connection's ends), by release."""
    v = version_key(grpc_version(gb))
    renamed = v >= version_key(ATTEMPT_RENAMED)
    out = [Offset("CS_ATTEMPT_POS", f"{MODULE}.clientStream", "attempt", None, strict=True),
           Offset("ATTEMPT_T_POS", f"{MODULE}.csAttempt", "transport" if renamed else "t", None, strict=True),
           Offset("ATTEMPT_S_POS", f"{MODULE}.csAttempt", "transportStream" if renamed else "s", None, strict=True),
           Offset("STREAM_ID_POS", f"{TRANSPORT}.Stream", "id", None, strict=True),
           Offset("H2C_LOCALADDR_POS", f"{TRANSPORT}.http2Client", "localAddr", None, strict=True),
           Offset("H2C_REMOTEADDR_POS", f"{TRANSPORT}.http2Client", "remoteAddr", None, strict=True),
           Offset("TCPADDR_IP_POS", "net.TCPAddr", "IP", 0),
           Offset("TCPADDR_PORT_POS", "net.TCPAddr", "Port", 24)]
    if v >= version_key(STREAM_BY_POINTER):
        out.append(Offset("CS_STREAM_POS", f"{TRANSPORT}.ClientStream", "Stream", None, strict=True))
    return tuple(out)


@dataclass
class ClientState:
    """Per binary: the ELF address of the *status.Error itab, and per process its run-time address."""

    status_itab: int
    by_pid: dict[int, int]
    h2_streams: dict[bytes, tuple[str, int, int, int]] = field(default_factory=dict)   # as StreamKeys


class GrpcClient(Probe):
    name, title, scope, source = "grpc_client", "gRPC client", f"{MODULE}/client", BPF_SOURCE
    hooks = (
        Hook(NEW_CLIENT_STREAM, "uprobe_grpc_newClientStream", required=True),
        Hook(NEW_ATTEMPT, "uprobe_grpc_newAttemptLocked", required=True),
        Hook(FINISH, "uprobe_grpc_finish", required=True),
    )
    offsets = OFFSETS
    record = RECORD
    context = "reads"

    def binary_offsets(self, gb: GoBinary) -> tuple[Offset, ...]:
        return (*self.offsets, *stream_offsets(gb))   # a release older than the oldest traced is off first

    def constants(self, gb: GoBinary, build: Build) -> list[str]:
        if status_error_itab(gb) == 0:
            raise ProbeUnavailable(f"cannot find the *status.Error itab in {STATUS_ERR}: status codes would be guessed")
        v = version_key(grpc_version(gb))
        mode = 0 if v < version_key(STREAM_BY_POINTER) else 1 if v < version_key(STREAM_BY_VALUE) else 2
        flags = ["-DCS_STREAM_POS=0"] if mode == 0 else []
        off = offset_flags(gb, stream_offsets(gb))
        t, s_, remote, local = (off[c] for c in ("ATTEMPT_T_POS", "ATTEMPT_S_POS", "H2C_REMOTEADDR_POS",
                                                 "H2C_LOCALADDR_POS"))
        if not (0 <= t < s_ <= t + 64 and local == remote + 16):
            raise ProbeUnavailable(f"grpc {grpc_version(gb)}: csAttempt or http2Client laid out unlike every "
                                   "known release (transport before stream, remoteAddr then localAddr)")
        return [*flags, f"-DCLIENT_STREAM_MODE={mode}", f"-DITAB_TCPADDR={itab_symbol(gb, ITAB_TCPADDR)}ULL"]

    def binary_state(self, gb: GoBinary, build: Build) -> ClientState:
        return ClientState(status_error_itab(gb), {})

    def report(self, gb: GoBinary) -> dict[str, Any]:
        itab = status_error_itab(gb)
        return {"status error itab": f"{itab:#x}" if itab else "not found"}

    def spans(self, records: list[Any], state: Any, gb: GoBinary, mono_to_unix: int,
              build: Build) -> list[tuple[int, Span]]:
        out = []
        streams = state.h2_streams
        streams.clear()
        for r in records:
            tgid = r[1]
            itab = state.by_pid.get(tgid)
            if itab is None:
                itab = state.by_pid[tgid] = state.status_itab + load_bias(tgid, gb)
            out.append((tgid, to_span(r, itab, mono_to_unix, streams)))
        return out


PROBE = GrpcClient()


def status_error_itab(gb: GoBinary) -> int:
    """ELF address of the itab (*status.Error, error); 0 when it cannot be found."""
    return returned_itab(gb, STATUS_ERR)


def cflags(binary: GoBinary, *, pin_dir: str, max_inflight: int = 4096, ringbuf_pages: int = 64) -> list[str]:
    """The -D constants of grpc_client.c for this binary (tests and benchmarks compile it themselves)."""
    return include_flags(PROBE) + PROBE.cflags(binary, Build(pin_dir, max_inflight, ringbuf_pages))


_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:")
_TARGET_MEMO: dict[bytes, dict[str, Any]] = {}


def target_attrs(target: str) -> dict[str, Any]:
    """server.address / server.port of a gRPC target: `host:port`, `dns:///host:port`,
    `dns://resolver/host:port`, `passthrough:///host:port`, `[::1]:port`; `unix:` targets name the
    socket path as server.address."""
    t = target
    if t.startswith(("unix:", "unix-abstract:")):
        return {"server.address": t.split(":", 1)[1].removeprefix("//")}
    if _SCHEME.match(t) and "://" in t:
        t = t.split("://", 1)[1]
        t = t.split("/", 1)[1] if "/" in t else t          # drop the authority (a resolver's address)
    elif _SCHEME.match(t) and not re.match(r"^[^:]+:\d+$", t):
        t = t.split(":", 1)[1]
    host, port = t, None
    if t.startswith("["):
        end = t.find("]")
        host, rest = t[1:end], t[end + 1:]
        port = rest[1:] if rest.startswith(":") else None
    elif t.count(":") == 1:
        host, port = t.split(":")
    attrs: dict[str, Any] = {"server.address": host} if host else {}
    if port and port.isdigit() and int(port) <= 65535:
        attrs["server.port"] = int(port)
    return attrs


def to_span(r: tuple[Any, ...], status_itab: int, mono_to_unix_ns: int,
            streams: dict[bytes, tuple[str, int, int, int]] | None = None) -> Span:
    """One record -> its span; its stream key into `streams` when given (the stitcher's)."""
    (_kind, _tgid, start, end, _g, trace_id, span_id, parent, flags, _remote, err_tab, code, method_len,
     target_len, message_len, from_ctx, eof, stream_id, local_ip, local_port, local_n, peer_ip, peer_port, peer_n,
     method_b, target_b, message_b) = r
    name, rpc = method_attrs(method_b[:method_len])
    attrs = dict(rpc)
    message = ""
    if err_tab == 0 or (eof and err_tab != status_itab):
        code = 0      # nil, or io.EOF (finish treats it as success)
    elif err_tab != status_itab or not 0 <= code <= 16:
        code = CODE_UNKNOWN
    else:
        message = message_b[:message_len].decode("utf-8", "replace")
    attrs["rpc.grpc.status_code"] = code
    raw = bytes(target_b[:target_len])
    tattrs = _TARGET_MEMO.get(raw)
    if tattrs is None:
        if len(_TARGET_MEMO) > 4096:
            _TARGET_MEMO.clear()
        tattrs = _TARGET_MEMO[raw] = target_attrs(raw.decode("utf-8", "replace"))
    attrs.update(tattrs)
    if peer_n:
        attrs["network.peer.address"] = ip_memo(peer_ip, peer_n)
        attrs["network.peer.port"] = peer_port
        if streams is not None and stream_id and local_n:
            streams[span_id] = (ip_memo(local_ip, local_n), local_port, peer_port, stream_id)
    span = make_span(trace_id, span_id, name, parent if from_ctx else b"", KIND_CLIENT,
                     start + mono_to_unix_ns, end + mono_to_unix_ns, attrs,
                     STATUS_ERROR if code else STATUS_UNSET, (flags & 0xFF) | 0x100)
    if code:
        span.status_message = message or CODE_NAMES[code]
    return span
