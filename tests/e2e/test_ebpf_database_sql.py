"""database/sql CLIENT spans from eBPF, against SQLite (modernc.org/sqlite) and a real PostgreSQL
(pgx's database/sql driver), for the queries of tests/fixtures/go/dbapp.

Two layers:
- the probe alone (bpf/database_sql.c loaded with BCC, attached to dbapp, records turned into spans
  by receiver/ebpf_go/probes/database_sql.py): exact names and attributes of every span;
- the collector end to end (`otelgo-collector --config` with the ebpf_go receiver and a file
  exporter): the same spans with their parent HTTP server span, and no statement text in the
  exporter's output when `include_db_statement` is off.
"""

from __future__ import annotations

import ctypes as ct
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.spans import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, STATUS_UNSET, Span, from_json_dict
from receiver.ebpf_go.bpfprogram import release_bpf
from receiver.ebpf_go.compilechild import BPF_DIR
from receiver.ebpf_go.gobinary import GoBinary
from receiver.ebpf_go.probes import database_sql as dbsql
from tests.support.bpffs import make_pin_dir
from tests.support.collector import CollectorProcess
from tests.support.gobuild import build_go_fixture
from tests.support.postgres import PostgresServer

GO_VERSION = "1.24"
IS_ROOT = os.geteuid() == 0
root = pytest.mark.root
needs_root = pytest.mark.skipif(not IS_ROOT and os.environ.get("CI") != "true", reason="needs root and eBPF")

OPS = ["select", "insert", "update", "delete", "fail", "tx", "prepared", "background"]

# Per endpoint: the spans it makes, in order: (name, db.operation.name, db.collection.name, error, text).
# Text is db.query.text as exported with sanitizing on; "{p1}"/"{p2}" are the driver's placeholders.
EXPECTED: dict[str, list[tuple[str, str, str, bool, str]]] = {
    "select": [("SELECT contacts", "SELECT", "contacts", False, "SELECT name FROM contacts WHERE id = {p1}")],
    "insert": [("INSERT contacts", "INSERT", "contacts", False,
                "INSERT INTO contacts (id, name, phone) VALUES (?, ?, ?)")],
    "update": [("UPDATE contacts", "UPDATE", "contacts", False, "UPDATE contacts SET phone = {p1} WHERE name = {p2}")],
    "delete": [("DELETE contacts", "DELETE", "contacts", False, "DELETE FROM contacts WHERE name = ?")],
    "fail": [("SELECT no_such_table", "SELECT", "no_such_table", True, "SELECT * FROM no_such_table")],
    "tx": [("INSERT contacts", "INSERT", "contacts", False, "INSERT INTO contacts (id, name) VALUES ({p1}, {p2})"),
           ("SELECT contacts", "SELECT", "contacts", False, "SELECT count(*) FROM contacts")],
    "prepared": [("SELECT contacts", "SELECT", "contacts", False, "SELECT phone FROM contacts WHERE id = {p1}"),
                 ("UPDATE contacts", "UPDATE", "contacts", False, "UPDATE contacts SET name = {p1} WHERE id = {p2}")],
    "background": [("SELECT contacts", "SELECT", "contacts", False,
                    "SELECT count(*) FROM contacts WHERE phone IS NOT NULL")],
}
SYSTEMS = {"sqlite": ("sqlite", "modernc.org/sqlite.Error", "?", "?"),
           "pg": ("postgresql", "github.com/jackc/pgx/v5/pgconn.PgError", "$1", "$2")}


# ---- fixtures


@pytest.fixture(scope="module")
def dbapp() -> Path:
    return build_go_fixture("dbapp", GO_VERSION)


@pytest.fixture(scope="session")
def postgres(request: pytest.FixtureRequest) -> PostgresServer:
    """One server for the session, stopped (pg_ctl -m immediate) by the finalizer whatever the
    outcome; PostgresServer also stops at interpreter exit and reaps clusters of dead sessions."""
    pg = PostgresServer()  # PostgresUnavailable says what is missing (tools/setup.sh installs it)
    request.addfinalizer(pg.stop)
    return pg


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when the test process dies, even by SIGKILL."""
    PR_SET_PDEATHSIG = 1
    ct.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class App:
    """dbapp running on a free port with a fresh SQLite file and the test PostgreSQL."""

    def __init__(self, binary: Path, pg: PostgresServer, workdir: Path) -> None:
        self.proc = subprocess.Popen([str(binary), "-sqlite", str(workdir / "app.db"), "-pg", pg.dsn],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"dbapp did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.addr = line.split()[1]

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.addr}{path}", timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def app(dbapp: Path, postgres: PostgresServer, tmp_path: Path) -> Iterator[App]:
    """dbapp for one test, killed at teardown whatever the outcome (and with the test process)."""
    a = App(dbapp, postgres, tmp_path)
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture
def start_collector(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], CollectorProcess]]:
    """Starts `otelgo-collector --config` processes; all are stopped at teardown."""
    started: list[CollectorProcess] = []

    def start(config: dict[str, Any]) -> CollectorProcess:
        col = CollectorProcess(config, tmp_path)  # stops itself when it does not become ready
        started.append(col)
        return col

    try:
        yield start
    finally:
        for col in started:
            col.stop()


def expected_spans(db: str, op: str, pg_port: int, with_text: bool) -> list[tuple[str, dict[str, Any], bool]]:
    """(name, every attribute, error) of the spans of one endpoint, in order."""
    system, err_type, p1, p2 = SYSTEMS[db]
    out = []
    for name, oper, coll, err, text in EXPECTED[op]:
        attrs: dict[str, Any] = {"db.system.name": system, "db.operation.name": oper, "db.collection.name": coll}
        if err:
            attrs["error.type"] = err_type
        if db == "pg":
            attrs.update({"server.address": "127.0.0.1", "server.port": pg_port, "db.namespace": "postgres"})
        if with_text:
            attrs["db.query.text"] = text.format(p1=p1, p2=p2)
        out.append((name, attrs, err))
    return out


def pin_dir(name: str) -> str:
    """A bpffs directory of this test process (parallel sessions must not share pinned maps)."""
    return make_pin_dir(f"otelgo_test_{name}_{os.getpid()}")


# ---- the probe alone


class LoadedProbe:
    """bpf/database_sql.c compiled for one binary and attached to one process."""

    def __init__(self, binary: Path, pid: int, options: dbsql.Options, pin_dir: str) -> None:
        from bcc import BPF

        self.gb = GoBinary.open(binary)
        self.options = options
        self.pin_dir = pin_dir
        os.makedirs(pin_dir, exist_ok=True)
        flags = [*dbsql.cflags(self.gb, options, pin_dir=pin_dir), f"-I{dbsql.BPF_SOURCE.parent}"]
        self.bpf = BPF(src_file=str(dbsql.BPF_SOURCE).encode(), cflags=flags)
        try:
            self.attached = dbsql.attach(self.bpf, self.gb, str(binary), pid=pid)
        except BaseException:
            self.close()
            raise
        self.resolver = dbsql.DriverResolver(self.gb, pid)
        self.raw: list[bytes] = []

        def on_event(_ctx: Any, data: Any, size: int) -> None:
            self.raw.append(bytes(ct.string_at(data, size)))

        self._cb = on_event
        self.bpf[b"events"].open_ring_buffer(on_event)

    def spans(self) -> list[Span]:
        self.bpf.ring_buffer_consume()
        out = [dbsql.to_span(dbsql.decode(r), self.resolver, self.options, 0) for r in self.raw]
        self.raw.clear()
        return out

    def close(self) -> None:
        close_bpf(self.bpf)
        shutil.rmtree(self.pin_dir, ignore_errors=True)

    def __enter__(self) -> LoadedProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


close_bpf = release_bpf  # closes PMU uprobes without tracefs, then frees the BPF object


@root
@needs_root
def test_probe_alone_exact_spans(dbapp: Path, app: App, postgres: PostgresServer) -> None:
    """Every endpoint of dbapp, both databases: one span per statement with the exact shape."""
    with LoadedProbe(dbapp, app.pid, dbsql.Options(include_db_statement=True), pin_dir("dbsql")) as probe:
        # every hooked function: its entry, and its RETs
        entries = sorted(fn for _, fn in probe.attached if "return" not in fn)
        assert entries == sorted(entry for _, entry, _ in dbsql.FUNCTIONS), probe.attached
        assert {fn for _, fn in probe.attached if "return" in fn} == {"uprobe_sql_return_rows",
                                                                     "uprobe_sql_return_result"}
        for db in SYSTEMS:
            for op in OPS:
                status = app.get(f"/{db}/{op}")
                assert status == (500 if op == "fail" else 200), (db, op)
                got = probe.spans()
                want = expected_spans(db, op, postgres.port, with_text=True)
                assert [s.name for s in got] == [w[0] for w in want], (db, op)
                for s, (_name, attrs, err) in zip(got, want, strict=True):
                    assert s.kind == KIND_CLIENT
                    assert s.status_code == (STATUS_ERROR if err else STATUS_UNSET)
                    assert s.attributes == attrs, (db, op)
                    assert len(s.trace_id) == 16 and any(s.trace_id) and len(s.span_id) == 8
                    assert s.end_time_unix_nano > s.start_time_unix_nano
                    # no server probe loaded here: nothing to be a child of
                    assert s.parent_span_id == b""


@root
@needs_root
def test_probe_alone_statement_off_and_truncation(dbapp: Path, app: App) -> None:
    """include_db_statement off: no text; on with sanitizing off and a short limit: raw, cut."""
    with LoadedProbe(dbapp, app.pid, dbsql.Options(), pin_dir("dbsql_off")) as off:
        app.get("/pg/insert")
        (s,) = off.spans()
        assert s.name == "INSERT contacts" and "db.query.text" not in s.attributes
    raw_opts = dbsql.Options(include_db_statement=True, sanitize_db_statement=False, db_statement_max_length=30)
    with LoadedProbe(dbapp, app.pid, raw_opts, pin_dir("dbsql_raw")) as raw:
        app.get("/sqlite/delete")
        (s,) = raw.spans()
        assert s.attributes["db.query.text"] == "DELETE FROM contacts WHERE nam"
        assert s.name == "DELETE contacts"


# A stand-in for the net/http server probe: at ServeHTTP entry it tracks the request's context in
# the pinned ctx_spans map (as nethttp_server.c does) and reports the span ids it chose.
FAKE_SERVER_C = r"""
#include "go_types.h"
#include "ctx_spans.h"
BPF_RINGBUF_OUTPUT(fake_servers, 8);
int fake_server_entry(struct pt_regs *ctx) {
    u64 req = GO_PARAM4(ctx);
    struct go_iface ic = {};
    bpf_probe_read_user(&ic, sizeof(ic), (void *)(req + REQ_CTX_POS));
    struct ctx_key k = {.ptr = ic.data, .tgid = bpf_get_current_pid_tgid() >> 32};
    struct trace_ctx tc = {};
    new_span_ids(0, &tc, 0);   /* no generator state: bpf_get_prandom_u32 ids */
    ctx_spans.update(&k, &tc);
    fake_servers.ringbuf_output(&tc, sizeof(tc), 0);
    return 0;
}
"""


@root
@needs_root
def test_probe_alone_parent_from_request_context(dbapp: Path, app: App) -> None:
    """A statement run under a request's context is a child of the span tracked on that context
    (also through Tx and Stmt); one run with context.Background() is a root span."""
    from bcc import BPF

    pin = pin_dir("dbsql_parent")
    os.makedirs(pin, exist_ok=True)
    gb = GoBinary.open(dbapp)
    ctx_off = gb.struct_offset("net/http.Request", "ctx")
    assert ctx_off is not None
    server = BPF(text=FAKE_SERVER_C.encode(), cflags=[f"-I{BPF_DIR}", f'-DPIN_DIR="{pin}"',
                                                      f"-DREQ_CTX_POS={ctx_off.value}"])
    try:
        server.attach_uprobe(name=str(dbapp).encode(), addr=gb.entry_probe("net/http.serverHandler.ServeHTTP").addr,
                             fn_name=b"fake_server_entry", pid=app.pid)
        parents: list[bytes] = []

        def on_server(_ctx: Any, data: Any, size: int) -> None:
            parents.append(bytes(ct.string_at(data, size)))

        server[b"fake_servers"].open_ring_buffer(on_server)
        with LoadedProbe(dbapp, app.pid, dbsql.Options(), pin) as probe:
            for db in SYSTEMS:
                for op in ("select", "tx", "prepared", "background"):
                    app.get(f"/{db}/{op}")
                    spans = probe.spans()
                    server.ring_buffer_consume()
                    (tc,) = parents
                    parents.clear()
                    trace_id, span_id = tc[:16], tc[16:24]
                    assert len(spans) == len(EXPECTED[op]), (db, op)
                    for s in spans:
                        if op == "background":
                            assert s.parent_span_id == b"" and s.trace_id != trace_id, (db, op)
                        else:
                            assert (s.trace_id, s.parent_span_id) == (trace_id, span_id), (db, op, s.name)
    finally:
        close_bpf(server)
        shutil.rmtree(pin, ignore_errors=True)


# ---- the collector end to end


SCOPE = "otelgo-collector/database/sql"


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def wait_instrumented(col: CollectorProcess, pid: int, probes: tuple[str, ...], timeout: float = 60.0) -> float:
    """Wait until the receiver reports the process instrumented and each probe's uprobes attached
    (compile + attach take seconds); the seconds waited. Fails with the metrics and the log."""
    t0 = time.monotonic()
    seen: dict[str, float] = {}
    while True:
        if col.proc.poll() is not None:
            pytest.fail(f"collector exited with {col.proc.returncode} before instrumenting pid {pid}:\n{col.log()}")
        try:
            m = metric_values(col.scrape())
        except OSError:
            m = {}
        seen = {"processes_instrumented": m.get(("otelgo_ebpf_processes_instrumented", ()), 0.0),
                **{f"probes_attached{{probe={p}}}": m.get(("otelgo_ebpf_probes_attached", (("probe", p),)), 0.0)
                   for p in probes}}
        if all(v > 0 for v in seen.values()):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"the ebpf_go receiver did not instrument dbapp (pid {pid}) within {timeout:.0f}s: "
                        f"{seen}\ncollector log:\n{col.log()[-6000:]}")
        time.sleep(0.1)


def _collector_config(out: Path, dbapp: Path, pid: int, include: bool) -> dict[str, Any]:
    # Only this test's dbapp (other sessions may run the same cached binary). The debug exporter
    # prints every span with its attributes into the collector's log: a second exporter to search.
    return {
        "receivers": {"ebpf_go": {"targets": [{"exe_path": str(dbapp), "pid": [pid]}],
                                  "instrumentations": {"net_http_client": False},
                                  "include_db_statement": include}},
        "processors": {"batch": {"timeout": "100ms"}},
        "exporters": {"file": {"path": str(out), "flush_interval": "50ms"}, "debug": {"verbosity": "detailed"}},
        "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "processors": ["batch"],
                                             "exporters": ["file", "debug"]}}},
    }


def _read_spans(path: Path) -> list[tuple[dict[str, Any], str, Span]]:
    """(resource attributes, scope name, span) of every span in a file exporter's output."""
    out: list[tuple[dict[str, Any], str, Span]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        if line.strip():
            batch = from_json_dict(json.loads(line))
            for rs in batch.resource_spans:
                for ss in rs.scope_spans:
                    out.extend((rs.resource.attributes, ss.scope.name, sp) for sp in ss.spans)
    return out


def _wait_spans(path: Path, n: int, timeout: float = 20.0) -> list[tuple[dict[str, Any], str, Span]]:
    deadline = time.monotonic() + timeout
    spans = _read_spans(path)
    while len(spans) < n and time.monotonic() < deadline:
        time.sleep(0.1)
        spans = _read_spans(path)
    time.sleep(0.3)  # anything beyond n (there must be none) has arrived too
    return _read_spans(path)


# Every statement text dbapp's handlers run (main.go), as written with its literals: with
# include_db_statement off none may reach an exporter, nor any fragment of one beyond the
# operation keyword and the table name.
RAN_SQL = sorted({t.format(p1=p1, p2=p2) for _, _, p1, p2 in SYSTEMS.values() for t in [
    "SELECT name FROM contacts WHERE id = {p1}",
    "INSERT INTO contacts (id, name, phone) VALUES (10, 'Alice', '555-0100')",
    "UPDATE contacts SET phone = {p1} WHERE name = {p2}",
    "DELETE FROM contacts WHERE name = 'Alice'",
    "SELECT * FROM no_such_table",
    "INSERT INTO contacts (id, name) VALUES ({p1}, {p2})",
    "SELECT count(*) FROM contacts",
    "SELECT phone FROM contacts WHERE id = {p1}",
    "UPDATE contacts SET name = {p1} WHERE id = {p2}",
    "SELECT count(*) FROM contacts WHERE phone IS NOT NULL",
]})
SQL_FRAGMENTS = ["WHERE", "VALUES", "FROM ", "SET ", "count(*)", "'Alice'", "555-01", "phone IS NOT NULL"]


@root
@needs_root
@pytest.mark.parametrize("include", [True, False], ids=["statement-on", "statement-off"])
def test_collector_spans_and_parents(dbapp: Path, app: App, postgres: PostgresServer, tmp_path: Path,
                                     start_collector: Callable[[dict[str, Any]], CollectorProcess],
                                     include: bool) -> None:
    """Through `otelgo-collector --config` (ebpf_go -> batch -> file + debug): every endpoint, both
    databases: the exact database spans, each a child of its request's SERVER span (Background():
    a root span); with include_db_statement off no statement text in any exporter's output."""
    out = tmp_path / "spans.jsonl"
    col = start_collector(_collector_config(out, dbapp, app.pid, include))
    waited = wait_instrumented(col, app.pid, ("net_http_server", "database_sql"))
    want_db = 0
    for db in SYSTEMS:
        for op in OPS:
            assert app.get(f"/{db}/{op}") == (500 if op == "fail" else 200), (db, op)
            want_db += len(EXPECTED[op])
    n_requests = len(SYSTEMS) * len(OPS)
    got = _wait_spans(out, want_db + n_requests)
    col.stop()
    assert all(res.get("process.pid") == app.pid for res, _, _ in got), "spans of another process"
    servers = {str(sp.attributes.get("url.path")): sp for _, _, sp in got if sp.kind == KIND_SERVER}
    clients = sorted((sp for _, scope, sp in got if scope == SCOPE), key=lambda sp: sp.start_time_unix_nano)
    assert len(got) == want_db + n_requests and len(servers) == n_requests, (
        f"{len(got)} spans after waiting {waited:.1f}s for instrumentation: {sorted(sp.name for *_, sp in got)}")
    assert len(clients) == want_db
    by_parent: dict[bytes, list[Span]] = {}
    for c in clients:
        by_parent.setdefault(c.parent_span_id, []).append(c)
    for db in SYSTEMS:
        for op in OPS:
            server = servers[f"/{db}/{op}"]
            # dbapp's go.mod says go 1.21: ServeMux runs in its 1.21 mode, no Request.Pattern, no route
            assert server.name == "GET" and server.parent_span_id == b""
            want = expected_spans(db, op, postgres.port, with_text=include)
            if op == "background":
                # context.Background() inside the handler: no request context, a root span
                (s,) = [c for c in by_parent.get(b"", []) if c.attributes["db.system.name"] == SYSTEMS[db][0]]
                assert s.trace_id != server.trace_id
                got_db = [s]
            else:
                got_db = by_parent.pop(server.span_id, [])
            assert [s.name for s in got_db] == [w[0] for w in want], (db, op)
            for s, (_name, attrs, err) in zip(got_db, want, strict=True):
                assert s.kind == KIND_CLIENT
                assert s.attributes == attrs, (db, op)
                assert s.status_code == (STATUS_ERROR if err else STATUS_UNSET), (db, op)
                if op != "background":
                    assert s.trace_id == server.trace_id, (db, op)
                assert server.start_time_unix_nano <= s.start_time_unix_nano
                assert s.end_time_unix_nano <= server.end_time_unix_nano
    by_parent.pop(b"")
    assert not by_parent, "database spans with another parent"
    if not include:
        exported = {"file exporter": out.read_text(), "collector log (debug exporter)": col.log()}
        # sanity: the debug exporter did print the spans with their attributes
        assert "SELECT contacts" in exported["collector log (debug exporter)"]
        assert "db.collection.name" in exported["collector log (debug exporter)"]
        for where, text in exported.items():
            for sql in [*RAN_SQL, *SQL_FRAGMENTS, "db.query.text"]:
                assert sql not in text, f"{sql!r} in the {where}"


# ---- pure parts (no root)


def test_dsn_parsing() -> None:
    assert dbsql.parse_dsn("postgresql", "postgres://u:secret@127.0.0.1:5433/app?sslmode=disable") == {
        "server.address": "127.0.0.1", "server.port": 5433, "db.namespace": "app"}
    assert dbsql.parse_dsn("postgresql", "host=db.internal dbname=shop password=secret") == {
        "server.address": "db.internal", "server.port": 5432, "db.namespace": "shop"}
    assert dbsql.parse_dsn("postgresql", "host=/var/run/postgresql dbname=x") == {"db.namespace": "x"}
    assert dbsql.parse_dsn("mysql", "u:p@tcp(10.0.0.1:3307)/shop?parseTime=true") == {
        "server.address": "10.0.0.1", "server.port": 3307, "db.namespace": "shop"}
    assert dbsql.parse_dsn("sqlite", "/tmp/app.db") == {}


def test_system_names() -> None:
    assert dbsql.system_of("*github.com/jackc/pgx/v5/stdlib.driverConnector") == "postgresql"
    assert dbsql.system_of("*modernc.org/sqlite.Driver") == "sqlite"
    assert dbsql.system_of("*github.com/go-sql-driver/mysql.connector") == "mysql"
    assert dbsql.system_of("database/sql.dsnConnector") is None


def test_query_max_is_bounded_power_of_two() -> None:
    assert dbsql.Options(db_statement_max_length=10).query_max == 256
    assert dbsql.Options(db_statement_max_length=1000).query_max == 1024
    assert dbsql.Options(db_statement_max_length=10**6).query_max == 8192
