"""SQL statement text → span fields: operation, collection and sanitized text.

The database/sql probe captures the first bytes of each query string; this module turns them into
`db.operation.name` (the statement's first keyword, upper-cased: SELECT, INSERT, ... — WITH
clauses are skipped to the main statement), `db.collection.name` (only when the statement names
exactly one table, per the semantic conventions: a query over several tables has none) and, when
the user enables `db.query.text`, the text with every literal replaced by `?`.

It is a tokenizer, not a grammar: it never fails (unknown text gives no operation), it runs in
one pass, and a statement cut short by the capture limit is handled (an unterminated literal is
still replaced; a table name touching the cut is dropped since it may be incomplete).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Statement", "parse", "sanitize", "truncate", "span_name"]

# First keywords accepted as db.operation.name (low cardinality: anything else is no operation).
OPERATIONS = frozenset(
    """SELECT INSERT UPDATE DELETE MERGE REPLACE UPSERT CREATE DROP ALTER TRUNCATE RENAME
    BEGIN START COMMIT ROLLBACK SAVEPOINT RELEASE SET SHOW EXPLAIN ANALYZE VACUUM PRAGMA CALL EXEC
    EXECUTE PREPARE DEALLOCATE GRANT REVOKE LOCK COPY USE DECLARE FETCH CLOSE LISTEN NOTIFY VALUES
    ATTACH DETACH REINDEX REFRESH COMMENT DO""".split()
)
# Words that may follow a table name but are not an alias.
_CLAUSE_WORDS = frozenset(
    """WHERE SET VALUES SELECT DEFAULT ON USING JOIN INNER LEFT RIGHT FULL OUTER CROSS NATURAL
    GROUP ORDER LIMIT OFFSET HAVING WINDOW UNION INTERSECT EXCEPT RETURNING FOR AS LATERAL
    STRAIGHT_JOIN FETCH TABLESAMPLE WITH OVERRIDING OUTPUT""".split()
)
_JOIN_WORDS = frozenset({"JOIN", "STRAIGHT_JOIN"})
_TABLE_OBJECTS = frozenset({"TABLE", "VIEW", "MATERIALIZED", "SEQUENCE", "INDEX"})

# Token kinds.
WS, COMMENT, WORD, QIDENT, STRING, NUMBER, PARAM, PUNCT = range(8)

_NUMBER = re.compile(r"0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_WORD = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_PARAM = re.compile(r"\$\d+|\?\d*|[:@][A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Token:
    kind: int
    text: str
    end_of_input: bool = False  # the token runs into the end of the captured text


def _tokens(sql: str, mysql: bool = False) -> list[Token]:
    """Split `sql` into tokens. `mysql`: double quotes and backslash escapes make string literals."""
    out: list[Token] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace():
            j = i + 1
            while j < n and sql[j].isspace():
                j += 1
            out.append(Token(WS, sql[i:j]))
            i = j
        elif c == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            j = n if j < 0 else j
            out.append(Token(COMMENT, sql[i:j]))
            i = j
        elif c == "/" and sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(Token(COMMENT, sql[i:j]))
            i = j
        elif c == "'" or (c == '"' and mysql):
            j = _quoted_end(sql, i, c, backslash=mysql)
            out.append(Token(STRING, sql[i:j], j >= n and not _closed(sql, i, j, c)))
            i = j
        elif c in "\"`":
            j = _quoted_end(sql, i, c, backslash=False)
            out.append(Token(QIDENT, sql[i:j], j >= n))
            i = j
        elif c == "$" and (m := _DOLLAR_TAG.match(sql, i)) is not None:
            tag = m.group(0)
            j = sql.find(tag, m.end())
            j = n if j < 0 else j + len(tag)
            out.append(Token(STRING, sql[i:j], j >= n))
            i = j
        elif (c == "$" or c == "?" or c == "@" or (c == ":" and not sql.startswith("::", i) and
                                                     not (i > 0 and sql[i - 1] == ":"))) and (
            m := _PARAM.match(sql, i)
        ) is not None:
            out.append(Token(PARAM, m.group(0)))
            i = m.end()
        elif c.isdigit() or (c == "." and i + 1 < n and sql[i + 1].isdigit()):
            m = _NUMBER.match(sql, i)
            assert m is not None
            out.append(Token(NUMBER, m.group(0), m.end() >= n))
            i = m.end()
        elif (m := _WORD.match(sql, i)) is not None:
            j = m.end()
            word = m.group(0)
            # Prefixed string literals: E'..', N'..', X'..', B'..', U&'..'.
            if j < n and sql[j] == "'" and word.upper() in ("E", "N", "X", "B", "U"):
                k = _quoted_end(sql, j, "'", backslash=mysql or word.upper() == "E")
                out.append(Token(STRING, sql[i:k], k >= n and not _closed(sql, j, k, "'")))
                i = k
            else:
                out.append(Token(WORD, word, j >= n))
                i = j
        else:
            out.append(Token(PUNCT, c))
            i += 1
    return out


def _quoted_end(sql: str, start: int, q: str, backslash: bool) -> int:
    """Index just past the literal or identifier opened by `q` at `start` (len(sql) if unclosed)."""
    i, n = start + 1, len(sql)
    while i < n:
        c = sql[i]
        if backslash and c == "\\":
            i += 2
            continue
        if c == q:
            if i + 1 < n and sql[i + 1] == q:  # doubled quote: an escaped quote
                i += 2
                continue
            return i + 1
        i += 1
    return n


def _closed(sql: str, start: int, end: int, q: str) -> bool:
    return end - start >= 2 and sql[end - 1] == q and end <= len(sql)


def sanitize(sql: str, mysql: bool = False) -> str:
    """`sql` with every string and numeric literal replaced by `?` (placeholders, identifiers,
    keywords and comments kept). An unterminated literal (text cut short) becomes one `?`."""
    parts: list[str] = []
    for t in _tokens(sql, mysql):
        parts.append("?" if t.kind in (STRING, NUMBER) else t.text)
    return "".join(parts)


def truncate(text: str, max_length: int) -> str:
    """At most `max_length` characters (never cuts inside a character)."""
    return text if len(text) <= max_length else text[:max_length]


@dataclass(frozen=True)
class Statement:
    operation: str | None  # db.operation.name, upper-cased; None when not recognised
    collection: str | None  # db.collection.name when exactly one table is named


class _Parser:
    """Walks the significant tokens (no whitespace or comments) of the first statement."""

    def __init__(self, toks: list[Token]) -> None:
        self.t = toks
        self.i = 0
        self.tables: list[str] = []
        self.incomplete = False  # a table name ran into the end of the captured text
        self.cte_names: set[str] = set()
        self.truncated = False

    def peek(self, k: int = 0) -> Token | None:
        j = self.i + k
        return self.t[j] if j < len(self.t) else None

    def word(self, k: int = 0) -> str:
        tok = self.peek(k)
        return tok.text.upper() if tok is not None and tok.kind == WORD else ""

    def punct(self, ch: str, k: int = 0) -> bool:
        tok = self.peek(k)
        return tok is not None and tok.kind == PUNCT and tok.text == ch

    def skip_parens(self) -> None:
        """At `(`: move past its matching `)` (or to the end)."""
        depth = 0
        while self.i < len(self.t):
            if self.punct("("):
                depth += 1
            elif self.punct(")"):
                depth -= 1
                if depth == 0:
                    self.i += 1
                    return
            self.i += 1

    def table_name(self) -> str | None:
        """Read a possibly qualified name (a.b."c") at the cursor, record it, return it."""
        parts: list[str] = []
        touched_end = False
        while True:
            tok = self.peek()
            if tok is None or tok.kind not in (WORD, QIDENT):
                break
            if tok.kind == WORD and not parts and tok.text.upper() in _CLAUSE_WORDS:
                break
            parts.append(tok.text)
            touched_end = touched_end or tok.end_of_input
            self.i += 1
            if self.punct("."):
                parts.append(".")
                self.i += 1
                if self.peek() is None:
                    touched_end = True
                continue
            break
        if not parts:
            return None
        name = "".join(parts)
        if touched_end:
            self.incomplete = True
        self.tables.append(name)
        return name

    def table_list(self) -> None:
        """FROM/USING list: name [alias], name [alias] ... and JOINs (recorded at the top level)."""
        while True:
            if self.punct("("):
                self.skip_parens()  # a subquery: its FROMs were not visited; treat as another table
                self.tables.append("(subquery)")
            elif self.word() in ("ONLY", "LATERAL"):
                self.i += 1
                continue
            elif self.table_name() is None:
                return
            # optional alias
            if self.word() == "AS":
                self.i += 1
            tok = self.peek()
            if tok is not None and (tok.kind == QIDENT or (tok.kind == WORD and tok.text.upper() not in _CLAUSE_WORDS)):
                self.i += 1
            if self.punct(","):
                self.i += 1
                continue
            return

    def scan(self) -> None:
        """Visit the rest of the statement, recording tables after FROM/JOIN/INTO/UPDATE."""
        while self.i < len(self.t):
            if self.punct(";"):
                return
            w = self.word()
            if w in ("FROM", "USING") or w in _JOIN_WORDS:
                self.i += 1
                self.table_list()
            elif w == "INTO":
                self.i += 1
                self.table_name()
            else:
                self.i += 1

    def with_clause(self) -> None:
        """At WITH: skip the common table expressions, remembering their names."""
        self.i += 1
        if self.word() == "RECURSIVE":
            self.i += 1
        while self.i < len(self.t):
            tok = self.peek()
            if tok is None or tok.kind not in (WORD, QIDENT):
                return
            self.cte_names.add(tok.text)
            self.i += 1
            if self.punct("("):
                self.skip_parens()
            if self.word() != "AS":
                return
            self.i += 1
            if self.word() == "NOT":
                self.i += 1
            if self.word() == "MATERIALIZED":
                self.i += 1
            if not self.punct("("):
                return
            depth_start = self.i
            # tables used inside a CTE body count as tables of the statement
            self.skip_parens()
            inner = _Parser(self.t[depth_start + 1 : self.i - 1])
            inner.truncated = self.truncated
            inner.scan()
            self.tables.extend(inner.tables)
            self.incomplete = self.incomplete or inner.incomplete
            if self.punct(","):
                self.i += 1
                continue
            return

    def statement(self) -> Statement:
        while self.punct("("):
            self.i += 1
        op = self.word()
        if op == "WITH":
            self.with_clause()
            op = self.word()
        if op not in OPERATIONS:
            return Statement(None, None)
        self.i += 1
        if op == "UPDATE":
            while self.word() in ("ONLY", "OR", "ROLLBACK", "ABORT", "REPLACE", "FAIL", "IGNORE", "LOW_PRIORITY"):
                self.i += 1
            self.table_list()
        elif op in ("CREATE", "DROP", "ALTER", "TRUNCATE"):
            self.ddl_target(op)
        elif op in ("INSERT", "REPLACE", "UPSERT", "MERGE"):
            while self.word() in ("OR", "REPLACE", "ROLLBACK", "ABORT", "FAIL", "IGNORE", "LOW_PRIORITY",
                                  "DELAYED", "HIGH_PRIORITY"):
                self.i += 1
            if self.word() == "INTO":
                self.i += 1
            self.table_name()
        elif op not in ("SELECT", "DELETE", "VALUES"):
            return Statement(op, None)
        self.scan()
        names = {t for t in self.tables if t not in self.cte_names}
        if len(names) != 1 or self.incomplete or any(n.startswith("(") for n in names):
            return Statement(op, None)
        return Statement(op, names.pop())

    def ddl_target(self, op: str) -> None:
        if op == "TRUNCATE":
            if self.word() == "TABLE":
                self.i += 1
            if self.word() == "ONLY":
                self.i += 1
            self.table_list()
            return
        while self.word() in ("OR", "REPLACE", "TEMP", "TEMPORARY", "UNLOGGED", "GLOBAL", "LOCAL", "UNIQUE",
                              "VIRTUAL"):
            self.i += 1
        if self.word() == "INDEX":  # CREATE INDEX [name] ON table
            while self.i < len(self.t) and self.word() != "ON":
                self.i += 1
            self.i += 1
            if self.word() == "ONLY":
                self.i += 1
            self.table_name()
            return
        if self.word() not in _TABLE_OBJECTS:
            self.tables.append("(other object)")
            return
        while self.word() in _TABLE_OBJECTS:
            self.i += 1
        if self.word() == "IF":  # IF [NOT] EXISTS
            self.i += 1
            while self.word() in ("NOT", "EXISTS"):
                self.i += 1
        if self.word() == "ONLY":
            self.i += 1
        self.table_name()
        if op == "DROP":
            while self.punct(","):
                self.i += 1
                self.table_name()


@lru_cache(maxsize=4096)
def parse(sql: str, truncated: bool = False, mysql: bool = False) -> Statement:
    """Operation and single collection of the first statement in `sql`.

    `truncated`: the text is a prefix of the real statement (names running into its end are
    not trusted). Cached: applications run the same few statements over and over."""
    toks = [t for t in _tokens(sql, mysql) if t.kind not in (WS, COMMENT)]
    if not truncated:
        toks = [Token(t.kind, t.text) for t in toks]
    p = _Parser(toks)
    p.truncated = truncated
    return p.statement()


def span_name(stmt: Statement, system: str) -> str:
    """`{operation} {collection}`, `{operation}`, else the database system name."""
    if stmt.operation and stmt.collection:
        return f"{stmt.operation} {stmt.collection}"
    return stmt.operation or system
