"""The ledger: usage lines, one per job and never two, and budget top-ups.

SQLite on disk (WAL mode) by default; PostgreSQL when given a `postgresql://` URL (`CONTINUUM_LEDGER_URL`).
One code path for both (`shared/sql.py`): the SQL below is written once (`?` parameters, `ON CONFLICT DO
NOTHING`, text instants in one sortable form). Migrations run once each, in order, under a lock, recorded in
`ledger_schema`, so replicas that start together migrate once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from shared import sql
from shared.contracts.billing import Topup, UsageLine

_FIELDS = tuple(UsageLine.model_fields)
_TOPUP_FIELDS = tuple(Topup.model_fields)

MIGRATIONS = (
    """CREATE TABLE usage_lines (
        job_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, site TEXT NOT NULL, gpu_type TEXT NOT NULL,
        gpus INTEGER NOT NULL, started_at TEXT NOT NULL, ended_at TEXT NOT NULL, state TEXT NOT NULL,
        seconds DOUBLE PRECISION NOT NULL, gpu_hours DOUBLE PRECISION NOT NULL,
        amount_eur DOUBLE PRECISION NOT NULL, allocation_hours DOUBLE PRECISION NOT NULL,
        energy_kwh DOUBLE PRECISION NOT NULL, co2e_kg DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX usage_lines_tenant_ended ON usage_lines (tenant, ended_at)",
    """CREATE TABLE topups (
        topup_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, at TEXT NOT NULL, amount_eur DOUBLE PRECISION NOT NULL,
        allocation_hours DOUBLE PRECISION NOT NULL, reason TEXT NOT NULL)""",
    # budget events announced, so that each is published once per period, limit and level
    """CREATE TABLE budget_events (
        tenant TEXT NOT NULL, budget TEXT NOT NULL, period TEXT NOT NULL, level TEXT NOT NULL,
        budget_limit DOUBLE PRECISION NOT NULL, at TEXT NOT NULL,
        PRIMARY KEY (tenant, budget, period, level, budget_limit))""",
    # what each tenant's lines add up to, per month they ended in, kept in the same transaction as each line:
    # budgets read it after every job, and summing the lines themselves grows with the ledger
    """CREATE TABLE usage_totals (
        tenant TEXT NOT NULL, month TEXT NOT NULL, amount_eur DOUBLE PRECISION NOT NULL,
        allocation_hours DOUBLE PRECISION NOT NULL, PRIMARY KEY (tenant, month))""",
    """INSERT INTO usage_totals (tenant, month, amount_eur, allocation_hours)
        SELECT tenant, substr(ended_at, 1, 7), SUM(amount_eur), SUM(allocation_hours) FROM usage_lines
        GROUP BY tenant, substr(ended_at, 1, 7)""",
)


class Ledger:
    def __init__(self, target: Path | str) -> None:
        """`target`: a SQLite file, or a `postgresql://` URL."""
        self.db = sql.open_database(target)
        self.kind = self.db.kind
        sql.migrate(self.db, "ledger_schema", MIGRATIONS, legacy_version=_user_version)

    @property
    def version(self) -> int:
        return sql.schema_version(self.db, "ledger_schema")

    def add(self, line: UsageLine) -> bool:
        """Record the line; False if the job has one already (the line is keyed on the job, not the message)."""
        row = line.model_dump(mode="json") | {"started_at": sql.iso(line.started_at),
                                               "ended_at": sql.iso(line.ended_at)}
        with self.db.transaction():
            if not self._insert("usage_lines", "job_id", _FIELDS, row):
                return False
            self.db.execute(
                "INSERT INTO usage_totals (tenant, month, amount_eur, allocation_hours) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (tenant, month) DO UPDATE SET amount_eur = usage_totals.amount_eur + excluded.amount_eur, "
                "allocation_hours = usage_totals.allocation_hours + excluded.allocation_hours",
                [line.tenant, row["ended_at"][:7], line.amount_eur, line.allocation_hours])
        return True

    def get(self, job_id: str) -> UsageLine | None:
        rows = self._select("job_id = ?", [job_id])
        return rows[0] if rows else None

    def lines(self, tenant: str, since: datetime | None = None, until: datetime | None = None) -> list[UsageLine]:
        where, args = self._window(tenant, since, until)
        return self._select(where, args)

    def all_lines(self) -> list[UsageLine]:
        return self._select("1 = 1", [])

    def totals(self, tenant: str, since: datetime | None = None, until: datetime | None = None) -> tuple[float, float]:
        """(euros, allocation hours) metered for the tenant in the window (ended within it)."""
        where, args = self._window(tenant, since, until)
        row = self.db.execute(f"SELECT COALESCE(SUM(amount_eur), 0), COALESCE(SUM(allocation_hours), 0) "
                              f"FROM usage_lines WHERE {where}", args).fetchone()
        return float(row[0]), float(row[1])

    def metered(self, tenant: str, month: str | None = None) -> tuple[float, float]:
        """(euros, allocation hours) metered for the tenant in a month ("2026-11", by when its lines ended), or
        ever: from the running totals, at the same cost whatever the ledger's size."""
        where, args = ("tenant = ? AND month = ?", [tenant, month]) if month else ("tenant = ?", [tenant])
        row = self.db.execute(f"SELECT COALESCE(SUM(amount_eur), 0), COALESCE(SUM(allocation_hours), 0) "
                              f"FROM usage_totals WHERE {where}", args).fetchone()
        return float(row[0]), float(row[1])

    def add_topup(self, topup: Topup) -> bool:
        """Record the top-up; False if one with its id exists (a retried request)."""
        return self._insert("topups", "topup_id", _TOPUP_FIELDS,
                            topup.model_dump(mode="json") | {"at": sql.iso(topup.at)})

    def topups(self, tenant: str, since: datetime | None = None, until: datetime | None = None) -> tuple[float, float]:
        """(euros, allocation hours) added to the tenant's budget and allocation in the window."""
        where, args = self._window(tenant, since, until, "at")
        row = self.db.execute(f"SELECT COALESCE(SUM(amount_eur), 0), COALESCE(SUM(allocation_hours), 0) "
                              f"FROM topups WHERE {where}", args).fetchone()
        return float(row[0]), float(row[1])

    def announced(self, tenant: str, budget: str, period: str, level: str, limit: float) -> bool:
        """Whether this budget event was published already."""
        return self.db.execute("SELECT 1 FROM budget_events WHERE tenant = ? AND budget = ? AND period = ? "
                               "AND level = ? AND budget_limit = ?", [tenant, budget, period, level, limit]
                               ).fetchone() is not None

    def announce(self, tenant: str, budget: str, period: str, level: str, limit: float) -> bool:
        """Record that a budget event was published; False if it was before."""
        row = {"tenant": tenant, "budget": budget, "period": period, "level": level, "budget_limit": limit,
               "at": sql.iso(datetime.now(UTC))}
        return self._insert("budget_events", "tenant, budget, period, level, budget_limit", tuple(row), row)

    def _insert(self, table: str, key: str, fields: tuple[str, ...], row: dict) -> bool:
        cursor = self.db.execute(
            f"INSERT INTO {table} ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))}) "
            f"ON CONFLICT ({key}) DO NOTHING", [row[f] for f in fields])
        return cursor.rowcount == 1

    @staticmethod
    def _window(tenant: str, since: datetime | None, until: datetime | None, column: str = "ended_at",
                ) -> tuple[str, list]:
        where, args = ["tenant = ?"], [tenant]
        if since:
            where.append(f"{column} >= ?")
            args.append(sql.iso(since))
        if until:
            where.append(f"{column} < ?")
            args.append(sql.iso(until))
        return " AND ".join(where), args

    def _select(self, where: str, args: list) -> list[UsageLine]:
        cursor = self.db.execute(
            f"SELECT {', '.join(_FIELDS)} FROM usage_lines WHERE {where} ORDER BY ended_at, job_id", args)
        return [UsageLine.model_validate(dict(zip(_FIELDS, row, strict=True))) for row in cursor.fetchall()]

    def close(self) -> None:
        self.db.close()



def _user_version(db: sql.Database) -> int:
    """Ledgers made before `ledger_schema` counted their migrations in SQLite's user_version."""
    return db.execute("PRAGMA user_version").fetchone()[0] if db.kind == "sqlite" else 0
