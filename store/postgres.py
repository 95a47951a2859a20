"""PostgreSQL under the store: the few calls of sqlite-utils' ``Database`` the store makes,
done with psycopg 3, so the mixins and the migrations run unchanged on either database.

``Store("postgresql://user:password@host:port/db")`` opens one of these per thread (as
for SQLite). What the store uses, and only that: ``db.execute`` and ``db.query`` with
``?`` placeholders, ``db[table]`` with ``insert``, ``update``, ``rows_where``,
``count_where`` and ``count``, and for the migrations ``create``, ``create_index``,
``add_column`` and ``db.create_view``. Statements outside a transaction commit at once
(autocommit), as sqlite3's do with sqlite-utils.

SQLite's ``rowid`` (insertion order, the store's tie-break between rows of the same
microsecond) is a column here: every table is created with ``rowid`` as an identity
column, which ``rows_where`` leaves out of the rows as SQLite's ``SELECT *`` does.

Why not SQLAlchemy Core for both: it would mean rewriting every mixin and every migration
(and the schema test) to gain a second backend the store needs ~200 lines for; the SQLite
path stays byte-for-byte what it was and tested. See docs/architecture.md.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from contextlib import contextmanager
from typing import Any, Iterable, Iterator
from urllib.parse import unquote

import psycopg
from psycopg import sql as pgsql
from psycopg.rows import dict_row

# pg_advisory_xact_lock keys (any 64-bit numbers no other program on the server uses): one
# for the store's write transactions (SQLite's BEGIN IMMEDIATE: queue_job's check-then-
# insert must not interleave with another replica's), one for applying migrations (two
# replicas starting at once would both run a step).
WRITE_LOCK = 0x61737369_00000001
MIGRATE_LOCK = 0x61737369_00000002
# Seconds to wait for the server at start: an unreachable host fails with a message
# instead of hanging (libpq waits forever by default).
CONNECT_TIMEOUT_S = 10
# Same role as SQLite's busy timeout: a statement waiting longer for a lock fails.
LOCK_TIMEOUT_S = 15
MIGRATIONS_TABLE = "_migrations"

_TYPES = {str: "TEXT", int: "BIGINT", float: "DOUBLE PRECISION", bytes: "BYTEA"}


class DatabaseUnavailable(RuntimeError):
    """The database URL is wrong or its server cannot be reached; the message says which."""


class DatabaseBusy(sqlite3.OperationalError):
    """A statement PostgreSQL could not carry out for a reason of the moment (a lock held past
    ``LOCK_TIMEOUT_S``, the connection lost, the disk full). It is a sqlite3.OperationalError
    because that is the one storage error ``assistant.chat`` turns into a message the user
    can act on, and serving may not import the store to learn another."""


def is_url(target: Any) -> bool:
    return isinstance(target, str) and "://" in target


# scheme://user:PASSWORD@ ... up to the last @, so a password with an unencoded @ goes whole
# (a regex, not urlsplit: a malformed URL, which urlsplit refuses, must be redacted too).
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@]*):(.*)@")


def redact(url: str) -> str:
    """The URL with its password replaced by ***: the only form of it that is printed."""
    return _PASSWORD.sub(lambda m: f"{m.group(1)}:***@", url, count=1)


def _scrub(text: str, url: str) -> str:
    """``text`` with the URL's password (as written and percent-decoded) replaced by ***."""
    m = _PASSWORD.match(url)
    if m and m.group(2):
        for form in sorted({m.group(2), unquote(m.group(2))}, key=len, reverse=True):
            text = text.replace(form, "***")
    return text


def check_url(url: str) -> str:
    scheme = url.partition("://")[0]
    if scheme not in ("postgresql", "postgres"):
        raise DatabaseUnavailable(
            f"Cannot use the database {redact(url)!r}: only postgresql://user[:password]@host[:port]/name "
            "URLs or a SQLite file path are supported.")
    return url


def connect(url: str) -> "PgDatabase":
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as e:
        # libpq names host, port, user and database; a malformed URL it may quote whole.
        raise DatabaseUnavailable(f"Cannot open the database {redact(url)}: {_scrub(str(e).strip(), url)}") from None
    conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
    return PgDatabase(conn)


@functools.lru_cache(maxsize=512)
def _placeholders(query: str) -> str:
    """sqlite3's ``?`` as psycopg's ``%s`` (and a literal ``%`` doubled), outside quotes."""
    out, quote = [], None
    for ch in query:
        if quote:
            quote = None if ch == quote else quote
            out.append("%%" if ch == "%" else ch)
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        else:
            out.append("%s" if ch == "?" else "%%" if ch == "%" else ch)
    return "".join(out)


class PgDatabase:
    """One connection, read and written through sqlite-utils' method names."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn
        self._columns: dict[str, list[str]] = {}
        self._pks: dict[str, str] = {}

    def execute(self, query: str, params: Iterable = ()) -> psycopg.Cursor:
        return self.run(_placeholders(query), list(params))

    def query(self, query: str, params: Iterable = ()) -> Iterator[dict]:
        cur = self.conn.cursor(row_factory=dict_row)
        try:
            cur.execute(_placeholders(query), list(params))
        except psycopg.OperationalError as e:
            raise DatabaseBusy(str(e).strip()) from e
        yield from cur

    def run(self, query: Any, params: list | None = None) -> psycopg.Cursor:
        """Execute a psycopg query (``%s`` placeholders or ``psycopg.sql``)."""
        try:
            return self.conn.execute(query, params)
        except psycopg.OperationalError as e:
            raise DatabaseBusy(str(e).strip()) from e

    @property
    def usable(self) -> bool:
        """False once the connection broke (the server restarted): the store opens another."""
        return not (self.conn.closed or self.conn.broken)

    def __getitem__(self, name: str) -> "PgTable":
        return PgTable(self, name)

    @contextmanager
    def write(self) -> Iterator["PgDatabase"]:
        """A transaction that holds the store's write lock: SQLite's BEGIN IMMEDIATE, across
        every process using this database. Nested: a savepoint in the outer one."""
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with self.conn.transaction():
                yield self
            return
        with self.conn.transaction():
            self.run("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK])
            yield self

    def create_view(self, name: str, query: str) -> None:
        self.conn.execute(pgsql.SQL("CREATE VIEW {} AS {}").format(pgsql.Identifier(name), pgsql.SQL(query)))

    def table_names(self) -> list[str]:
        rows = self.conn.execute("SELECT table_name FROM information_schema.tables "
                                 "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'")
        return sorted(r[0] for r in rows)

    def columns(self, table: str) -> list[str]:
        """The table's columns in order, ``rowid`` left out (cached: migrations reset it)."""
        if table not in self._columns:
            rows = self.conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = %s AND column_name != 'rowid' ORDER BY ordinal_position", [table]).fetchall()
            self._columns[table] = [r[0] for r in rows]
        return self._columns[table]

    def primary_key(self, table: str) -> str:
        if table not in self._pks:
            row = self.conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = %s::regclass AND i.indisprimary", [table]).fetchone()
            self._pks[table] = row[0]
        return self._pks[table]

    def forget_schema(self) -> None:
        self._columns.clear()
        self._pks.clear()


class PgTable:
    def __init__(self, db: PgDatabase, name: str):
        self.db, self.name = db, name
        self._ident = pgsql.Identifier(name)

    # -- rows ------------------------------------------------------------------------

    def insert(self, row: dict) -> None:
        cols = list(row)
        self.db.run(
            pgsql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                self._ident, pgsql.SQL(", ").join(map(pgsql.Identifier, cols)),
                pgsql.SQL(", ").join(pgsql.Placeholder() * len(cols))),
            [row[c] for c in cols])

    def update(self, pk_value: Any, changes: dict) -> None:
        cols = list(changes)
        self.db.run(
            pgsql.SQL("UPDATE {} SET {} WHERE {} = %s").format(
                self._ident,
                pgsql.SQL(", ").join(pgsql.SQL("{} = %s").format(pgsql.Identifier(c)) for c in cols),
                pgsql.Identifier(self.db.primary_key(self.name))),
            [changes[c] for c in cols] + [pk_value])

    def rows_where(self, where: str | None = None, params: Iterable = (), *, order_by: str | None = None,
                   limit: int | None = None) -> Iterator[dict]:
        cols = ", ".join(f'"{c}"' for c in self.db.columns(self.name))
        query = f'SELECT {cols} FROM "{self.name}"'
        if where:
            query += f" WHERE {where}"
        if order_by:
            query += f" ORDER BY {order_by}"
        if limit is not None:
            query += f" LIMIT {int(limit)}"
        return self.db.query(query, params)

    def count_where(self, where: str, params: Iterable = ()) -> int:
        return self.db.execute(f'SELECT COUNT(*) FROM "{self.name}" WHERE {where}', params).fetchone()[0]

    @property
    def count(self) -> int:
        return self.db.execute(f'SELECT COUNT(*) FROM "{self.name}"').fetchone()[0]

    # -- schema (the migrations) ---------------------------------------------------------

    def create(self, columns: dict, pk: str, not_null: Iterable[str] = (), defaults: dict | None = None,
               foreign_keys: Iterable[tuple[str, str, str]] = ()) -> None:
        not_null, defaults = set(not_null), defaults or {}
        parts = []
        for col, kind in columns.items():
            part = f'"{col}" {_TYPES[kind]}'
            if col == pk:
                part += " PRIMARY KEY"
            if col in not_null:
                part += " NOT NULL"
            if col in defaults:
                part += f" DEFAULT {_literal(defaults[col])}"
            parts.append(part)
        parts.append('"rowid" BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE')  # SQLite's insertion order
        for col, other, other_col in foreign_keys:
            parts.append(f'FOREIGN KEY ("{col}") REFERENCES "{other}"("{other_col}")')
        self.db.conn.execute(f'CREATE TABLE "{self.name}" ({", ".join(parts)})')
        self.db.forget_schema()

    def create_index(self, columns: list[str], unique: bool = False) -> None:
        name = f"idx_{self.name}_{'_'.join(columns)}"  # sqlite-utils' naming
        cols = ", ".join(f'"{c}"' for c in columns)
        self.db.conn.execute(f'CREATE {"UNIQUE " if unique else ""}INDEX "{name}" ON "{self.name}" ({cols})')

    def add_column(self, name: str, kind: type, not_null_default: Any = None) -> None:
        extra = "" if not_null_default is None else f" NOT NULL DEFAULT {_literal(not_null_default)}"
        self.db.conn.execute(f'ALTER TABLE "{self.name}" ADD COLUMN "{name}" {_TYPES[kind]}{extra}')
        self.db.forget_schema()


def _literal(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(f"no default of type {type(value).__name__} in a migration")
    return pgsql.Literal(value).as_string()


def apply_migrations(db: PgDatabase, migrations: Any) -> None:
    """The steps of a sqlite-utils ``Migrations`` not yet recorded in ``_migrations``, in
    order, each in one transaction with its record (PostgreSQL's DDL is transactional, so a
    failed step leaves nothing behind), under a lock so replicas starting together take turns."""
    conn = db.conn
    conn.execute("SELECT pg_advisory_lock(%s)", [MIGRATE_LOCK])
    try:
        conn.execute(f'CREATE TABLE IF NOT EXISTS "{MIGRATIONS_TABLE}" (migration_set TEXT NOT NULL, '
                     "name TEXT NOT NULL, applied_at TEXT NOT NULL, PRIMARY KEY (migration_set, name))")
        done = {r[0] for r in conn.execute(
            f'SELECT name FROM "{MIGRATIONS_TABLE}" WHERE migration_set = %s', [migrations.name])}
        for step in migrations._migrations:
            if step.name in done:
                continue
            with conn.transaction():
                step.fn(db)
                conn.execute(f'INSERT INTO "{MIGRATIONS_TABLE}" VALUES (%s, %s, now()::text)',
                             [migrations.name, step.name])
    finally:
        db.forget_schema()
        conn.execute("SELECT pg_advisory_unlock(%s)", [MIGRATE_LOCK])
