"""net/http server spans: one SERVER span per request handled by a Go net/http server.

BPF side: nethttp_server.c beside this file. `PROBE` declares what is hooked, the offsets and the
record (probes/spec.py); this module adds the constants of its own, the span end points
(`end_plan`) and turns ring-buffer records into spans (`to_spans`).

Hooked: `net/http.serverHandler.ServeHTTP(sh, rw ResponseWriter, req *Request)`, every HTTP/1.x
and HTTP/2 request of every `http.Server` goes through it once. Entry at the jcc after the stack
check (emulated, ~0.6 µs). The end, per binary (`end_plan`): where every HTTP server path linked in
has one, at points the kernel emulates ("emulated": the first emulated instruction after the call
of ServeHTTP in `(*conn).serve`, and the entry jcc of each HTTP/2 server's
`(*responseWriter).handlerDone`); otherwise at every RET of ServeHTTP ("ret": single-stepped,
~9 µs on the test VMs).
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collector.spans import KIND_SERVER, STATUS_ERROR, STATUS_UNSET, Span, make_span
from collector.telemetry import LOG_NAME

from ...gobinary import GoBinary
from ...gobinary.gomaps import header_map_flags
from ..routes import chi_route, route_flags, route_plans, route_points, route_report
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

BPF_SOURCE = Path(__file__).resolve().with_name("nethttp_server.c")
SYMBOL = "net/http.serverHandler.ServeHTTP"
CONN_SERVE = "net/http.(*conn).serve"
# HTTP/2 servers: bundled in net/http (Go <= 1.26), net/http/internal/http2 (Go >= 1.27),
# golang.org/x/net/http2 (http2.ConfigureServer); the handler goroutine runs runHandler.
H2_RUN_HANDLER = re.compile(r"^(?P<pkg>.*)\.\(\*(?P<pfx>http2)?serverConn\)\.runHandler$")
END_MODES = ("auto", "emulated", "ret")
END_MODE = "auto"  # what attach() uses unless told; tests and benchmarks set "ret" to compare

log = logging.getLogger(f"{LOG_NAME}.receiver.ebpf_go.net_http_server")  # in the collector's log tree
EVENT_KIND_HTTP_SERVER = 1
SCOPE_NAME = "net/http"

# (constant, struct, field, fallback offset when neither DWARF nor the table knows it)
OFFSETS = (
    Offset("REQ_METHOD_POS", "net/http.Request", "Method", 0),
    Offset("REQ_URL_POS", "net/http.Request", "URL", 16),
    Offset("REQ_PROTO_MAJOR_POS", "net/http.Request", "ProtoMajor", 40),
    Offset("REQ_PROTO_MINOR_POS", "net/http.Request", "ProtoMinor", 48),
    Offset("REQ_HEADER_POS", "net/http.Request", "Header", 56),
    Offset("REQ_HOST_POS", "net/http.Request", "Host", 128),
    Offset("REQ_REMOTEADDR_POS", "net/http.Request", "RemoteAddr", 176),
    Offset("REQ_TLS_POS", "net/http.Request", "TLS", 208),
    Offset("REQ_CTX_POS", "net/http.Request", "ctx", None),
    Offset("URL_PATH_POS", "net/url.URL", "Path", 56),
    Offset("RESP_STATUS_POS", "net/http.response", "status", None),
)
# ---- events: struct http_server_event in nethttp_server.c, checked field by field at compile time.

RECORD = Record("http_server_event", (
    *HEADER, *TRACE_CTX, Field("status", "Q"), Field("method_len", "B"), Field("method_off", "B"),
    Field("path_len", "H"), Field("remote_len", "H"), Field("host_len", "H"), Field("pattern_len", "H"),
    Field("ua_len", "H"), Field("proto_major", "B"), Field("proto_minor", "B"), Field("tls", "B"), Field("route_join", "B"),
    Field("method", "16s"), Field("path", "128s"), Field("remote", "64s"), Field("host", "128s"),
    Field("pattern", "128s"), Field("user_agent", "128s")))
EVENT = RECORD.layout
assert EVENT.size == 688, EVENT.size

# HTTP/2 status (rw.rws.status), optional: -1 when unknown (no status on HTTP/2 spans then).
# One program serves every HTTP/2 server linked in (std's, golang.org/x/net/http2's): it reads the
# status only if all of them agree on both offsets.
H2_SERVERS = {  # runHandler's package -> (responseWriter type, responseWriterState type)
    "net/http": ("net/http.http2responseWriter", "net/http.http2responseWriterState"),
    "net/http/internal/http2": ("net/http/internal/http2.responseWriter",
                                "net/http/internal/http2.responseWriterState"),
    "golang.org/x/net/http2": ("golang.org/x/net/http2.responseWriter", "golang.org/x/net/http2.responseWriterState"),
}


class NetHttpServer(Probe):
    name, title, scope, source = "net_http_server", "net/http server", SCOPE_NAME, BPF_SOURCE
    hooks = (Hook(SYMBOL, "uprobe_server_ServeHTTP", required=True),)   # the end: extra_points
    offsets = OFFSETS
    context = "writes"
    end_mode = END_MODE   # tests and benchmarks set "ret" or "emulated" to compare

    record = RECORD

    def constants(self, gb: GoBinary, build: Build) -> list[str]:
        values = offset_flags(gb, OFFSETS)
        flags = []
        pattern = gb.struct_offset("net/http.Request", "Pattern")
        pat = gb.struct_offset("net/http.Request", "pat")
        pat_str = gb.struct_offset("net/http.pattern", "str")
        if pattern is not None:
            flags += ["-DPATTERN_MODE=2", f"-DREQ_PATTERN_POS={pattern.value}"]
        elif pat is not None and gb.go_version_tuple >= (1, 22, 0):
            flags += ["-DPATTERN_MODE=1", f"-DREQ_PAT_POS={pat.value}",
                      f"-DPATTERN_STR_POS={pat_str.value if pat_str is not None else 0}"]
        else:
            flags += ["-DPATTERN_MODE=0"]
        # The Request fields read at the end (string: 16 bytes, int/pointer: 8), in one block read.
        ends = [values[c] + 16 for c in ("REQ_METHOD_POS", "REQ_HOST_POS", "REQ_REMOTEADDR_POS")]
        ends += [values[c] + 8 for c in ("REQ_URL_POS", "REQ_PROTO_MAJOR_POS", "REQ_PROTO_MINOR_POS", "REQ_TLS_POS")]
        if pattern is not None:
            ends.append(pattern.value + 16)
        elif pat is not None:
            ends.append(pat.value + 8)
        flags.append(f"-DREQ_BLOCK_LEN={max(ends)}")
        flags.append(f"-DREQ_ENTRY_LEN={max(values['REQ_HEADER_POS'] + 8, values['REQ_CTX_POS'] + 16)}")
        for const, value in zip(("H2_RWS_POS", "H2_STATUS_POS"), h2_status_offsets(gb), strict=True):
            flags.append(f"-D{const}={value}")
        return flags + header_map_flags(gb) + route_flags(route_plans(gb))

    def extra_points(self, gb: GoBinary, build: Build) -> list[tuple[int, str]]:
        plan = end_plan(gb, self.end_mode)
        if _first_time(gb, f"end {plan.mode}"):
            if plan.mode == "ret":
                log.info("net/http server: %s: span end at every RET of ServeHTTP (%s)", gb.path, plan.reason)
            else:
                log.info("net/http server: %s: span end at emulated points (%d)", gb.path, len(plan.points))
        plans = route_plans(gb)
        for r in plans:
            if _first_time(gb, f"routes {r.source.framework}"):
                if r.addr:
                    log.info("net/http server: %s: routes of %s %s", gb.path, r.source.framework, r.version or "")
                else:
                    log.warning("net/http server: %s: %s %s found, its routes are not read (spans keep the "
                                "method-only name): %s", gb.path, r.source.framework, r.version or "", r.reason)
        return plan.points + route_points(plans)

    def report(self, gb: GoBinary) -> dict[str, Any]:
        return {"end": end_report(gb), "routes": route_report(route_plans(gb))}

    def spans(self, records: list[Any], state: Any, gb: GoBinary, mono_to_unix: int,
              build: Build) -> list[tuple[int, Span]]:
        return to_spans(records, mono_to_unix)


PROBE = NetHttpServer()


def cflags(binary: GoBinary, *, pin_dir: str, max_inflight: int = 4096, ringbuf_pages: int = 64,
           ctx_readers: bool = True) -> list[str]:
    """The -D constants of nethttp_server.c for this binary (tests and benchmarks compile it themselves)."""
    return include_flags(PROBE) + PROBE.cflags(binary, Build(pin_dir, max_inflight, ringbuf_pages, ctx_readers=ctx_readers))


def h2_status_offsets(binary: GoBinary) -> tuple[int, int]:
    """(responseWriter.rws, responseWriterState.status) shared by every HTTP/2 server in the binary;
    (-1, -1) when one is unknown or they differ (HTTP/2 spans then carry no status, as before)."""
    seen: set[tuple[int, int]] = set()
    for name in binary.functions():
        m = H2_RUN_HANDLER.match(name)
        if m is None:
            continue
        types = H2_SERVERS.get(m["pkg"])
        if types is None:
            return -1, -1
        rws, status = binary.struct_offset(types[0], "rws"), binary.struct_offset(types[1], "status")
        if rws is None or status is None:
            return -1, -1
        seen.add((rws.value, status.value))
    return seen.pop() if len(seen) == 1 else (-1, -1)


def present(binary: GoBinary) -> bool:
    return PROBE.present(binary)


@dataclass(frozen=True)
class EndPlan:
    """Where the server span ends in one binary: mode "emulated" or "ret", the points, and why."""
    mode: str
    points: list[tuple[int, str]]  # (address, BPF function)
    reason: str


# What was logged about each binary (the binary, not its path: that is /proc/<pid>/exe of whichever
# process brought it), so that a binary's plan is said once however many processes run it.
_LOGGED: weakref.WeakKeyDictionary[GoBinary, set[str]] = weakref.WeakKeyDictionary()


def _first_time(gb: GoBinary, what: str) -> bool:
    said = _LOGGED.setdefault(gb, set())
    if what in said:
        return False
    said.add(what)
    return True


def end_plan(binary: GoBinary, mode: str = "auto") -> EndPlan:
    """Choose the end points for this binary. "emulated" needs, for HTTP/1.x, an emulated
    instruction reached straight after the call of ServeHTTP in `(*conn).serve`, and for every
    HTTP/2 server linked in, its `(*responseWriter).handlerDone` as a function with a cheap (jcc)
    entry that runHandler's deferred function calls. Otherwise every RET of ServeHTTP ("ret").
    `mode` "ret" forces the RETs (benchmarks, comparisons); "emulated" fails if impossible."""
    if mode not in END_MODES:
        raise ValueError(f"end mode {mode!r}: one of {END_MODES}")
    if binary.function(SYMBOL) is None:
        raise ProbeUnavailable(f"{SYMBOL} not in the binary (no net/http server)")
    rets = binary.return_sites(SYMBOL)
    ret_plan = EndPlan("ret", [(a, "uprobe_server_ServeHTTP_return") for a in rets], "")
    why = _emulated_points(binary) if mode != "ret" else "forced"
    if isinstance(why, list):
        return EndPlan("emulated", why, "HTTP/1.x after the call in (*conn).serve; HTTP/2 at handlerDone")
    if mode == "emulated":
        raise ProbeUnavailable(f"no emulated end point: {why}")
    if not rets:
        raise ProbeUnavailable(f"no RET found in {SYMBOL} and no emulated end point ({why}): not attaching")
    return EndPlan("ret", ret_plan.points, why)


def _emulated_points(binary: GoBinary) -> list[tuple[int, str]] | str:
    """The emulated end points, or why there are none."""
    if binary.arch != "amd64":
        return f"{binary.arch}: not implemented"
    h1 = binary.point_after_call(CONN_SERVE, SYMBOL)
    if not h1.addr:
        return f"HTTP/1.x: {h1.reason}"
    points = [(h1.addr, "uprobe_server_end_h1")]
    for name in sorted(binary.functions()):
        m = H2_RUN_HANDLER.match(name)
        if m is None:
            continue
        done = f"{m['pkg']}.(*{'http2' if m['pfx'] else ''}responseWriter).handlerDone"
        done_fn = binary.function(done)
        if done_fn is None:
            return f"HTTP/2 server {m['pkg']}: no function {done} (inlined?)"
        callers = [c for c in (f"{name}.func{k}" for k in range(1, 4)) if binary.function(c) is not None]
        if not any(i.mnemonic == "call" and i.op_str == hex(done_fn.start)
                   for c in callers for i in binary.instructions(c)):
            return f"HTTP/2 server {m['pkg']}: handlerDone is not called from runHandler's deferred function"
        ep = binary.entry_probe(done)
        if ep.kind != "jcc-after-stack-check":
            return f"HTTP/2 server {m['pkg']}: handlerDone has no cheap entry ({ep.reason})"
        points.append((ep.addr, "uprobe_server_end_h2"))
    return points


def end_report(binary: GoBinary) -> dict[str, Any]:
    """`inspect`'s view of `end_plan` (mode None: the probe would not attach)."""
    try:
        plan = end_plan(binary, END_MODE)
    except ProbeUnavailable as e:
        return {"mode": None, "points": [], "reason": str(e)}
    return {"mode": plan.mode, "points": [{"addr": a, "program": f} for a, f in plan.points], "reason": plan.reason}


def attach(bpf: Any, binary: GoBinary, path: str, pid: int = -1, end: str | None = None) -> list[tuple[int, str]]:
    """Attach the entry probe and the end points (`end_plan`, `end` forcing a mode); [(address, BPF function)]."""
    probe = PROBE if end is None else _with_end(end)
    return probe.attach(bpf, binary, path, pid, Build("", 0, 0))


def _with_end(end: str) -> NetHttpServer:
    p = NetHttpServer()
    p.end_mode = end
    return p


KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def split_host_port(text: str) -> tuple[str, int | None]:
    """"host:port", "[v6]:port", "host" (Go's net.SplitHostPort, lenient)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    return host, (int(port) if port.isdigit() and int(port) <= 65535 else None)


def route_of(pattern: str) -> str:
    """ServeMux pattern "[METHOD ][HOST]/path" -> the path part ("GET /items/{id}" -> "/items/{id}")."""
    i = pattern.find("/")
    return pattern[i:] if i >= 0 else ""


_MEMO_MAX = 4096


def _bounded(memo: dict[Any, Any]) -> dict[Any, Any]:
    if len(memo) > _MEMO_MAX:
        memo.clear()
    return memo


# Per-value memos of the hot path: a server sees few distinct methods, patterns, hosts, peers and
# user agents, so each raw byte string is decoded and parsed once (bounded: cleared past _MEMO_MAX).
# _SHAPE_MEMO holds, per request "shape" (status, protocol, TLS, method, host, pattern, user agent),
# the name, the status and the attributes in three parts around the per-request url.path and peer.
_SHAPE_MEMO: dict[tuple[Any, ...], tuple[str, int, dict[str, Any], dict[str, Any], dict[str, Any]]] = {}
_HOSTPORT_MEMO: dict[bytes, tuple[str, int | None]] = {}
_TEXT_MEMO: dict[bytes, str] = {}


def _name_attrs(method_b: bytes, pattern_b: bytes, route_join: int = 0) -> tuple[str, dict[str, Any]]:
    method = method_b.decode("utf-8", "replace")
    route = route_of(pattern_b.decode("utf-8", "replace")) if pattern_b else ""
    if route_join:
        route = chi_route(route)
    attrs: dict[str, Any] = {}
    if method in KNOWN_METHODS:
        attrs["http.request.method"] = method
        name = f"{method} {route}" if route else method
    else:
        attrs["http.request.method"] = "_OTHER"
        attrs["http.request.method_original"] = method
        name = f"HTTP {route}" if route else "HTTP"
    if route:
        attrs["http.route"] = route
    return name, attrs


def _shape(status: int, major: int, minor: int, tls: int, method_b: bytes, host_b: bytes, pattern_b: bytes,
           route_join: int, ua_b: bytes) -> tuple[str, int, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(name, span status code, attributes before url.path, between url.path and the peer, after)."""
    name, head = _name_attrs(method_b, pattern_b, route_join)
    mid: dict[str, Any] = {"url.scheme": "https" if tls else "http"}
    if major == 1 and status == 0:
        status = 200  # the handler wrote nothing: net/http answers 200 after ServeHTTP returns
    if 100 <= status <= 599:
        mid["http.response.status_code"] = status
    if host_b:
        host, port = _host_port(host_b)
        mid["server.address"] = host
        if port is not None:
            mid["server.port"] = port
    tail: dict[str, Any] = {
        "network.protocol.version": ("1.1" if minor == 1 else f"1.{minor}") if major == 1 else str(major)}
    if ua_b:
        tail["user_agent.original"] = _text(ua_b)
    return name, STATUS_ERROR if 500 <= status <= 599 else STATUS_UNSET, head, mid, tail


def _host_port(raw: bytes) -> tuple[str, int | None]:
    hp = _HOSTPORT_MEMO.get(raw)
    if hp is None:
        hp = _bounded(_HOSTPORT_MEMO)[raw] = split_host_port(raw.decode("utf-8", "replace"))
    return hp


def _text(raw: bytes) -> str:
    t = _TEXT_MEMO.get(raw)
    if t is None:
        t = _bounded(_TEXT_MEMO)[raw] = raw.decode("utf-8", "replace")
    return t


def to_spans(records: list[tuple[Any, ...]], mono_to_unix_ns: int) -> list[tuple[int, Span]]:
    """Decoded records -> [(pid, span)]. One plain loop: this is the hot path (memoised per value)."""
    out: list[tuple[int, Span]] = []
    append = out.append
    shapes, texts, peers = _SHAPE_MEMO, _TEXT_MEMO, _HOSTPORT_MEMO
    new_span = make_span
    for (_kind, tgid, start, end, _g, trace_id, span_id, parent, flags, remote, status,
         method_len, mo, path_len, remote_len, host_len, pattern_len, ua_len, major, minor, tls,
         route_join, method_b, path_b, remote_b, host_b, pattern_b, ua_b) in records:
        key = (status, major, minor, tls, method_b[mo:mo + method_len], host_b[:host_len],
               pattern_b[:pattern_len], route_join, ua_b[:ua_len])
        shape = shapes.get(key)
        if shape is None:
            shape = _bounded(shapes)[key] = _shape(*key)
        name, status_code, head, mid, tail = shape
        attrs = head.copy()
        raw = path_b[:path_len]
        text = texts.get(raw)
        attrs["url.path"] = text if text is not None else _text(raw)
        attrs.update(mid)
        if remote_len:
            raw = remote_b[:remote_len]
            hp = peers.get(raw)
            peer, pport = hp if hp is not None else _host_port(raw)
            attrs["network.peer.address"] = peer
            if pport is not None:
                attrs["network.peer.port"] = pport
        attrs.update(tail)
        append((tgid, new_span(trace_id, span_id, name, parent if remote else b"", KIND_SERVER,
                               start + mono_to_unix_ns, end + mono_to_unix_ns, attrs, status_code,
                               (flags & 0xFF) | 0x100 | (0x200 if remote else 0))))
    return out
