"""One module per instrumented library: which symbols it hooks, the -D constants of its BPF file in
bpf/, how it attaches, and how its ring-buffer records become spans.

- nethttp_server: `net/http.serverHandler.ServeHTTP` -> SERVER spans (bpf/nethttp_server.c)
- nethttp_client: `net/http.(*Transport).roundTrip` -> CLIENT spans (bpf/nethttp_client.c)
- database_sql: `database/sql` query/exec -> CLIENT spans (bpf/database_sql.c)

The modules keep their own signatures; the adapters below give the receiver one shape for all:
one compiled program per (binary, probe), attached per pid, read through one ring buffer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.spans import Span

from ..gobinary import GoBinary
from ..ringbuf import RingBuffer, split_block, unpack_block


@dataclass
class Common:
    """Settings every probe program gets."""

    pin_dir: str
    max_inflight: int
    ringbuf_pages: int
    skmsg: bool = False           # propagation sk_msg: the client probe hands traceparents to sk_msg
    probe_write: bool = False     # propagation probe_write: the client probe writes them itself
    include_db_statement: bool = False
    sanitize_db_statement: bool = True
    db_statement_max_length: int = 1024


class RawCollector:
    """Reads one ring buffer and keeps each record's bytes (for modules whose decode takes bytes)."""

    def __init__(self) -> None:
        self.ring: RingBuffer | None = None

    def bind(self, ring: RingBuffer) -> None:
        self.ring = ring

    def take(self) -> list[Any]:
        """The records committed since the last call, as one batch."""
        return self.ring.read() if self.ring is not None else []

    def decode(self, blocks: list[bytes]) -> list[Any]:
        """The records in blocks of `RingBuffer.read_block` (the receiver's copier), as `take` gives them."""
        return [r for block in blocks for r in split_block(block)]


class StructCollector(RawCollector):
    """Decodes each record in place with one precompiled Struct (no copy of the record)."""

    def __init__(self, layout: struct.Struct) -> None:
        super().__init__()
        self.layout = layout
        self.short = 0

    def take(self) -> list[Any]:
        if self.ring is None:
            return []
        records, short = self.ring.read_unpacked(self.layout)
        self.short += short
        return records

    def decode(self, blocks: list[bytes]) -> list[Any]:
        out: list[Any] = []
        for block in blocks:
            records, short = unpack_block(block, self.layout)
            self.short += short
            out.extend(records)
        return out


class Probe:
    """What the receiver needs of one instrumented library."""

    name = ""            # the key under `instrumentations:`
    scope = ""           # instrumentation scope, after "otelgo-collector/"
    ringbuf = "events"   # BPF map names in its C file
    lost_map = "lost"
    uses_propagation = False   # its program depends on the propagation mode (Common.skmsg/probe_write)

    @property
    def source(self) -> Path:
        raise NotImplementedError

    def present(self, gb: GoBinary) -> bool:
        raise NotImplementedError

    def cflags(self, gb: GoBinary, common: Common) -> list[str]:
        raise NotImplementedError

    def attach(self, bpf: Any, gb: GoBinary, path: str, pid: int, common: Common) -> Any:
        raise NotImplementedError

    def collector(self) -> RawCollector:
        return RawCollector()

    def binary_state(self, gb: GoBinary, common: Common) -> Any:
        """Per-binary data the span builder needs (computed once)."""
        return None

    def spans(self, records: list[Any], state: Any, gb: GoBinary, mono_to_unix: int,
              common: Common) -> list[tuple[int, Span]]:
        raise NotImplementedError


class NetHttpServer(Probe):
    name, scope = "net_http_server", "net/http"

    @property
    def source(self) -> Path:
        from . import nethttp_server
        return nethttp_server.BPF_SOURCE

    def present(self, gb: GoBinary) -> bool:
        from . import nethttp_server
        return nethttp_server.present(gb)

    def cflags(self, gb: GoBinary, common: Common) -> list[str]:
        from . import nethttp_server
        return nethttp_server.cflags(gb, pin_dir=common.pin_dir, max_inflight=common.max_inflight,
                                     ringbuf_pages=common.ringbuf_pages)

    def attach(self, bpf: Any, gb: GoBinary, path: str, pid: int, common: Common) -> Any:
        from . import nethttp_server
        return nethttp_server.attach(bpf, gb, path, pid)

    def collector(self) -> RawCollector:
        from . import nethttp_server
        return StructCollector(nethttp_server.EVENT)

    def spans(self, records: list[Any], state: Any, gb: GoBinary, mono_to_unix: int,
              common: Common) -> list[tuple[int, Span]]:
        from . import nethttp_server
        return nethttp_server.to_spans(records, mono_to_unix)


class NetHttpClient(Probe):
    name, scope, ringbuf, lost_map = "net_http_client", "net/http/client", "client_events", "client_lost"
    uses_propagation = True

    @property
    def source(self) -> Path:
        from . import nethttp_client
        return nethttp_client.BPF_SOURCE

    def present(self, gb: GoBinary) -> bool:
        from . import nethttp_client
        return gb.function(nethttp_client.ROUND_TRIP) is not None

    def cflags(self, gb: GoBinary, common: Common) -> list[str]:
        from . import nethttp_client
        return nethttp_client.cflags(gb, skmsg=common.skmsg, probe_write=common.probe_write, pin_dir=common.pin_dir,
                                     max_inflight=common.max_inflight, ringbuf_pages=common.ringbuf_pages)

    def attach(self, bpf: Any, gb: GoBinary, path: str, pid: int, common: Common) -> Any:
        from . import nethttp_client
        return nethttp_client.attach(bpf, gb, path, pid, probe_write=common.probe_write)

    def binary_state(self, gb: GoBinary, common: Common) -> Any:
        from . import nethttp_client
        return ClientState(nethttp_client.error_types(gb))

    def spans(self, records: list[Any], state: Any, gb: GoBinary, mono_to_unix: int,
              common: Common) -> list[tuple[int, Span]]:
        from . import nethttp_client
        out = []
        injected = state.injected
        injected.clear()
        outcomes = state.outcomes
        outcomes.clear()
        errs = state.error_types
        for raw in records:
            ev = nethttp_client.decode(raw)
            if ev.propagation == "injected":
                injected.add(ev.span_id)
            if common.probe_write:
                outcomes[ev.propagation] = outcomes.get(ev.propagation, 0) + 1
            out.append((ev.tgid, nethttp_client.to_span(ev, mono_to_unix, errs.get(ev.err_itab, ""))))
        return out


@dataclass
class ClientState:
    """Per binary: `error.type` names by itab; for the last `spans()` call only: span ids whose
    `traceparent` was inserted (the receiver lets those pass the stitcher without waiting) and, in
    probe_write mode, the writer's outcomes by name (sk_msg counts its own in a BPF array)."""

    error_types: dict[int, str]
    injected: set[bytes] = field(default_factory=set)
    outcomes: dict[str, int] = field(default_factory=dict)


class DatabaseSql(Probe):
    name, scope, ringbuf, lost_map = "database_sql", "database/sql", "sql_events", "sql_lost"

    @property
    def source(self) -> Path:
        from . import database_sql
        return database_sql.BPF_SOURCE

    def _options(self, common: Common) -> Any:
        from . import database_sql
        return database_sql.Options(common.include_db_statement, common.sanitize_db_statement,
                                    common.db_statement_max_length)

    def present(self, gb: GoBinary) -> bool:
        from . import database_sql
        return bool(database_sql.present(gb))

    def cflags(self, gb: GoBinary, common: Common) -> list[str]:
        from . import database_sql
        return database_sql.cflags(gb, self._options(common), pin_dir=common.pin_dir,
                                   max_inflight=common.max_inflight, ringbuf_pages=common.ringbuf_pages)

    def attach(self, bpf: Any, gb: GoBinary, path: str, pid: int, common: Common) -> Any:
        from . import database_sql
        return database_sql.attach(bpf, gb, path, pid)

    def binary_state(self, gb: GoBinary, common: Common) -> Any:
        return {}  # pid -> DriverResolver, made on first use

    def spans(self, records: list[Any], state: Any, gb: GoBinary, mono_to_unix: int,
              common: Common) -> list[tuple[int, Span]]:
        from . import database_sql
        options = self._options(common)
        out = []
        for raw in records:
            ev = database_sql.decode(raw)
            resolver = state.get(ev.tgid)
            if resolver is None:
                resolver = state[ev.tgid] = database_sql.DriverResolver(gb, ev.tgid)
            out.append((ev.tgid, database_sql.to_span(ev, resolver, options, mono_to_unix)))
        return out


# The order is the attach order; the server probe comes first so that it fills ctx_spans for the others.
PROBES: list[Probe] = [NetHttpServer(), NetHttpClient(), DatabaseSql()]
