"""The live view of a site, from its heartbeats and the catalog: up or down, saturated or not, and how long
a job would wait there. Pure.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from services.capacity.forecast import Load, WaitLearner, estimate, raw_wait
from shared.contracts.catalog import SiteEntry
from shared.contracts.sites import GpuCount, Heartbeat, SiteStatus

# a site that misses this many heartbeats in a row is down
MISSED_BEATS_DOWN = 3
# saturation, with hysteresis so that one job more or less does not flap it: a site becomes saturated when
# at most 5 % of its GPUs are free, and stays so until at least 20 % are free and nothing queues there
SATURATED_FREE_SHARE = 0.05
UNSATURATED_FREE_SHARE = 0.20


def is_saturated(was: bool, gpus: dict[str, GpuCount], queued: int) -> bool:
    total = sum(g.total for g in gpus.values())
    if total == 0:
        return False
    free_share = sum(g.free for g in gpus.values()) / total
    if was:
        return not (free_share >= UNSATURATED_FREE_SHARE and queued == 0)
    return free_share <= SATURATED_FREE_SHARE


class SiteTracker:
    """What capacity keeps of one site between heartbeats: the last one, the raw forecast made for each job
    that arrived since (until it starts), and the wait model learned from those that started."""

    def __init__(self, site: SiteEntry, stored: SiteStatus | None = None) -> None:
        self.site = site
        self.learner = WaitLearner(stored.wait_model if stored else None)
        self.last: Heartbeat | None = None
        self.forecasts: dict[tuple[str, int], float] = {}

    def observe(self, beat: Heartbeat) -> dict[tuple[str, int], float]:
        """Forecast the jobs that arrived since the last heartbeat, and learn from those that started; returns
        the new forecasts (raw), by (job, attempt)."""
        new: dict[tuple[str, int], float] = {}
        prev = self.last
        if prev is not None and beat.time <= prev.time and beat.since == prev.since:
            return new  # a late heartbeat: nothing in it is news
        if prev is not None and prev.since == beat.since and beat.time > prev.time:
            # a job that arrived since the last heartbeat is forecast as routing saw the site: the last
            # heartbeat, some seconds on, with the jobs that arrived before it queued ahead
            prev_load = Load.of(prev)
            seen = {(j.job_id, j.attempt) for j in prev.jobs}
            arrivals = sorted((j for j in beat.jobs if (j.job_id, j.attempt) not in seen
                               and j.queued_at >= prev.time), key=lambda j: j.queued_at)
            for i, job in enumerate(arrivals):
                load = prev_load.later((job.queued_at - prev.time).total_seconds(), arrivals[:i])
                new[(job.job_id, job.attempt)] = raw_wait(load, job.gpu_type, job.gpus)
        self.forecasts.update(new)
        for job in beat.jobs:
            key = (job.job_id, job.attempt)
            if job.started_at is not None and key in self.forecasts:
                self.learner.observe(self.forecasts.pop(key), (job.started_at - job.queued_at).total_seconds())
        present = {(j.job_id, j.attempt) for j in beat.jobs}
        self.forecasts = {k: v for k, v in self.forecasts.items() if k in present}
        self.last = beat
        return new

    def status(self, beat: Heartbeat, carbon_g_per_kwh: float, was_saturated: bool) -> SiteStatus:
        model = self.learner.model()
        load = Load.of(beat)
        waits = {t: estimate(model, raw_wait(load, t, 1)) for t, g in beat.gpus.items() if g.total > 0}
        waits = {t: round(w, 1) for t, w in waits.items() if math.isfinite(w)}
        return SiteStatus(
            site_id=self.site.id, kind=self.site.kind, country=self.site.country, state="up",
            saturated=is_saturated(was_saturated, beat.gpus, beat.queued),
            gpus=beat.gpus, queued=beat.queued, running=len(beat.running),
            est_wait_s=min(waits.values(), default=0.0), est_wait_s_by_type=waits, wait_model=model,
            carbon_g_per_kwh=carbon_g_per_kwh, price_eur_per_gpu_hour=dict(self.site.price_eur_per_gpu_hour),
            last_seen=beat.time, since=beat.since, jobs=[j.job_id for j in beat.jobs],
        )


def never_seen(site: SiteEntry, carbon_g_per_kwh: float) -> SiteStatus:
    """A catalog site that has not reported: down, with its catalog capacity."""
    return SiteStatus(
        site_id=site.id, kind=site.kind, country=site.country, state="down",
        gpus={t: GpuCount(total=n, free=0) for t, n in site.gpus.items()},
        carbon_g_per_kwh=carbon_g_per_kwh, price_eur_per_gpu_hour=dict(site.price_eur_per_gpu_hour),
    )


def is_lost(status: SiteStatus, now: datetime, interval_s: float) -> bool:
    return (status.state == "up" and status.last_seen is not None
            and now - status.last_seen > timedelta(seconds=MISSED_BEATS_DOWN * interval_s))


def site_changes(current: SiteStatus | None, new: SiteStatus) -> list[str]:
    """The site events a new status makes, against the stored one: `up` when the site was down or unknown, or
    its agent restarted; `saturated` or `unsaturated` when that flipped."""
    changes = []
    if current is None or current.state != "up" or current.since != new.since:
        changes.append("up")
    if new.saturated != (current.saturated if current else False):
        changes.append("saturated" if new.saturated else "unsaturated")
    return changes
