"""services/billing/budgets.py: where a tenant stands, and the budget events that calls for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from services.billing.budgets import events_due, month_start, status


def test_no_event_below_80_percent():
    assert events_due(status("acme", "monthly_eur", "2026-11", used=79.99, limit=100)) == []


def test_a_warning_at_80_percent_and_both_at_100():
    assert events_due(status("acme", "monthly_eur", "2026-11", used=80, limit=100)) == ["budget_warning"]
    assert events_due(status("acme", "monthly_eur", "2026-11", used=100, limit=100)) == [
        "budget_warning", "budget_exhausted"]
    assert events_due(status("acme", "allocation_hours", "grant", used=130, limit=100)) == [
        "budget_warning", "budget_exhausted"]


def test_a_budget_of_zero_is_no_budget_rather_than_an_exhausted_one():
    assert events_due(status("acme", "monthly_eur", "2026-11", used=0, limit=0)) == []
    assert status("acme", "monthly_eur", "2026-11", used=0, limit=0).share == 0.0


def test_status_carries_the_share():
    budget = status("acme", "allocation_hours", "grant", used=12.3456789, limit=50)
    assert (budget.used, budget.limit, budget.share) == (12.345679, 50, 0.2469)


def test_the_month_starts_at_midnight_utc_on_the_first():
    paris = timezone(timedelta(hours=1))
    # 00:30 on 1 December in Paris is still November in UTC
    assert month_start(datetime(2026, 12, 1, 0, 30, tzinfo=paris)) == datetime(2026, 11, 1, tzinfo=UTC)
    assert month_start(datetime(2026, 12, 1, 1, 30, tzinfo=paris)) == datetime(2026, 12, 1, tzinfo=UTC)
