"""Billing: one usage line per finished job, and the statement that sums them."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


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
