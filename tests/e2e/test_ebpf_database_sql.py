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
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.spans import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, STATUS_UNSET, Span, from_json_dict
from receiver.ebpf_go.gobinary import GoBinary
from receiver.ebpf_go.probes import database_sql as dbsql
from tests.support.gobuild import build_go_fixture
from tests.support.postgres import PostgresServer, PostgresUnavailable

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
# Raw statements of the fixture (with literals): none of them may reach an exporter when
# include_db_statement is off.
RAW_SQL = [
    "INSERT INTO contacts (id, name, phone) VALUES (10, 'Alice', '555-0100')",
    "DELETE FROM contacts WHERE name = 'Alice'",
    "SELECT name FROM contacts WHERE id",
    "SELECT * FROM no_such_table",
    "SELECT count(*) FROM contacts",
    "UPDATE contacts SET",
]
SYSTEMS = {"sqlite": ("sqlite", "modernc.org/sqlite.Error", "?", "?"),
           "pg": ("postgresql", "github.com/jackc/pgx/v5/pgconn.PgError", "$1", "$2")}


# ---- fixtures


@pytest.fixture(scope="module")
def dbapp() -> Path:
    return build_go_fixture("dbapp", GO_VERSION)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    try:
        pg = PostgresServer()
    except PostgresUnavailable as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(e))
    with pg:
        yield pg


class App:
    """dbapp running on a free port with a fresh SQLite file and the test PostgreSQL."""

    def __init__(self, binary: Path, pg: PostgresServer, workdir: Path) -> None:
        self.proc = subprocess.Popen([str(binary), "-sqlite", str(workdir / "app.db"), "-pg", pg.dsn],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"dbapp did not start: {line!r} {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.addr = line.split()[1]
        self.pid = self.proc.pid

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


def expected_spans(db: str, op: str) -> list[tuple[str, dict[str, Any], bool]]:
    system, err_type, _, _ = SYSTEMS[db]
    out = []
    for name, oper, coll, err, _text in EXPECTED[op]:
        attrs: dict[str, Any] = {"db.system.name": system, "db.operation.name": oper, "db.collection.name": coll}
        if err:
            attrs["error.type"] = err_type
        out.append((name, attrs, err))
    return out


def expected_text(db: str, op: str) -> list[str]:
    _, _, p1, p2 = SYSTEMS[db]
    return [t.format(p1=p1, p2=p2) for *_, t in EXPECTED[op]]


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
        self.attached = dbsql.attach(self.bpf, self.gb, str(binary), pid=pid)
        self.resolver = dbsql.DriverResolver(self.gb, pid)
        self.raw: list[bytes] = []

        def on_event(_ctx: Any, data: Any, size: int) -> None:
            self.raw.append(bytes(ct.string_at(data, size)))

        self._cb = on_event
        self.bpf["sql_events"].open_ring_buffer(on_event)

    def spans(self) -> list[Span]:
        self.bpf.ring_buffer_consume()
        out = [dbsql.to_span(dbsql.decode(r), self.resolver, self.options, 0) for r in self.raw]
        self.raw.clear()
        return out

    def close(self) -> None:
        from bcc import lib

        # BCC attached through the uprobe PMU: closing the perf event fd detaches. Its own
        # detach_uprobe_event also writes tracefs uprobe_events, absent here, and then fails.
        for name, fd in list(self.bpf.uprobe_fds.items()):
            lib.bpf_close_perf_event_fd(fd)
            del self.bpf.uprobe_fds[name]
        self.bpf.cleanup()
        shutil.rmtree(self.pin_dir, ignore_errors=True)


@root
@needs_root
def test_probe_alone_exact_spans(dbapp: Path, postgres: PostgresServer, tmp_path: Path) -> None:
    """Every endpoint of dbapp, both databases: one span per statement with the exact shape."""
    app = App(dbapp, postgres, tmp_path)
    probe = LoadedProbe(dbapp, app.pid, dbsql.Options(include_db_statement=True), "/sys/fs/bpf/otelgo_test_dbsql")
    try:
        assert len(probe.attached) == 4, probe.attached
        for db in SYSTEMS:
            for op in OPS:
                status = app.get(f"/{db}/{op}")
                assert status == (500 if op == "fail" else 200), (db, op)
                got = probe.spans()
                want = expected_spans(db, op)
                assert [s.name for s in got] == [w[0] for w in want], (db, op)
                for s, (_name, attrs, err), text in zip(got, want, expected_text(db, op), strict=True):
                    assert s.kind == KIND_CLIENT
                    assert s.status_code == (STATUS_ERROR if err else STATUS_UNSET)
                    assert s.attributes["db.query.text"] == text
                    extra = {k: v for k, v in s.attributes.items() if k not in attrs}
                    assert {k: s.attributes.get(k) for k in attrs} == attrs, (db, op)
                    if db == "pg":
                        assert extra == {"db.query.text": text, "server.address": "127.0.0.1",
                                         "server.port": postgres.port, "db.namespace": "postgres"}
                    else:
                        assert extra == {"db.query.text": text}
                    assert len(s.trace_id) == 16 and any(s.trace_id) and len(s.span_id) == 8
                    assert s.end_time_unix_nano > s.start_time_unix_nano
                    # no server probe loaded here: nothing to be a child of
                    assert s.parent_span_id == b""
    finally:
        probe.close()
        app.stop()


@root
@needs_root
def test_probe_alone_statement_off_and_truncation(dbapp: Path, postgres: PostgresServer, tmp_path: Path) -> None:
    """include_db_statement off: no text; on with sanitizing off and a short limit: raw, cut."""
    app = App(dbapp, postgres, tmp_path)
    try:
        off = LoadedProbe(dbapp, app.pid, dbsql.Options(), "/sys/fs/bpf/otelgo_test_dbsql_off")
        try:
            app.get("/pg/insert")
            (s,) = off.spans()
            assert s.name == "INSERT contacts" and "db.query.text" not in s.attributes
        finally:
            off.close()
        raw = LoadedProbe(dbapp, app.pid, dbsql.Options(include_db_statement=True, sanitize_db_statement=False,
                                                         db_statement_max_length=30), "/sys/fs/bpf/otelgo_test_dbsql_raw")
        try:
            app.get("/sqlite/delete")
            (s,) = raw.spans()
            assert s.attributes["db.query.text"] == "DELETE FROM contacts WHERE nam"
            assert s.name == "DELETE contacts"
        finally:
            raw.close()
    finally:
        app.stop()


# A stand-in for the net/http server probe: at ServeHTTP entry it tracks the request's context in
# the pinned ctx_spans map (as nethttp_server.c does) and reports the span ids it chose.
FAKE_SERVER_C = r"""
#include "go_types.h"
struct ctx_key { u64 ptr; u32 tgid; u32 pad; };
BPF_TABLE_PINNED("lru_hash", struct ctx_key, struct trace_ctx, ctx_spans, 16384, PIN_DIR "/ctx_spans");
BPF_RINGBUF_OUTPUT(fake_servers, 8);
int fake_server_entry(struct pt_regs *ctx) {
    u64 req = GO_PARAM4(ctx);
    struct go_iface ic = {};
    bpf_probe_read_user(&ic, sizeof(ic), (void *)(req + REQ_CTX_POS));
    struct ctx_key k = {.ptr = ic.data, .tgid = bpf_get_current_pid_tgid() >> 32};
    struct trace_ctx tc = {};
    new_span_ids(&tc, 0);
    ctx_spans.update(&k, &tc);
    fake_servers.ringbuf_output(&tc, sizeof(tc), 0);
    return 0;
}
"""


@root
@needs_root
def test_probe_alone_parent_from_request_context(dbapp: Path, postgres: PostgresServer, tmp_path: Path) -> None:
    """A statement run under a request's context is a child of the span tracked on that context
    (also through Tx and Stmt); one run with context.Background() is a root span."""
    from bcc import BPF, lib

    pin = "/sys/fs/bpf/otelgo_test_dbsql_parent"
    os.makedirs(pin, exist_ok=True)
    gb = GoBinary.open(dbapp)
    ctx_off = gb.struct_offset("net/http.Request", "ctx")
    assert ctx_off is not None
    app = App(dbapp, postgres, tmp_path)
    server = BPF(text=FAKE_SERVER_C.encode(), cflags=[f"-I{dbsql.BPF_SOURCE.parent}", f'-DPIN_DIR="{pin}"',
                                                      f"-DREQ_CTX_POS={ctx_off.value}"])
    server.attach_uprobe(name=str(dbapp), addr=gb.entry_probe("net/http.serverHandler.ServeHTTP").addr,
                         fn_name=b"fake_server_entry", pid=app.pid)
    parents: list[bytes] = []

    def on_server(_ctx: Any, data: Any, size: int) -> None:
        parents.append(bytes(ct.string_at(data, size)))

    server["fake_servers"].open_ring_buffer(on_server)
    probe = LoadedProbe(dbapp, app.pid, dbsql.Options(), pin)
    try:
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
        probe.close()
        for name, fd in list(server.uprobe_fds.items()):
            lib.bpf_close_perf_event_fd(fd)
            del server.uprobe_fds[name]
        server.cleanup()
        shutil.rmtree(pin, ignore_errors=True)
        app.stop()


# ---- the collector end to end


def _receiver_available() -> bool:
    try:
        import receiver.ebpf_go.receiver  # noqa: F401
    except ImportError:
        return False
    return True


def _collector_config(out: Path, dbapp: Path, include: bool) -> dict[str, Any]:
    return {
        "receivers": {"ebpf_go": {"include": [{"exe_path": str(dbapp)}],
                                  "include_db_statement": include}},
        "processors": {"batch": {"timeout": "100ms"}},
        "exporters": {"file": {"path": str(out)}},
        "service": {"pipelines": {"traces": {"receivers": ["ebpf_go"], "processors": ["batch"],
                                             "exporters": ["file"]}}},
    }


def _read_spans(path: Path) -> list[Span]:
    spans: list[Span] = []
    if not path.exists():
        return spans
    for line in path.read_text().splitlines():
        if line.strip():
            batch = from_json_dict(json.loads(line))
            for rs in batch.resource_spans:
                for ss in rs.scope_spans:
                    spans.extend(ss.spans)
    return spans


def _wait_spans(path: Path, n: int, timeout: float = 20.0) -> list[Span]:
    deadline = time.monotonic() + timeout
    spans = _read_spans(path)
    while len(spans) < n and time.monotonic() < deadline:
        time.sleep(0.2)
        spans = _read_spans(path)
    return spans


@root
@needs_root
@pytest.mark.skipif(not _receiver_available(), reason="the ebpf_go receiver is not in this tree yet")
@pytest.mark.parametrize("include", [True, False], ids=["statement-on", "statement-off"])
def test_collector_spans_and_parents(dbapp: Path, postgres: PostgresServer, tmp_path: Path, include: bool) -> None:
    from tests.support.collector import CollectorProcess

    out = tmp_path / "spans.jsonl"
    app = App(dbapp, postgres, tmp_path)
    col = CollectorProcess(_collector_config(out, dbapp, include), tmp_path)
    try:
        time.sleep(1.0)  # discovery and attachment
        want_db = 0
        for db in SYSTEMS:
            for op in OPS:
                app.get(f"/{db}/{op}")
                want_db += len(EXPECTED[op])
        spans = _wait_spans(out, want_db + len(SYSTEMS) * len(OPS))
    finally:
        col.stop()
        app.stop()
    servers = {s.span_id: s for s in spans if s.kind == KIND_SERVER}
    clients = [s for s in spans if s.kind == KIND_CLIENT and "db.system.name" in s.attributes]
    assert len(clients) == want_db, [s.name for s in clients]
    by_route: dict[str, list[Span]] = {}
    for c in clients:
        parent = servers.get(c.parent_span_id)
        if c.attributes.get("db.query.text", "").endswith("WHERE phone IS NOT NULL") or parent is None:
            by_route.setdefault("background", []).append(c)
            continue
        assert parent.trace_id == c.trace_id
        by_route.setdefault(str(parent.attributes.get("url.path")), []).append(c)
    for db in SYSTEMS:
        for op in OPS:
            if op == "background":
                continue
            got = by_route.get(f"/{db}/{op}", [])
            want = expected_spans(db, op)
            assert [s.name for s in got] == [w[0] for w in want], (db, op)
            for s, (_name, attrs, err), text in zip(got, want, expected_text(db, op), strict=True):
                assert {k: s.attributes.get(k) for k in attrs} == attrs
                assert s.status_code == (STATUS_ERROR if err else STATUS_UNSET)
                assert s.attributes.get("db.query.text") == (text if include else None)
    # a query run with context.Background() inside a handler has no request context: a root span
    bg = by_route["background"]
    assert len(bg) == 2 and all(s.parent_span_id == b"" for s in bg)
    if not include:
        raw = out.read_text()
        for sql in RAW_SQL:
            assert sql not in raw
        assert "db.query.text" not in raw


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
