"""The live view of a site, from its heartbeats and the catalog. Pure."""

from __future__ import annotations

from datetime import datetime, timedelta

from shared.contracts.catalog import SiteEntry
from shared.contracts.sites import GpuCount, Heartbeat, SiteStatus

# a site that misses this many heartbeats in a row is down
MISSED_BEATS_DOWN = 3


def status_from_heartbeat(site: SiteEntry, beat: Heartbeat, carbon_g_per_kwh: float) -> SiteStatus:
    total_free = sum(g.free for g in beat.gpus.values())
    return SiteStatus(
        site_id=site.id, kind=site.kind, country=site.country, state="up",
        saturated=total_free == 0 and beat.queued > 0,
        gpus=beat.gpus, queued=beat.queued, running=len(beat.running),
        carbon_g_per_kwh=carbon_g_per_kwh, price_eur_per_gpu_hour=dict(site.price_eur_per_gpu_hour),
        last_seen=beat.time,
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
