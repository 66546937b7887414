"""Budgets: how much of its paid monthly budget and of its public allocation a tenant has used, and the
budget events that calls for. Pure.

The paid budget is per calendar month (UTC): the catalog's `monthly_budget_eur` plus this month's top-ups,
against the euros metered for jobs that ended this month. The allocation is the catalog's
`allocation_gpu_hours` plus every top-up of hours, against all allocation hours metered. At 80 % of a
limit a tenant gets `budget_warning`, at 100 % `budget_exhausted`: each once per limit and period (a top-up
raises the limit, so the events can come again at the new one).
"""

from __future__ import annotations

from datetime import UTC, datetime

from shared.contracts.billing import BudgetStatus

WARNING_SHARE = 0.8
# the period of the allocation, which is a grant rather than a monthly budget
WHOLE_GRANT = "grant"


def month_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def status(tenant: str, budget: str, period: str, used: float, limit: float) -> BudgetStatus:
    return BudgetStatus(tenant=tenant, budget=budget, period=period, used=round(used, 6), limit=round(limit, 6),
                        share=round(used / limit, 4) if limit > 0 else 0.0)


def events_due(budget: BudgetStatus) -> list[str]:
    """The budget events its use has reached, lowest first (none for a budget of 0: the tenant has none)."""
    if budget.limit <= 0:
        return []
    due = []
    if budget.used >= WARNING_SHARE * budget.limit:
        due.append("budget_warning")
    if budget.used >= budget.limit:
        due.append("budget_exhausted")
    return due
