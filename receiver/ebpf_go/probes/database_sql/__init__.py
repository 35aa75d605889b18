"""database/sql client spans: one CLIENT span per query or exec, whatever the driver.

BPF side: database_sql.c beside this file. `PROBE` declares the hooks, offsets and record
(probes/spec.py); this module turns ring-buffer records into spans (`decode`, `DriverResolver`,
`to_span`).

Hooked functions (every path an application uses goes through exactly one of them per statement):
- `database/sql.(*DB).queryDC`: DB.Query/QueryContext/QueryRow*, Tx.Query*/QueryRow*, Conn.Query*.
- `database/sql.(*DB).execDC`: DB.Exec/ExecContext, Tx.Exec*, Conn.Exec*.
- `database/sql.(*Stmt).QueryContext` / `(*Stmt).ExecContext`: prepared statements (also Query,
  QueryRow*, Exec, which call them), which never reach queryDC/execDC.
Not hooked: Prepare, Begin, Commit, Rollback, Ping, Rows.Next (no statement of the application's
runs there, or, for Rows, not as one call).

Span shape (OpenTelemetry database semantic conventions): kind CLIENT; name
`{db.operation.name} {db.collection.name}`, `{db.operation.name}` when the statement names no single
table, else `{db.system.name}`; `db.system.name` from the driver's Go type (the `DB.connector`
itab, named from the binary's itab symbols; else from the driver modules linked in);
`db.operation.name`, `db.collection.name` parsed from the text (sqlparse.py); `db.namespace`,
`server.address`, `server.port` from the data source name (read once per connection pool);
`db.query.text` only with `include_db_statement`, literals replaced by `?` unless
`sanitize_db_statement: false`, at most `db_statement_max_length` characters; on a non-nil error
status Error and `error.type` (the error's Go type, else `_OTHER`).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from collector.spans import KIND_CLIENT, STATUS_ERROR, AttrValue, Span

from ... import sqlparse
from ...gobinary import GoBinary
from ...gobinary.itabs import itab_types, load_bias
from ..spec import HEADER, Build, Field, Hook, Offset, Probe, Record, include_flags

BPF_SOURCE = Path(__file__).resolve().with_name("database_sql.c")
EVENT_KIND_DATABASE_SQL = 3
SCOPE_NAME = "database/sql"

# (symbol, entry program, return program); the order is SQL_FN_* in the C.
FUNCTIONS: list[tuple[str, str, str]] = [
    ("database/sql.(*DB).queryDC", "uprobe_sql_queryDC", "uprobe_sql_return_rows"),
    ("database/sql.(*DB).execDC", "uprobe_sql_execDC", "uprobe_sql_return_result"),
    ("database/sql.(*Stmt).QueryContext", "uprobe_sql_Stmt_QueryContext", "uprobe_sql_return_rows"),
    ("database/sql.(*Stmt).ExecContext", "uprobe_sql_Stmt_ExecContext", "uprobe_sql_return_result"),
]
SYMBOLS = [f for f, _, _ in FUNCTIONS]

# (constant, struct, field, fallback offset: the same in every Go version 1.17-1.27)
OFFSETS = (
    Offset("DB_CONNECTOR_POS", "database/sql.DB", "connector", 8),
    Offset("STMT_DB_POS", "database/sql.Stmt", "db", 0),
    Offset("STMT_QUERY_POS", "database/sql.Stmt", "query", 8),
)
# Fields read from process memory (not BPF) once per connection pool, to find the data source name.
DSN_CONNECTOR = "database/sql.dsnConnector"  # what sql.Open builds for drivers without OpenConnector
DSN_FIELDS = {
    "database/sql.dsnConnector": ("dsn", 0),
    "github.com/jackc/pgx/v5/stdlib.driverConnector": ("name", 8),
    "github.com/jackc/pgx/v4/stdlib.driverConnector": ("name", 8),
}
DSNCONN_DRIVER = ("driver", 16)

# Driver package path prefix -> db.system.name.
SYSTEMS: list[tuple[str, str]] = [
    ("github.com/jackc/pgx", "postgresql"),
    ("github.com/lib/pq", "postgresql"),
    ("modernc.org/sqlite", "sqlite"),
    ("github.com/mattn/go-sqlite3", "sqlite"),
    ("github.com/glebarez/go-sqlite", "sqlite"),
    ("github.com/ncruces/go-sqlite3", "sqlite"),
    ("github.com/go-sql-driver/mysql", "mysql"),
    ("github.com/microsoft/go-mssqldb", "microsoft.sql_server"),
    ("github.com/denisenkom/go-mssqldb", "microsoft.sql_server"),
    ("github.com/sijms/go-ora", "oracle.db"),
    ("github.com/godror/godror", "oracle.db"),
    ("github.com/ClickHouse/clickhouse-go", "clickhouse"),
]
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "microsoft.sql_server": 1433, "oracle.db": 1521,
                 "clickhouse": 9000}


@dataclass(frozen=True)
class Options:
    """The receiver's per-instrumentation options for database/sql."""

    include_db_statement: bool = False
    sanitize_db_statement: bool = True
    db_statement_max_length: int = 1024

    @property
    def query_max(self) -> int:
        """Bytes of statement text BPF copies: enough to parse (>= 256), a power of two, <= 8192."""
        n = 256
        while n < min(self.db_statement_max_length, 8192):
            n *= 2
        return n


# ---- events: struct sql_event in database_sql.c (header, error, struct sql_call, then the text),
# checked field by field at compile time; the text is sent cut to its captured length.

RECORD = Record("sql_event", (
    *HEADER, Field("err_tab", "Q"), Field("err_data", "Q"), Field("c.start_ns", "Q"),
    Field("c.tc.trace_id", "16s"), Field("c.tc.span_id", "8s"), Field("c.tc.parent_span_id", "8s"),
    Field("c.tc.flags", "B"), Field("c.tc.remote_parent", "B"), Field(None, "6x"), Field("c.db", "Q"),
    Field("c.connector_tab", "Q"), Field("c.connector_data", "Q"), Field("c.pad0", "Q"), Field("c.query_ptr", "Q"),
    Field("c.query_len", "I"), Field("c.captured", "H"), Field("c.fn", "B"), Field("c.parent_source", "B")),
    tail="c.query")
assert RECORD.size == 144, RECORD.size


class DatabaseSql(Probe):
    name, title, scope, source = "database_sql", "database/sql", SCOPE_NAME, BPF_SOURCE
    hooks = tuple(Hook(sym, entry, ret) for sym, entry, ret in FUNCTIONS)
    offsets = OFFSETS
    record = RECORD
    context = "reads"
    decode_in_place = False   # variable length: decode() cuts the text

    def constants(self, gb: GoBinary, build: Build) -> list[str]:
        return [f"-DQUERY_MAX={self.options(build).query_max}"]

    def options_from(self, receiver_config: Any) -> Options:
        c = receiver_config
        return Options(c.include_db_statement, c.sanitize_db_statement, c.db_statement_max_length)

    @staticmethod
    def options(build: Build) -> Options:
        opts = build.options.get("database_sql")
        return opts if isinstance(opts, Options) else Options()

    def binary_state(self, gb: GoBinary, build: Build) -> Any:
        return {}  # pid -> DriverResolver, made on first use

    def spans(self, records: list[Any], state: Any, gb: GoBinary, mono_to_unix: int,
              build: Build) -> list[tuple[int, Span]]:
        options = self.options(build)
        out = []
        for raw in records:
            ev = decode(raw)
            resolver = state.get(ev.tgid)
            if resolver is None:
                resolver = state[ev.tgid] = DriverResolver(gb, ev.tgid)
            out.append((ev.tgid, to_span(ev, resolver, options, mono_to_unix)))
        return out


PROBE = DatabaseSql()


def cflags(binary: GoBinary, options: Options, *, pin_dir: str, max_inflight: int = 4096,
           ringbuf_pages: int = 64) -> list[str]:
    """The -D constants of database_sql.c for this binary (tests and benchmarks compile it themselves)."""
    return include_flags(PROBE) + PROBE.cflags(binary, Build(pin_dir, max_inflight, ringbuf_pages, options={"database_sql": options}))


def present(binary: GoBinary) -> list[str]:
    """The hooked functions this binary has (none: it does not use database/sql)."""
    return [s for s in SYMBOLS if binary.function(s) is not None]


def attach(bpf: Any, binary: GoBinary, path: str, pid: int = -1) -> list[tuple[int, str]]:
    """Attach entry and RET probes of every hooked function present; [(address, BPF function)]."""
    return PROBE.attach(bpf, binary, path, pid, Build("", 0, 0))


@dataclass
class SqlEvent:
    tgid: int
    start_ns: int
    end_ns: int
    goroutine: int
    err_tab: int
    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes
    flags: int
    db: int
    connector_tab: int
    connector_data: int
    query_len: int
    fn: int
    parent_from_ctx: bool
    query: str

    @property
    def truncated(self) -> bool:
        return len(self.query.encode()) < self.query_len


def decode(data: bytes | memoryview) -> SqlEvent:
    (_kind, tgid, _start, end, g, err_tab, _err_data, start, trace_id, span_id, parent, flags, _remote, db, ctab,
     cdata, _pad, _qptr, qlen, captured, fn, psrc) = RECORD.layout.unpack_from(data)
    off = RECORD.size
    text = bytes(data[off:off + captured]).decode(errors="replace")
    return SqlEvent(tgid, start, end, g, err_tab, trace_id, span_id, parent, flags, db, ctab, cdata, qlen, fn,
                    bool(psrc), text)


# ---- naming the driver, the error and the server


def system_of(type_name: str) -> str | None:
    """db.system.name for a Go type name (`*github.com/jackc/pgx/v5/stdlib.Conn` -> postgresql)."""
    t = type_name.lstrip("*")
    for prefix, system in SYSTEMS:
        if t.startswith(prefix):
            return system
    return None


def system_from_modules(binary: GoBinary) -> str:
    """db.system.name when the binary links exactly one known driver module, else `other_sql`."""
    found = {system for mod in binary.modules for prefix, system in SYSTEMS
             if mod == prefix or mod.startswith(prefix + "/") or prefix.startswith(mod + "/") or mod == prefix}
    return found.pop() if len(found) == 1 else "other_sql"


def parse_dsn(system: str, dsn: str) -> dict[str, AttrValue]:
    """server.address, server.port, db.namespace from a data source name (never the password)."""
    attrs: dict[str, AttrValue] = {}
    host, port, dbname = "", 0, ""
    if system == "postgresql":
        if "://" in dsn:
            u = urlsplit(dsn)
            host = u.hostname or ""
            try:
                port = u.port or 0
            except ValueError:
                port = 0
            dbname = unquote(u.path.lstrip("/"))
            q = parse_qs(u.query)
            host = host or q.get("host", [""])[0]
            dbname = dbname or q.get("dbname", [""])[0]
        else:
            kv: dict[str, str] = {m.group(1): m.group(2)
                                  for m in re.finditer(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S*)", dsn)}
            host = kv.get("host", "").strip("'")
            port = int(kv["port"]) if kv.get("port", "").isdigit() else 0
            dbname = kv.get("dbname", "").strip("'")
        if "," in host:  # several hosts: no single server
            host = ""
        if host.startswith("/"):  # a unix socket directory
            host = ""
    elif system == "mysql":
        m = re.match(r"^(?:[^@/]*@)?(?:(\w+)(?:\(([^)]*)\))?)?/([^?]*)", dsn)
        if m:
            addr, dbname = m.group(2) or "", m.group(3) or ""
            if m.group(1) == "tcp" and addr:
                h, _, p = addr.rpartition(":")
                host, port = (h, int(p)) if p.isdigit() else (addr, 0)
    if host:
        attrs["server.address"] = host.strip("[]")
        attrs["server.port"] = port or DEFAULT_PORTS.get(system, 0)
    if dbname:
        attrs["db.namespace"] = dbname
    return attrs


class DriverResolver:
    """Per process: connector -> (db.system.name, server attributes); error itab -> error.type.

    A connection pool's connector is resolved once (itab symbol, plus the data source name read
    from the process's memory), so the per-event cost is one dictionary lookup."""

    def __init__(self, binary: GoBinary, pid: int, mem_path: str | None = None) -> None:
        self.binary = binary
        self.pid = pid
        self.bias = load_bias(pid, binary)
        self.itabs = {addr + self.bias: v for addr, v in itab_types(binary).items()}
        self.fallback_system = system_from_modules(binary)
        self.mem_path = mem_path or f"/proc/{pid}/mem"
        self._pools: dict[tuple[int, int], tuple[str, dict[str, AttrValue]]] = {}
        self._errors: dict[int, str] = {}

    def _read(self, addr: int, n: int) -> bytes:
        with open(self.mem_path, "rb", buffering=0) as fh:
            fh.seek(addr)
            return fh.read(n)

    def _string(self, addr: int, limit: int = 1024) -> str:
        hdr = self._read(addr, 16)
        ptr, ln = struct.unpack("<QQ", hdr)
        if ptr == 0 or ln == 0 or ln > 1 << 20:
            return ""
        return self._read(ptr, min(ln, limit)).decode(errors="replace")

    def _field(self, struct_name: str, field: str, fallback: int) -> int:
        off = self.binary.struct_offset(struct_name, field)
        return off.value if off is not None else fallback

    def pool(self, connector_tab: int, connector_data: int) -> tuple[str, dict[str, AttrValue]]:
        key = (connector_tab, connector_data)
        hit = self._pools.get(key)
        if hit is not None:
            return hit
        system, attrs = self.fallback_system, {}
        ctype = self.itabs.get(connector_tab, ("", ""))[0].lstrip("*")
        try:
            if ctype == DSN_CONNECTOR and connector_data:
                drv = struct.unpack("<Q", self._read(connector_data + self._field(DSN_CONNECTOR, *DSNCONN_DRIVER), 8))[0]
                system = system_of(self.itabs.get(drv, ("", ""))[0]) or system
            elif ctype:
                system = system_of(ctype) or system
            if ctype in DSN_FIELDS and connector_data:
                field, fallback = DSN_FIELDS[ctype]
                attrs = parse_dsn(system, self._string(connector_data + self._field(ctype, field, fallback)))
        except (OSError, struct.error, ValueError):
            pass  # the process went away or the memory moved: keep what we have
        result = (system, attrs)
        self._pools[key] = result
        return result

    def error_type(self, err_tab: int) -> str:
        name = self._errors.get(err_tab)
        if name is None:
            t = self.itabs.get(err_tab)
            name = t[0].lstrip("*") if t is not None and t[1] == "error" else "_OTHER"
            self._errors[err_tab] = name
        return name


def to_span(ev: SqlEvent, resolver: DriverResolver, options: Options, mono_to_unix_ns: int) -> Span:
    """A CLIENT span from one event; `mono_to_unix_ns` converts bpf_ktime (CLOCK_MONOTONIC) to epoch."""
    system, server = resolver.pool(ev.connector_tab, ev.connector_data)
    mysql = system == "mysql"
    stmt = sqlparse.parse(ev.query, ev.truncated, mysql)
    attrs: dict[str, AttrValue] = {"db.system.name": system}
    if stmt.operation:
        attrs["db.operation.name"] = stmt.operation
    if stmt.collection:
        attrs["db.collection.name"] = stmt.collection
    attrs.update(server)
    if options.include_db_statement and ev.query:
        text = sqlparse.sanitize(ev.query, mysql) if options.sanitize_db_statement else ev.query
        attrs["db.query.text"] = sqlparse.truncate(text, options.db_statement_max_length)
    status = 0
    if ev.err_tab:
        status = STATUS_ERROR
        attrs["error.type"] = resolver.error_type(ev.err_tab)
    parent = ev.parent_span_id if any(ev.parent_span_id) else b""
    return Span(ev.trace_id, ev.span_id, sqlparse.span_name(stmt, system), parent_span_id=parent, kind=KIND_CLIENT,
                start_time_unix_nano=ev.start_ns + mono_to_unix_ns, end_time_unix_nano=ev.end_ns + mono_to_unix_ns,
                attributes=attrs, status_code=status, flags=0x100 | (ev.flags & 0xFF))
