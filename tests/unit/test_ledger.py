"""services/billing/ledger.py: usage lines in SQLite, one per job."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.billing.ledger import MIGRATIONS, Ledger
from shared.contracts.billing import UsageLine

T0 = datetime(2025, 5, 1, 0, 0, tzinfo=UTC)


def line(job_id: str, tenant: str = "acme", ended: datetime | None = None, amount: float = 1.5) -> UsageLine:
    ended = ended or T0 + timedelta(hours=1)
    return UsageLine(job_id=job_id, tenant=tenant, site="scw-par", gpu_type="H100", gpus=2,
                     started_at=ended - timedelta(hours=1), ended_at=ended, state="succeeded", seconds=3600.0,
                     gpu_hours=2.0, amount_eur=amount, allocation_hours=0.0, energy_kwh=1.75, co2e_kg=0.0875)


@pytest.fixture
def ledger(tmp_path):
    book = Ledger(tmp_path / "billing" / "ledger.db")
    yield book
    book.close()


def test_add_returns_true_then_false_for_the_same_job(ledger):
    assert ledger.add(line("j1")) is True
    assert ledger.add(line("j1")) is False
    assert len(ledger.lines("acme")) == 1


def test_the_first_line_of_a_job_is_the_one_kept(ledger):
    ledger.add(line("j1", amount=1.5))
    ledger.add(line("j1", amount=99.0))
    assert ledger.get("j1").amount_eur == 1.5


def test_get_returns_the_line_as_written(ledger):
    original = line("j1")
    ledger.add(original)
    assert ledger.get("j1") == original
    assert ledger.get("nope") is None


def test_lines_are_filtered_by_tenant(ledger):
    ledger.add(line("a1", tenant="acme"))
    ledger.add(line("b1", tenant="beta"))
    ledger.add(line("a2", tenant="acme", ended=T0 + timedelta(hours=2)))
    assert [x.job_id for x in ledger.lines("acme")] == ["a1", "a2"]
    assert [x.job_id for x in ledger.lines("beta")] == ["b1"]
    assert ledger.lines("nobody") == []


def test_lines_are_filtered_by_since_inclusive_and_until_exclusive(ledger):
    for hour in (1, 2, 3, 4):
        ledger.add(line(f"h{hour}", ended=T0 + timedelta(hours=hour)))
    since, until = T0 + timedelta(hours=2), T0 + timedelta(hours=4)
    assert [x.job_id for x in ledger.lines("acme", since=since)] == ["h2", "h3", "h4"]
    assert [x.job_id for x in ledger.lines("acme", until=until)] == ["h1", "h2", "h3"]
    assert [x.job_id for x in ledger.lines("acme", since=since, until=until)] == ["h2", "h3"]


def test_filters_compare_instants_whatever_the_time_zone(ledger):
    ledger.add(line("j1", ended=T0 + timedelta(hours=3)))  # 03:00 UTC
    paris = timezone(timedelta(hours=2))
    assert [x.job_id for x in ledger.lines("acme", since=datetime(2025, 5, 1, 5, 0, tzinfo=paris))] == ["j1"]
    assert ledger.lines("acme", since=datetime(2025, 5, 1, 5, 1, tzinfo=paris)) == []


def test_lines_come_in_time_order(ledger):
    ledger.add(line("late", ended=T0 + timedelta(hours=5)))
    ledger.add(line("early", ended=T0 + timedelta(hours=1)))
    ledger.add(line("middle", ended=T0 + timedelta(hours=3)))
    assert [x.job_id for x in ledger.lines("acme")] == ["early", "middle", "late"]


def test_data_survives_reopening_the_file(tmp_path):
    path = tmp_path / "ledger.db"
    first = Ledger(path)
    first.add(line("j1"))
    first.close()

    again = Ledger(path)
    try:
        assert again.get("j1") == line("j1")
        assert again.add(line("j1")) is False  # still one line per job after a restart
        assert again.add(line("j2")) is True
    finally:
        again.close()


def test_migrations_set_user_version(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    Ledger(path).close()  # reopening does not run the migrations again
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
        assert len(MIGRATIONS) == 2
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        assert {"usage_lines", "usage_lines_tenant_ended"} <= names
    finally:
        db.close()


def test_the_ledger_uses_wal(ledger):
    assert ledger.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_an_older_ledger_only_runs_the_migrations_it_lacks(tmp_path):
    path = tmp_path / "ledger.db"
    db = sqlite3.connect(path)
    db.execute(MIGRATIONS[0])
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()

    book = Ledger(path)
    try:
        assert book.db.execute("PRAGMA user_version").fetchone() == (2,)
        indexes = {row[0] for row in book.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "usage_lines_tenant_ended" in indexes
        assert book.add(line("j1")) is True
    finally:
        book.close()
