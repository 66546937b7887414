"""Sites: what agents report (heartbeats) and what capacity serves (SiteStatus)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from shared.contracts.events import CloudEvent


class GpuCount(BaseModel):
    total: int
    free: int
    # GPUs that jobs queued at the site (dispatched, not started) are waiting for
    reserved: int = 0


class SiteJob(BaseModel):
    """One job the agent really has: queued at the site (no `started_at`) or running."""

    job_id: str
    attempt: int = 0
    gpu_type: str
    gpus: int
    walltime_s: float
    queued_at: datetime
    started_at: datetime | None = None


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
    # when this agent started: a new value means the agent restarted and lost what it ran before
    since: datetime | None = None
    # every job at the site, queued ones first in the order they will start: the wait forecast's input
    jobs: list[SiteJob] = Field(default_factory=list)


class WaitModel(BaseModel):
    """How a site's raw wait (its queue run out at full walltime) is corrected by the waits observed there:
    est = start_latency_s + walltime_factor x raw."""

    start_latency_s: float = 0.0
    walltime_factor: float = 1.0
    samples: int = 0


class SiteStatus(BaseModel):
    """CONTRACT.md, SiteStatus: the capacity service's live view of one site."""

    site_id: str
    kind: str
    country: str
    state: Literal["up", "down"]
    saturated: bool = False
    gpus: dict[str, GpuCount]
    queued: int = 0
    # the expected wait of a 1-GPU job of the site's best type (the smallest of est_wait_s_by_type)
    est_wait_s: float = 0.0
    est_wait_s_by_type: dict[str, float] = Field(default_factory=dict)
    wait_model: WaitModel = Field(default_factory=WaitModel)
    carbon_g_per_kwh: float
    price_eur_per_gpu_hour: dict[str, float]
    last_seen: datetime | None = None
    running: int = 0
    since: datetime | None = None  # when the site's agent started
    down_since: datetime | None = None
    jobs: list[str] = Field(default_factory=list)  # the jobs the agent reports it really has


class SiteEvent(CloudEvent[SiteStatus]):
    """An event on `continuum.events.site.<site_id>.<kind>` (up, down, saturated, unsaturated): the site's
    status when it happened."""


class SitesReply(BaseModel):
    sites: list[SiteStatus]
