"""The ledger: usage lines on disk, one per job, never two (SQLite in WAL mode by default)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from shared.contracts.billing import UsageLine

_FIELDS = tuple(UsageLine.model_fields)

# Each migration runs once, in order; the ledger records how far it has got.
MIGRATIONS = (
    """CREATE TABLE usage_lines (
        job_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, site TEXT NOT NULL, gpu_type TEXT NOT NULL,
        gpus INTEGER NOT NULL, started_at TEXT NOT NULL, ended_at TEXT NOT NULL, state TEXT NOT NULL,
        seconds REAL NOT NULL, gpu_hours REAL NOT NULL, amount_eur REAL NOT NULL, allocation_hours REAL NOT NULL,
        energy_kwh REAL NOT NULL, co2e_kg REAL NOT NULL)""",
    "CREATE INDEX usage_lines_tenant_ended ON usage_lines (tenant, ended_at)",
)


class Ledger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        (version,) = self.db.execute("PRAGMA user_version").fetchone()
        for number, sql in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute(sql)
                self.db.execute(f"PRAGMA user_version={number}")

    def add(self, line: UsageLine) -> bool:
        """Record the line; False if the job has one already (the line is keyed on the job, not the message)."""
        row = line.model_dump(mode="json") | {"started_at": _iso(line.started_at), "ended_at": _iso(line.ended_at)}
        cursor = self.db.execute(
            f"INSERT OR IGNORE INTO usage_lines ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})",
            [row[f] for f in _FIELDS])
        return cursor.rowcount == 1

    def get(self, job_id: str) -> UsageLine | None:
        rows = self._select("job_id = ?", [job_id])
        return rows[0] if rows else None

    def lines(self, tenant: str, since: datetime | None = None, until: datetime | None = None) -> list[UsageLine]:
        where, args = ["tenant = ?"], [tenant]
        if since:
            where.append("ended_at >= ?")
            args.append(_iso(since))
        if until:
            where.append("ended_at < ?")
            args.append(_iso(until))
        return self._select(" AND ".join(where), args)

    def totals(self, tenant: str, since: datetime | None = None) -> tuple[float, float]:
        """(euros, allocation hours) metered for the tenant since `since` (or ever)."""
        where, args = "tenant = ?", [tenant]
        if since:
            where += " AND ended_at >= ?"
            args.append(_iso(since))
        row = self.db.execute(f"SELECT COALESCE(SUM(amount_eur), 0), COALESCE(SUM(allocation_hours), 0) "
                              f"FROM usage_lines WHERE {where}", args).fetchone()
        return float(row[0]), float(row[1])

    def _select(self, where: str, args: list) -> list[UsageLine]:
        cursor = self.db.execute(f"SELECT {', '.join(_FIELDS)} FROM usage_lines WHERE {where} ORDER BY ended_at, job_id", args)
        return [UsageLine.model_validate(dict(zip(_FIELDS, row, strict=True))) for row in cursor]

    def close(self) -> None:
        self.db.close()


def _iso(at: datetime) -> str:
    """One text form for every instant, so that the ledger's text order is time order."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
