"""Rating: what one job's run costs, in euros, allocation hours, energy and carbon. Pure."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from shared.contracts.billing import Statement, StatementTotals, UsageLine
from shared.contracts.catalog import SiteEntry

Intensity = Callable[[datetime], float]  # gCO2eq/kWh at an instant


def rate(site: SiteEntry, *, job_id: str, tenant: str, gpu_type: str, gpus: int, started_at: datetime,
         ended_at: datetime, state: str, intensity: Intensity) -> UsageLine:
    seconds = max(0.0, (ended_at - started_at).total_seconds())
    gpu_hours = gpus * seconds / 3600
    offered = gpu_type in site.gpus
    watts = site.watts(gpu_type) if offered else 0.0
    kw = watts * gpus * site.pue / 1000  # the job's draw, with the site's overhead
    co2e_g = sum(kw * hours * intensity(at) for at, hours in hourly_slices(started_at, ended_at))
    return UsageLine(
        job_id=job_id, tenant=tenant, site=site.id, gpu_type=gpu_type, gpus=gpus, started_at=started_at,
        ended_at=ended_at, state=state, seconds=round(seconds, 3), gpu_hours=round(gpu_hours, 6),
        amount_eur=round(gpu_hours * site.price(gpu_type), 6) if offered else 0.0,
        allocation_hours=round(gpu_hours * site.allocation_factor.get(gpu_type, 1.0), 6) if site.public else 0.0,
        energy_kwh=round(kw * seconds / 3600, 6), co2e_kg=round(co2e_g / 1000, 6),
    )


def hourly_slices(start: datetime, end: datetime):
    """(a moment inside the slice, its length in hours) for each clock hour the interval touches."""
    at, next_hour = start, start.replace(minute=0, second=0, microsecond=0) + HOUR
    while at < end:
        stop = min(next_hour, end)
        yield at, (stop - at).total_seconds() / 3600
        at, next_hour = stop, next_hour + HOUR


HOUR = timedelta(hours=1)


def statement(tenant: str, lines: list[UsageLine], since: datetime | None = None,
              until: datetime | None = None) -> Statement:
    totals = StatementTotals(
        gpu_hours=round(sum(line.gpu_hours for line in lines), 6),
        amount_eur=round(sum(line.amount_eur for line in lines), 6),
        allocation_hours=round(sum(line.allocation_hours for line in lines), 6),
        energy_kwh=round(sum(line.energy_kwh for line in lines), 6),
        co2e_kg=round(sum(line.co2e_kg for line in lines), 6),
    )
    return Statement(tenant=tenant, since=since, until=until, lines=lines, totals=totals)
