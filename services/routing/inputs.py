"""What the policy is given, made from what routing keeps: each site as a `SiteView` (its status, the GPUs its
reservations hold, the jobs ahead in its line) and a tenant's `TenantBudget`. Pure."""

from __future__ import annotations

from datetime import datetime

from services.routing import reservations
from services.routing.policy import LINE_EXACT, Holding, SiteView, TenantBudget
from services.routing.reservations import Reservation
from shared.contracts.catalog import Catalog, TenantEntry


def site_views(catalog: Catalog, statuses: dict[str, dict], held: dict[str, dict], need: int, now: float,
               give_back: tuple[str, Reservation] | None = None,
               ahead: dict[str, list] | None = None) -> list[SiteView]:
    """Every site as the policy sees it, for a job that needs `need` GPUs, behind the jobs `ahead` of it in
    line at each site (`give_back`: a reservation the job holds, counted free, to explain a placement as it was
    made). Each job's holding (when its GPUs come back) is read only for the GPU types short of `need`, where
    the wait depends on it; elsewhere one holding a type stands for the GPUs overflow jobs hold, which is all
    the policy asks there."""
    ahead = ahead or {}
    backlog: dict[str, dict[str, float]] = {}
    for site_id, queued in ahead.items():  # beyond the jobs run out one by one: their GPU-seconds
        extra = backlog[site_id] = {}
        for gpu_type, gpus, walltime in queued[LINE_EXACT:]:
            extra[gpu_type] = extra.get(gpu_type, 0.0) + gpus * walltime
    views = []
    for site in catalog.sites.values():
        status, doc = statuses.get(site.id), held.get(site.id)
        free = reservations.free(doc, site.gpus)
        if give_back and give_back[0] == site.id:
            free[give_back[1].gpu_type] = free.get(give_back[1].gpu_type, 0) + give_back[1].gpus
        short = {t for t, n in free.items() if n < need}
        holdings = reservations.holdings(doc, now, short) + tuple(
            Holding(t, n, 0.0, overflow=True) for t, n in reservations.overflow_held(doc).items()
            if n and t not in short)
        saturated = bool(status and status.get("saturated"))
        views.append(SiteView(entry=site, up=bool(status and status["state"] == "up"), free=free,
                              carbon_g_per_kwh=status["carbon_g_per_kwh"] if status else 0.0,
                              holdings=holdings,
                              queued_at_site=status.get("queued", 0) if status and saturated else 0,
                              reported_wait_s=status.get("est_wait_s_by_type", {}) if status and saturated else {},
                              queue=tuple(ahead.get(site.id, ())[:LINE_EXACT]),
                              backlog_gpu_s=backlog.get(site.id, {})))
    return views


def tenant_budget(tenant: TenantEntry, metered: dict | None, held: dict[str, dict], now: datetime) -> TenantBudget:
    """The tenant's room: its allocation and monthly budget, less what billing metered (`metered`: its entry in
    the budgets bucket) and what its running jobs may still use (their worst case, until they end and are
    metered)."""
    metered = metered or {}
    this_month = metered.get("period") == now.strftime("%Y-%m")
    spent = metered.get("spent_eur", 0.0) if this_month else 0.0
    # billing's limits include top-ups; a new month starts again from the catalog's budget
    budget_eur = metered.get("budget_eur", tenant.monthly_budget_eur) if this_month else tenant.monthly_budget_eur
    allocation_h = metered.get("allocation_h", tenant.allocation_gpu_hours)
    committed_eur = committed_h = 0.0
    for doc in held.values():
        eur, hours = reservations.committed(doc, tenant.id)
        committed_eur += eur
        committed_h += hours
    return TenantBudget(allocation_left_h=allocation_h - metered.get("allocation_used_h", 0.0) - committed_h,
                        budget_left_eur=budget_eur - spent - committed_eur)
