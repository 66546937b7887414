"""One SQL code path for SQLite and PostgreSQL: the ledger's and the index of jobs'.

SQLite on disk (WAL mode) by default; PostgreSQL when given a `postgresql://` URL. The SQL is written once
(`?` parameters, `ON CONFLICT`, text instants in one sortable form: `iso`) and a small adapter runs it on either
database. Migrations run once each, in order, under a lock, recorded in a schema table of their own, so that
replicas that start together migrate once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal


class Sqlite:
    kind: Literal["sqlite"] = "sqlite"
    # text compared byte by byte (UTF-8 order is code point order): SQLite's default collation
    bytewise_text = "TEXT"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self.db.execute(sql, args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.db.executemany(sql, rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction that holds the write lock from its start."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def locked(self, name: str) -> Any:
        """A transaction that holds `name`'s lock: SQLite has one writer at a time anyway."""
        return self.transaction()

    def close(self) -> None:
        self.db.close()


class Postgres:
    kind: Literal["postgresql"] = "postgresql"
    # the database's collation may be a language's (en_US sorts "ab-c" between "abc" and "abd"): ranges over a
    # prefix need the byte order
    bytewise_text = 'TEXT COLLATE "C"'

    def __init__(self, url: str) -> None:
        import psycopg  # only a PostgreSQL database needs it

        self.db = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self.db.execute(sql.replace("?", "%s"), args)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.db.cursor() as cursor:  # in one round trip (libpq's pipeline)
            cursor.executemany(sql.replace("?", "%s"), rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.db.transaction():
            yield

    @contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """A transaction that holds `name`'s lock (released at commit): one writer of that name at a time, across
        every process on the database."""
        with self.db.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [name])
            yield

    def close(self) -> None:
        self.db.close()


Database = Sqlite | Postgres
# a migration is its SQL, or a function of the database that writes it (for the one word that differs)
Migration = str | Callable[[Database], str]


def open_database(target: Path | str) -> Database:
    """`target`: a SQLite file, or a `postgresql://` URL."""
    if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):
        return Postgres(target)
    return Sqlite(Path(target))


def schema_version(db: Database, table: str) -> int:
    return db.execute(f"SELECT COALESCE(MAX(version), 0) FROM {table}").fetchone()[0]


def migrate(db: Database, table: str, migrations: Sequence[Migration],
            legacy_version: Callable[[Database], int] | None = None) -> None:
    """Run the migrations `table` does not record yet, in order, each recorded with it, under a lock.

    `legacy_version`: how many migrations a database made before `table` existed counted otherwise."""
    db.execute(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER PRIMARY KEY, applied_at TEXT)")
    with db.locked(f"continuum_{table}"):
        legacy = legacy_version(db) if legacy_version else 0
        if schema_version(db, table) == 0 and legacy:
            for number in range(1, legacy + 1):
                db.execute(f"INSERT INTO {table} VALUES (?, ?)", [number, f"before {table}"])
        current = schema_version(db, table)
        for number, migration in enumerate(migrations[current:], start=current + 1):
            db.execute(migration if isinstance(migration, str) else migration(db))
            db.execute(f"INSERT INTO {table} VALUES (?, ?)", [number, iso(datetime.now(UTC))])


def iso(at: datetime) -> str:
    """One text form for every instant, so that text order is time order."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
