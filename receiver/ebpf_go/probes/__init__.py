"""The instrumented libraries: one package each (its BPF C, its declaration `PROBE`, its spans),
and this registry, which the receiver, `inspect` and the `instrumentations` options all read.

- nethttp_server: `net/http.serverHandler.ServeHTTP` -> SERVER spans
- nethttp_client: `net/http.(*Transport).roundTrip` -> CLIENT spans (and the traceparent for sk_msg)
- database_sql: `database/sql` query/exec -> CLIENT spans
- grpc_server: `google.golang.org/grpc.(*Server).handleStream` -> SERVER spans
- grpc_client: `google.golang.org/grpc.newClientStream` .. `(*clientStream).finish` -> CLIENT spans
- functions: the functions the config names (`functions:`) -> INTERNAL spans

A new library is a new package declaring a `spec.Probe` and one line below. The order is the
attach order: a probe whose spans are parents (context "writes") comes before those that read them.
"""

from __future__ import annotations

from .database_sql import PROBE as DATABASE_SQL
from .functions import PROBE as FUNCTIONS
from .grpc_client import PROBE as GRPC_CLIENT
from .grpc_server import PROBE as GRPC_SERVER
from .nethttp_client import PROBE as NET_HTTP_CLIENT
from .nethttp_server import PROBE as NET_HTTP_SERVER
from .spec import Build, Probe, ProbeUnavailable, RawCollector, StructCollector

PROBES: list[Probe] = [NET_HTTP_SERVER, GRPC_SERVER, FUNCTIONS, NET_HTTP_CLIENT, DATABASE_SQL, GRPC_CLIENT]

__all__ = ["PROBES", "Build", "Probe", "ProbeUnavailable", "RawCollector", "StructCollector", "ctx_readers", "g_spans_needed"]


def ctx_readers(present: list[Probe]) -> bool:
    """Whether a probe that looks parents up in ctx_spans is attached with these: the writers fill
    the map only then (an update and a delete of a pinned LRU map per request saved)."""
    return any(p.context == "reads" for p in present)


def g_spans_needed(present: list[Probe]) -> bool:
    """Whether the servers fill g_spans (goroutine -> its span) for a probe attached with these."""
    return any(p.goroutine_spans for p in present)
