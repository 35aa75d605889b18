"""stitch propagation: join client and server spans of processes on this host, in user space.

Needs nothing from the kernel, so it works wherever the uprobes do. A CLIENT span that called a
local address carries its connection's `network.local.address`/`network.local.port`; the SERVER
span of the process that answered carries the same pair as `network.peer.address`/
`network.peer.port`. Requests on one connection are sequential, so the server span whose start lies
within the client span's [start, end] on the same (address, port) is the one it caused.
A client span starts at `roundTrip` entry, before it has a connection: a request that waited for
the connection another request was using overlaps that request's server span too. Among the client
spans whose interval holds the server's start, the one that ENDS FIRST is the one that had the
connection then (the waiter only got it after that one ended, so its own server span starts later).

On a join the server's local trace (its trace id, which was random: the request carried no
`traceparent`) is mapped to the client's trace id, and the server span's parent becomes the client
span. Mappings chain (A -> B -> C: C's trace maps to B's, which maps to A's) and are resolved when
spans leave.

Only spans that could join wait: client spans to local addresses, and parentless server spans
from local peers. They wait `window_s` after arrival (so that both sides and the next hop have
arrived), at most `max_pending` of them (the oldest leave unchanged when full: `evicted`). Other
spans pass straight through, rewritten if their trace was already mapped, except the in-process
children of a trace whose root has not been seen yet: a child ends before its root, and had it left
then, a join of the root would leave it in the old trace. Those wait for the root above them to
leave (usually the same drain; at most `window_s`), then leave with its trace id. A span whose parent
is in another process (propagated by sk_msg within a trace the stitcher joins later) leaves at once
and keeps the old trace id: only the stitched hop's own subtree is rewritten.
The client end (address, port) alone is not unique: Linux gives the same local port to
connections to different servers (measured: a local upstream's connection to A and A's connection
to B shared 127.0.0.1:P under load, and joined wrongly). So the server span's `server.port` (from
its Host header) must also equal the client span's `network.peer.port` when both are known.
Outcomes are counted per server candidate and protocol:
`otelgo_ebpf_stitch_total{outcome=joined|unmatched|evicted, protocol=http/1.1|grpc}`.

gRPC (HTTP/2) needs no time window: one connection carries many calls at once, but each on its own
stream, and both ends read the stream id. The gRPC probes hand the receiver, beside their spans, the
key of each span's stream, `streams`: span id -> (client end address, client end port, server port,
stream id) (gRPC client: its connection's local end and the peer's port; gRPC server: its peer and its
own port). A server span joins the one client span with the same key (whose interval holds its
start: a guard against a reused connection tuple); none is chosen by time.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from collector.spans import (
    KIND_CLIENT,
    KIND_SERVER,
    Resource,
    ResourceSpans,
    Scope,
    ScopeSpans,
    Span,
    SpanBatch,
)

MAX_CHAIN = 16  # trace-id mapping hops resolved per span


def host_addresses() -> set[str]:
    """Addresses of this host: loopback plus every LOCAL entry of /proc/net/fib_trie and if_inet6."""
    out = {"127.0.0.1", "::1", "localhost"}
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
        for prev, line in zip(lines, lines[1:], strict=False):
            if "/32 host LOCAL" in line:
                out.add(prev.strip().split()[-1])
    except OSError:
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            h = line.split()[0]
            out.add(str(ipaddress.IPv6Address(bytes.fromhex(h))))
    except (OSError, ValueError, IndexError):
        pass
    return out


def _is_local(addr: Any, local: set[str]) -> bool:
    if not isinstance(addr, str) or not addr:
        return False
    if addr in local:
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


StreamKey = tuple[str, int, int, int]   # (client end address, client end port, server port, HTTP/2 stream id)


class _Held:
    __slots__ = ("arrived", "resource", "scope", "span", "role", "key")

    def __init__(self, arrived: float, resource: Resource, scope: Scope, span: Span, role: str,
                 key: tuple[Any, ...]) -> None:
        self.arrived = arrived
        self.resource = resource
        self.scope = scope
        self.span = span
        self.role = role  # "client" | "server"
        self.key = key    # (address, port) of the connection's client end; for HTTP/2 ("h2", *StreamKey)

    @property
    def protocol(self) -> str:
        return "grpc" if self.key[0] == "h2" else "http/1.1"


class Stitcher:
    """Holds join candidates, joins them, releases them after `window_s`. Thread-safe."""

    def __init__(self, *, window_s: float = 2.0, max_pending: int = 20000, local_addresses: set[str] | None = None,
                 count: Callable[[str, int, str], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_pending = max_pending
        self.local = local_addresses if local_addresses is not None else host_addresses()
        self._count = count or (lambda outcome, n, protocol: None)
        self._clock = clock
        self._held: OrderedDict[int, _Held] = OrderedDict()  # arrival order
        self._clients: dict[tuple[Any, ...], list[_Held]] = {}
        self._servers: dict[tuple[Any, ...], list[_Held]] = {}
        self._joined: set[int] = set()  # id() of server entries already joined
        # in-process children waiting for their trace's root: trace id -> [(arrived, resource, scope, span)]
        self._children: OrderedDict[bytes, list[tuple[float, Resource, Scope, Span]]] = OrderedDict()
        self._n_children = 0
        self._resolved: OrderedDict[bytes, float] = OrderedDict()   # traces whose root left: when
        self._trace_map: OrderedDict[bytes, tuple[bytes, float]] = OrderedDict()  # old -> (new, when)
        self._lock = threading.Lock()
        self.outcomes = {"joined": 0, "unmatched": 0, "evicted": 0}

    # ---- classification
    def _candidate(self, span: Span, streams: Mapping[bytes, StreamKey]) -> tuple[str, tuple[Any, ...]] | None:
        a = span.attributes
        sk = streams.get(span.span_id) if streams else None
        if sk is not None:
            if not sk[3] or not _is_local(sk[0], self.local):
                return None
            if span.kind == KIND_CLIENT:
                return "client", ("h2", _norm(sk[0]), *sk[1:])
            if span.kind == KIND_SERVER and not span.parent_span_id:
                return "server", ("h2", _norm(sk[0]), *sk[1:])
            return None
        if span.kind == KIND_CLIENT:
            port = a.get("network.local.port")
            if port and _is_local(a.get("network.peer.address", a.get("server.address")), self.local):
                return "client", (_norm(a.get("network.local.address", "")), int(port))
        elif span.kind == KIND_SERVER and not span.parent_span_id:
            port = a.get("network.peer.port")
            addr = a.get("network.peer.address")
            if port and _is_local(addr, self.local):
                return "server", (_norm(addr), int(port))
        return None

    # ---- pipeline side
    def process(self, batch: SpanBatch, settled: Collection[bytes] = (),
                streams: Mapping[bytes, StreamKey] | None = None) -> SpanBatch:
        """Keep the candidates of `batch`; return the rest (rewritten where already mapped) plus
        whatever is due to leave now. Client spans whose span id is in `settled` already
        propagated their context (sk_msg inserted `traceparent`): they pass without waiting.
        `streams`: the HTTP/2 stream key of gRPC spans, by span id (see the module doc)."""
        streams = streams or {}
        now = self._clock()
        passed: list[tuple[Resource, Scope, Span]] = []
        with self._lock:
            for rs, ss, span in batch.iter_spans():
                c = None if settled and span.span_id in settled else self._candidate(span, streams)
                if c is None:
                    if span.parent_span_id and span.flags & 0x300 == 0x100:   # an in-process child
                        if span.trace_id not in self._resolved:
                            self._hold_child(now, rs.resource, ss.scope, span)
                            continue
                    else:   # a root here (none or a remote parent) that leaves now: its subtree with it
                        self._root_left(span, now, passed)
                    passed.append((rs.resource, ss.scope, span))
                    continue
                h = _Held(now, rs.resource, ss.scope, span, c[0], c[1])
                self._held[id(h)] = h
                (self._clients if h.role == "client" else self._servers).setdefault(h.key, []).append(h)
                if h.role == "server":
                    self._try_join(h)
                else:
                    for s in list(self._servers.get(h.key, ())):
                        if id(s) not in self._joined:
                            self._try_join(s)
            while len(self._held) > self.max_pending:
                _, old = self._held.popitem(last=False)
                self._forget(old)
                if old.role == "server" and id(old) not in self._joined:
                    self._outcome("evicted", old.protocol)
                passed.append((old.resource, old.scope, old.span))
                if old.role == "server":   # the root of its local trace (parent set only by a join)
                    self._root_left(old.span, now, passed)
            while self._n_children > self.max_pending:
                _, kids = self._children.popitem(last=False)
                self._n_children -= len(kids)
                passed.extend((r, sc, sp) for _, r, sc, sp in kids)
            passed.extend(self._due(now, force=False))
            self._rewrite(passed)
            self._expire_map(now)
        return _batch(passed)

    def flush(self, force: bool = False) -> SpanBatch:
        """Spans due to leave (all of them with `force`, e.g. at shutdown)."""
        now = self._clock()
        with self._lock:
            out = self._due(now, force)
            self._rewrite(out)
            self._expire_map(now)
        return _batch(out)

    def pending(self) -> int:
        return len(self._held) + self._n_children

    # ---- internals (under the lock)
    def _try_join(self, server: _Held) -> None:
        st = server.span.start_time_unix_nano
        exact = server.key[0] == "h2"   # the key names the stream: no port or time guesswork
        want_port = None if exact else server.span.attributes.get("server.port")
        matches = [c for c in self._clients.get(server.key, ())
                   if c.span.start_time_unix_nano <= st <= c.span.end_time_unix_nano
                   and (want_port is None or c.span.attributes.get("network.peer.port") in (None, want_port))]
        if not matches:
            return  # none yet: a client span arriving later retries
        client = min(matches, key=lambda c: c.span.end_time_unix_nano).span  # see the module doc
        old = server.span.trace_id
        if old != client.trace_id:
            self._trace_map[old] = (client.trace_id, self._clock())
        server.span.parent_span_id = client.span_id
        self._joined.add(id(server))
        self._outcome("joined", server.protocol)

    def _hold_child(self, now: float, resource: Resource, scope: Scope, span: Span) -> None:
        self._children.setdefault(span.trace_id, []).append((now, resource, scope, span))
        self._n_children += 1

    def _root_left(self, root: Span, now: float, out: list[tuple[Resource, Scope, Span]]) -> None:
        """`root` leaves now (joined or not): the waiting children below it leave with it. Only its
        subtree: another root of the same trace (a hop propagated in process, e.g. an HTTP call a
        handler makes to its own server) leaves the children of the trace's own root waiting."""
        kids = self._children.get(root.trace_id)
        if not root.parent_span_id:
            self._resolved[root.trace_id] = now
            self._resolved.move_to_end(root.trace_id)
            if len(self._resolved) > 4 * self.max_pending:   # bounded: a late child then waits its window
                self._resolved.popitem(last=False)
        if not kids:
            return
        below: dict[bytes, list[tuple[float, Resource, Scope, Span]]] = {}
        for k in kids:
            below.setdefault(k[3].parent_span_id, []).append(k)
        released: list[tuple[float, Resource, Scope, Span]] = []
        todo = [root.span_id]
        while todo:
            for k in below.pop(todo.pop(), ()):
                released.append(k)
                todo.append(k[3].span_id)
        if not released:
            return
        left = [k for lst in below.values() for k in lst]
        if left:
            self._children[root.trace_id] = left
        else:
            del self._children[root.trace_id]
        self._n_children -= len(released)
        out.extend((r, sc, sp) for _, r, sc, sp in released)

    def _due(self, now: float, force: bool) -> list[tuple[Resource, Scope, Span]]:
        out: list[tuple[Resource, Scope, Span]] = []
        # children whose root never came (lost, or not traced) leave after the window, unchanged
        while self._children:
            tid, kids = next(iter(self._children.items()))
            if not force and now - kids[0][0] < self.window_s:
                break
            del self._children[tid]
            self._n_children -= len(kids)
            out.extend((r, sc, sp) for _, r, sc, sp in kids)
        while self._held:
            k, h = next(iter(self._held.items()))
            if not force and now - h.arrived < self.window_s:
                break
            del self._held[k]
            self._forget(h)
            if h.role == "server" and id(h) not in self._joined:
                self._outcome("unmatched", h.protocol)
            self._joined.discard(id(h))
            out.append((h.resource, h.scope, h.span))
            if h.role == "server":     # the root of its local trace, under its old trace id
                self._root_left(h.span, now, out)
        return out

    def _forget(self, h: _Held) -> None:
        idx = self._clients if h.role == "client" else self._servers
        lst = idx.get(h.key)
        if lst is not None:
            lst.remove(h)
            if not lst:
                del idx[h.key]

    def _rewrite(self, spans: Iterable[tuple[Resource, Scope, Span]]) -> None:
        if not self._trace_map:
            return
        m = self._trace_map
        for _, _, span in spans:
            t = span.trace_id
            hops = 0
            while t in m and hops < MAX_CHAIN:
                t = m[t][0]
                hops += 1
            span.trace_id = t

    def _expire_map(self, now: float) -> None:
        keep = 3 * self.window_s
        while self._resolved:
            _, when = next(iter(self._resolved.items()))
            if now - when < keep:
                break
            self._resolved.popitem(last=False)
        while self._trace_map:
            _, (_, when) = next(iter(self._trace_map.items()))
            if now - when < keep:
                break
            self._trace_map.popitem(last=False)

    def _outcome(self, name: str, protocol: str) -> None:
        self.outcomes[name] += 1
        self._count(name, 1, protocol)


def _norm(addr: Any) -> str:
    s = str(addr)
    if s.startswith("::ffff:"):
        return s[7:]
    return s


def _batch(items: list[tuple[Resource, Scope, Span]]) -> SpanBatch:
    """Regroup spans by (resource, scope) object identity."""
    out = SpanBatch()
    groups: dict[tuple[int, int], ScopeSpans] = {}
    by_res: dict[int, ResourceSpans] = {}
    for res, scope, span in items:
        key = (id(res), id(scope))
        ss = groups.get(key)
        if ss is None:
            rs = by_res.get(id(res))
            if rs is None:
                rs = ResourceSpans(res)
                by_res[id(res)] = rs
                out.resource_spans.append(rs)
            ss = ScopeSpans(scope)
            rs.scope_spans.append(ss)
            groups[key] = ss
        ss.spans.append(span)
    return out
