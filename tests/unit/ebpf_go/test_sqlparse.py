"""sqlparse: statement text → db.operation.name, db.collection.name, sanitized db.query.text."""

from __future__ import annotations

import pytest

from receiver.ebpf_go.sqlparse import Statement, parse, sanitize, span_name, truncate


@pytest.mark.parametrize(
    ("sql", "op", "coll"),
    [
        ("SELECT name FROM contacts WHERE id = $1", "SELECT", "contacts"),
        ("select * from contacts", "SELECT", "contacts"),
        ("  \n-- leading comment\n/* block */ SELECT 1 FROM t", "SELECT", "t"),
        ("SELECT a FROM public.users u WHERE u.id = ?", "SELECT", "public.users"),
        ('SELECT a FROM "My Table" AS x', "SELECT", '"My Table"'),
        ("SELECT a FROM `db`.`orders`", "SELECT", "`db`.`orders`"),
        ("INSERT INTO contacts (id, name) VALUES (10, 'Alice')", "INSERT", "contacts"),
        ("insert or replace into contacts values (1)", "INSERT", "contacts"),
        ("REPLACE INTO kv (k, v) VALUES (?, ?)", "REPLACE", "kv"),
        ("UPDATE contacts SET phone = $1 WHERE name = $2", "UPDATE", "contacts"),
        ("UPDATE ONLY contacts SET a = 1", "UPDATE", "contacts"),
        ("DELETE FROM contacts WHERE name = 'Alice'", "DELETE", "contacts"),
        ("CREATE TABLE IF NOT EXISTS contacts (id INTEGER PRIMARY KEY)", "CREATE", "contacts"),
        ("CREATE TEMP TABLE scratch (x int)", "CREATE", "scratch"),
        ("CREATE UNIQUE INDEX idx_name ON contacts (name)", "CREATE", "contacts"),
        ("DROP TABLE IF EXISTS contacts", "DROP", "contacts"),
        ("ALTER TABLE contacts ADD COLUMN email TEXT", "ALTER", "contacts"),
        ("TRUNCATE TABLE contacts", "TRUNCATE", "contacts"),
        ("(SELECT 1 FROM t)", "SELECT", "t"),
        ("WITH recent AS (SELECT * FROM orders WHERE ts > 5) SELECT * FROM recent", "SELECT", "orders"),
        ("WITH a AS (SELECT 1) UPDATE contacts SET x = 1", "UPDATE", "contacts"),
        ("SELECT count(*) FROM contacts; SELECT * FROM other", "SELECT", "contacts"),
    ],
)
def test_operation_and_single_collection(sql: str, op: str, coll: str) -> None:
    assert parse(sql) == Statement(op, coll)


@pytest.mark.parametrize(
    ("sql", "op"),
    [
        ("SELECT 1", "SELECT"),
        ("SELECT * FROM a JOIN b ON a.id = b.id", "SELECT"),
        ("SELECT * FROM a, b", "SELECT"),
        ("SELECT * FROM a LEFT OUTER JOIN b USING (id)", "SELECT"),
        ("SELECT * FROM (SELECT * FROM a) sub", "SELECT"),
        ("SELECT * FROM a WHERE id IN (SELECT id FROM b)", "SELECT"),
        ("SELECT * FROM a UNION SELECT * FROM b", "SELECT"),
        ("INSERT INTO a SELECT * FROM b", "INSERT"),
        ("UPDATE a SET x = b.x FROM b WHERE a.id = b.id", "UPDATE"),
        ("DROP TABLE a, b", "DROP"),
        ("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql", "CREATE"),
        ("BEGIN", "BEGIN"),
        ("commit", "COMMIT"),
        ("SET search_path TO public", "SET"),
        ("PRAGMA journal_mode=WAL", "PRAGMA"),
    ],
)
def test_no_single_collection(sql: str, op: str) -> None:
    assert parse(sql) == Statement(op, None)


@pytest.mark.parametrize("sql", ["", "   ", "-- only a comment", "frobnicate the table", "42", "'x'"])
def test_unparsable_gives_nothing(sql: str) -> None:
    assert parse(sql) == Statement(None, None)


def test_truncated_name_is_not_trusted() -> None:
    # the capture stopped inside the table name: the prefix "contac" must not become a collection
    assert parse("SELECT * FROM contac", truncated=True) == Statement("SELECT", None)
    # the name is complete (followed by more text) even though the text was cut later
    assert parse("SELECT * FROM contacts WHERE na", truncated=True) == Statement("SELECT", "contacts")
    # not truncated: the same text is a whole statement
    assert parse("SELECT * FROM contac") == Statement("SELECT", "contac")


@pytest.mark.parametrize(
    ("sql", "want"),
    [
        ("SELECT name FROM contacts WHERE id = 1", "SELECT name FROM contacts WHERE id = ?"),
        ("INSERT INTO contacts (id, name, phone) VALUES (10, 'Alice', '555-0100')",
         "INSERT INTO contacts (id, name, phone) VALUES (?, ?, ?)"),
        ("SELECT * FROM t WHERE a = 'it''s' AND b = -1.5e3 AND c = .5", "SELECT * FROM t WHERE a = ? AND b = -? AND c = ?"),
        ("SELECT * FROM t WHERE x = $1 AND y = ? AND z = :name AND w = @p1", None),
        ("SELECT col1, t2.x9 FROM t2 WHERE v = 0x1F", "SELECT col1, t2.x9 FROM t2 WHERE v = ?"),
        ("SELECT E'a\\'b', N'x', X'ff' FROM t", "SELECT ?, ?, ? FROM t"),
        ("SELECT $tag$ secret ' $tag$, $$x$$ FROM t", "SELECT ?, ? FROM t"),
        ('SELECT "Quoted Col" FROM "T1" WHERE a IN (1, 2, 3)', 'SELECT "Quoted Col" FROM "T1" WHERE a IN (?, ?, ?)'),
        ("SELECT a::int, b FROM t WHERE c = 'x' -- trailing note", "SELECT a::int, b FROM t WHERE c = ? -- trailing note"),
        # cut short inside a literal: the rest is replaced, nothing of the secret is kept
        ("SELECT * FROM users WHERE password = 'hunter", "SELECT * FROM users WHERE password = ?"),
    ],
)
def test_sanitize(sql: str, want: str | None) -> None:
    assert sanitize(sql) == (sql if want is None else want)


def test_sanitize_mysql_quotes_and_backslashes() -> None:
    sql = 'SELECT * FROM t WHERE a = "secret" AND b = \'it\\\'s\''
    assert sanitize(sql, mysql=True) == "SELECT * FROM t WHERE a = ? AND b = ?"
    # default (ANSI): double quotes are identifiers
    assert sanitize('SELECT "a" FROM t') == 'SELECT "a" FROM t'


def test_sanitize_never_keeps_literal_text() -> None:
    secrets = ["s3cr3t", "4111111111111111", "hunter2"]
    for sql in [
        "INSERT INTO cards VALUES ('s3cr3t', 4111111111111111, 'hunter2')",
        "UPDATE u SET pw = 'hunter2', card = 4111111111111111, note = $q$s3cr3t$q$",
    ]:
        out = sanitize(sql)
        for s in secrets:
            assert s not in out, out


def test_truncate_and_span_name() -> None:
    assert truncate("SELECT é FROM t", 8) == "SELECT é"
    assert truncate("abc", 10) == "abc"
    assert span_name(Statement("SELECT", "contacts"), "postgresql") == "SELECT contacts"
    assert span_name(Statement("BEGIN", None), "postgresql") == "BEGIN"
    assert span_name(Statement(None, None), "sqlite") == "sqlite"
