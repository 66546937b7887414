"""Sites: what agents report (heartbeats) and what capacity serves (SiteStatus)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class GpuCount(BaseModel):
    total: int
    free: int


class Heartbeat(BaseModel):
    """agent -> capacity, every heartbeat interval: what the site really has now."""

    site_id: str
    time: datetime
    interval_s: float
    gpus: dict[str, GpuCount]
    queued: int = 0
    running: list[str] = Field(default_factory=list)
    # dispatches that found their GPUs busy since the agent started: routing promised GPUs the site did not
    # have free (non-zero only when the site is shared with work Continuum does not place)
    waited_total: int = 0


class SiteStatus(BaseModel):
    """CONTRACT.md, SiteStatus: the capacity service's live view of one site."""

    site_id: str
    kind: str
    country: str
    state: Literal["up", "down"]
    saturated: bool = False
    gpus: dict[str, GpuCount]
    queued: int = 0
    est_wait_s: float = 0.0
    carbon_g_per_kwh: float
    price_eur_per_gpu_hour: dict[str, float]
    last_seen: datetime | None = None
    running: int = 0


class SitesReply(BaseModel):
    sites: list[SiteStatus]
