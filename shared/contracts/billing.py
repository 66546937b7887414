"""Billing: one usage line per finished job, and the statement that sums them."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.contracts.events import CloudEvent


class UsageLine(BaseModel):
    job_id: str
    tenant: str
    site: str
    gpu_type: str
    gpus: int
    started_at: datetime
    ended_at: datetime
    state: str
    seconds: float
    gpu_hours: float
    amount_eur: float
    allocation_hours: float
    energy_kwh: float
    co2e_kg: float


class StatementTotals(BaseModel):
    gpu_hours: float = 0.0
    amount_eur: float = 0.0
    allocation_hours: float = 0.0
    energy_kwh: float = 0.0
    co2e_kg: float = 0.0


class Statement(BaseModel):
    tenant: str
    since: datetime | None = None
    until: datetime | None = None
    lines: list[UsageLine]
    totals: StatementTotals


class StatementRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=64)
    since: datetime | None = None
    until: datetime | None = None


class Topup(BaseModel):
    """More paid budget (this month) or allocation hours for a tenant, recorded in the ledger."""

    topup_id: str
    tenant: str
    at: datetime
    amount_eur: float = 0.0
    allocation_hours: float = 0.0
    reason: str = ""


class TopupRequest(BaseModel):
    """`continuum.billing.topup`: the id makes a retried request count once."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(min_length=1, max_length=64)
    topup_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    amount_eur: float = Field(0.0, ge=0, le=1e9)
    allocation_hours: float = Field(0.0, ge=0, le=1e9)
    reason: str = Field("", max_length=500)


class BudgetStatus(BaseModel):
    """A tenant's budgets now: what `budget_warning` and `budget_exhausted` events carry (and the top-up
    reply). `budget` says which: the paid `monthly_eur` of `period`, or public `allocation_hours`."""

    tenant: str
    budget: Literal["monthly_eur", "allocation_hours"]
    period: str
    used: float
    limit: float
    share: float


class UsageEvent(CloudEvent[UsageLine]):
    """`continuum.events.billing.<tenant>.usage`: the usage line of one finished job."""


class BudgetEvent(CloudEvent[BudgetStatus]):
    """`continuum.events.billing.<tenant>.budget_warning` or `.budget_exhausted`: where the budget stands."""
