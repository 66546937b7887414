"""services/billing/ledger.py: usage lines, one per job, top-ups and budget events, on SQLite and PostgreSQL
(the same tests on both; PostgreSQL's are skipped, with the reason, where there is none)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.billing.ledger import MIGRATIONS, Ledger
from shared.contracts.billing import Topup, UsageLine

T0 = datetime(2025, 5, 1, 0, 0, tzinfo=UTC)


def line(job_id: str, tenant: str = "acme", ended: datetime | None = None, amount: float = 1.5) -> UsageLine:
    ended = ended or T0 + timedelta(hours=1)
    return UsageLine(job_id=job_id, tenant=tenant, site="scw-par", gpu_type="H100", gpus=2,
                     started_at=ended - timedelta(hours=1), ended_at=ended, state="succeeded", seconds=3600.0,
                     gpu_hours=2.0, amount_eur=amount, allocation_hours=0.0, energy_kwh=1.75, co2e_kg=0.0875)


@pytest.fixture
def ledger(ledger_target):
    book = Ledger(ledger_target)
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


def test_data_survives_reopening(ledger_target):
    first = Ledger(ledger_target)
    first.add(line("j1"))
    first.close()

    again = Ledger(ledger_target)
    try:
        assert again.get("j1") == line("j1")
        assert again.add(line("j1")) is False  # still one line per job after a restart
        assert again.add(line("j2")) is True
        assert again.version == len(MIGRATIONS)  # reopening ran no migration twice
    finally:
        again.close()


def test_totals_sum_euros_and_allocation_hours_in_the_window(ledger):
    ledger.add(line("j1", amount=1.25, ended=T0 + timedelta(hours=1)))
    ledger.add(line("j2", amount=2.5, ended=T0 + timedelta(hours=5)))
    ledger.add(line("other", tenant="beta", amount=100.0))
    assert ledger.totals("acme") == (3.75, 0.0)
    assert ledger.totals("acme", since=T0 + timedelta(hours=2)) == (2.5, 0.0)
    assert ledger.totals("acme", until=T0 + timedelta(hours=2)) == (1.25, 0.0)
    assert ledger.totals("nobody") == (0.0, 0.0)


def test_running_totals_match_the_lines_per_month_and_ever(ledger):
    june = T0 + timedelta(days=31)
    ledger.add(line("may1", amount=1.25, ended=T0 + timedelta(hours=1)))
    ledger.add(line("may2", amount=2.5, ended=T0 + timedelta(hours=5)))
    ledger.add(line("may2", amount=99.0, ended=T0 + timedelta(hours=5)))  # a second line for a job: refused
    ledger.add(line("june", amount=4.0, ended=june))
    ledger.add(line("other", tenant="beta", amount=100.0))
    assert ledger.metered("acme", "2025-05") == ledger.totals("acme", since=T0, until=june) == (3.75, 0.0)
    assert ledger.metered("acme", "2025-06") == (4.0, 0.0)
    assert ledger.metered("acme") == ledger.totals("acme") == (7.75, 0.0)
    assert ledger.metered("nobody") == (0.0, 0.0)


def test_running_totals_are_summed_for_a_ledger_made_before_them(ledger_target):
    old = Ledger(ledger_target)
    old.add(line("j1", amount=1.25))
    old.add(line("j2", amount=2.5, ended=T0 + timedelta(days=40)))
    old.db.execute("DROP TABLE usage_totals")  # as a ledger of the previous version was
    old.db.execute("DELETE FROM ledger_schema WHERE version > ?", [len(MIGRATIONS) - 2])
    old.close()

    again = Ledger(ledger_target)
    try:
        assert again.metered("acme", "2025-05") == (1.25, 0.0)
        assert again.metered("acme") == (3.75, 0.0)
    finally:
        again.close()


def test_a_topup_counts_once_and_in_its_window(ledger):
    topup = Topup(topup_id="t1", tenant="acme", at=T0, amount_eur=50.0, allocation_hours=10.0, reason="grant")
    assert ledger.add_topup(topup) is True
    assert ledger.add_topup(topup.model_copy(update={"amount_eur": 999.0})) is False  # a retried request
    ledger.add_topup(Topup(topup_id="t2", tenant="acme", at=T0 + timedelta(days=40), amount_eur=5.0))
    assert ledger.topups("acme") == (55.0, 10.0)
    assert ledger.topups("acme", since=T0 + timedelta(days=31)) == (5.0, 0.0)
    assert ledger.topups("beta") == (0.0, 0.0)


def test_a_budget_event_is_announced_once_per_limit(ledger):
    key = ("acme", "monthly_eur", "2025-05", "budget_warning", 100.0)
    assert not ledger.announced(*key)
    assert ledger.announce(*key) is True
    assert ledger.announced(*key) and ledger.announce(*key) is False
    assert not ledger.announced("acme", "monthly_eur", "2025-05", "budget_warning", 150.0)  # after a top-up


def test_two_ledgers_on_one_database_migrate_once_and_share_lines(ledger_target):
    first, second = Ledger(ledger_target), Ledger(ledger_target)  # two billing replicas
    try:
        assert first.add(line("j1")) is True
        assert second.add(line("j1")) is False
        assert second.version == first.version == len(MIGRATIONS)
    finally:
        first.close()
        second.close()


# SQLite only

def test_the_sqlite_ledger_uses_wal(tmp_path):
    book = Ledger(tmp_path / "ledger.db")
    try:
        assert book.db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        book.close()


def test_a_ledger_from_before_ledger_schema_only_runs_the_migrations_it_lacks(tmp_path):
    # ledgers made by earlier versions counted their two migrations in SQLite's user_version
    path = tmp_path / "ledger.db"
    db = sqlite3.connect(path)
    db.execute(MIGRATIONS[0])
    db.execute(MIGRATIONS[1])
    db.execute("INSERT INTO usage_lines VALUES "
               "('old', 'acme', 's', 'H100', 1, 'a', 'b', 'succeeded', 1, 1, 1, 0, 1, 1)")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()

    book = Ledger(path)
    try:
        assert book.version == len(MIGRATIONS)
        assert book.add_topup(Topup(topup_id="t", tenant="acme", at=T0, amount_eur=1.0)) is True
        assert book.add(line("old")) is False  # the old line is still there
    finally:
        book.close()
