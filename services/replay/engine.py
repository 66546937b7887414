"""The replay: a trace's jobs through the production policy, in virtual time. Deterministic: no clock, no
randomness; the same inputs give the same outcomes.

A discrete-event loop. Events are arrivals (a trace job is submitted), ends (a job's runtime is over), the
first hour of each month (budgets start again) and retries (a job that waits for a greener hour). The state is
what the live services keep: each site's GPUs and the jobs holding them (routing's reservations), each tenant's
allocation and monthly budget net of what ran and of what runs (billing's ledger and routing's commitments),
the line of jobs waiting for GPUs. A job is placed by `services/routing/policy.place`, exactly as routing
places it, on `SiteView`s built from that state; a job that ended is rated by `services/billing/rating.rate`,
as billing rates it, with the hour-by-hour carbon of its site's zone. Simulated sites start a job the moment
it is placed, as the live simulated backend does.

Waiting jobs are tried again, oldest first, when GPUs come back, when a month starts, and at the hour a job
chose to wait for: not on a timer (live routing also retries on a timer, which finds nothing new: nothing
changes between events).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from services.billing.rating import rate
from services.replay.traces import TraceJob
from services.routing.policy import (
    Holding,
    SiteView,
    TenantBudget,
    gpu_types,
    permanent_reasons,
    place,
    residency_reason,
    worst_case_allocation_h,
    worst_case_cost,
)
from shared.carbon import CarbonProvider, site_intensity
from shared.contracts.catalog import Catalog, SiteEntry
from shared.contracts.jobs import JobSpec, Resources

POLICIES = ("public-only", "cheapest", "continuum", "carbon", "carbon-shift")
# carbon-shift's slack: a job may end as late as its runtime again after its earliest end, a day at most (the
# traces have no deadlines; "Let's Wait Awhile" and GAIA use windows of this order)
SHIFT_SLACK_CAP_S = 24 * 3600.0
CHEAPEST = (0.0, 1.0, 0.0)  # time, cost, carbon: the cheapest eligible site, blind to carbon and to waiting
MAX_RUNTIME_S = 2_592_000  # a JobSpec's longest walltime (30 days): a trace job that ran longer is cut there

# at one instant: GPUs come back first, then waiting jobs are tried, then newcomers come
END, MONTH, RETRY, ARRIVE = 0, 1, 2, 3


@dataclass(frozen=True)
class Outcome:
    """One trace job under one policy: where and when it ran, and what it cost (None site: it never could)."""

    job_id: str
    tenant: str
    submit_s: float
    start_s: float | None
    end_s: float | None
    site: str | None
    gpu_type: str | None
    gpus: int
    overflow: bool = False
    cost_eur: float = 0.0
    allocation_hours: float = 0.0
    energy_kwh: float = 0.0
    co2e_kg: float = 0.0
    residency_ok: bool = True
    reason: str = ""

    @property
    def wait_s(self) -> float | None:
        return None if self.start_s is None else self.start_s - self.submit_s


@dataclass
class _Run:
    job: TraceJob
    spec: JobSpec
    site: str
    gpu_type: str
    start_s: float
    overflow: bool
    cost_eur: float  # worst case, committed until it ends
    allocation_h: float


@dataclass
class _Tenant:
    allocation_used_h: float = 0.0
    spent_eur: dict[str, float] = field(default_factory=dict)  # by month, YYYY-MM
    committed_eur: float = 0.0
    committed_h: float = 0.0


class Replay:
    def __init__(self, catalog: Catalog, carbon: CarbonProvider, policy: str, start: datetime,
                 tenants: dict[str, str]) -> None:
        if policy not in POLICIES:
            raise ValueError(f"no policy {policy!r}; one of {', '.join(POLICIES)}")
        self.catalog, self.carbon, self.policy, self.start = catalog, carbon, policy, start.astimezone(UTC)
        self.tenants = tenants  # trace user -> catalog tenant
        self.sites = sorted(catalog.sites.values(), key=lambda s: s.id)
        self.free = {s.id: dict(s.gpus) for s in self.sites}
        self.running: dict[str, dict[str, _Run]] = {s.id: {} for s in self.sites}
        self.ledger = {t: _Tenant() for t in catalog.tenants}
        self.waiting: dict[str, tuple[TraceJob, JobSpec]] = {}  # in arrival order
        self.outcomes: dict[str, Outcome] = {}
        self.events: list[tuple[float, int, int, str]] = []
        self.jobs: dict[str, TraceJob] = {}
        self.specs: dict[str, JobSpec] = {}
        self.fits: dict[str, list[tuple[str, list[str]]]] = {}  # sites a job could ever run on, and their types
        # what changed, and when: a waiting job is asked about again only when something it depends on changed
        self.site_version = {s.id: 0 for s in self.sites}
        self.tenant_version = {t: 0 for t in catalog.tenants}
        self.tried: dict[str, tuple] = {}
        self._view_cache: tuple[float, list[SiteView]] | None = None
        self._seq = 0
        self._intensity: dict[tuple[str, int], float] = {}

    # --- the loop ---------------------------------------------------------------------------------------------

    def run(self, jobs: list[TraceJob], progress: Callable[[int], None] | None = None) -> list[Outcome]:
        jobs = [replace(j, runtime_s=min(j.runtime_s, MAX_RUNTIME_S)) for j in jobs]
        for job in jobs:
            self.jobs[job.job_id] = job
            self._push(job.submit_s, ARRIVE, job.job_id)
        if jobs:
            month = self._at(jobs[0].submit_s).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            last = self._at(jobs[-1].submit_s)
            while month <= last:
                month = (month + timedelta(days=32)).replace(day=1)
                self._push((month - self.start).total_seconds(), MONTH, "")
        done = 0
        while self.events:
            now, kind, _, job_id = heapq.heappop(self.events)
            if kind == ARRIVE:
                job = self.jobs[job_id]
                spec = self._spec(job, now)
                self.specs[job_id] = spec
                self.fits[job_id] = self._fits(spec)
                if not self._try(job, spec, now):
                    self.waiting[job_id] = (job, spec)
            elif kind == END:
                self._end(job_id, now)
                done += 1
                if progress and done % 1000 == 0:
                    progress(done)
                self._wake(now)
            elif kind == MONTH:
                for tenant in self.tenant_version:  # budgets start again
                    self.tenant_version[tenant] += 1
                self._wake(now)
            elif kind == RETRY and job_id in self.waiting:
                job, spec = self.waiting[job_id]
                if self._try(job, spec, now):
                    del self.waiting[job_id]
        for job_id, (job, _) in self.waiting.items():  # the trace ended with these still waiting
            self.outcomes[job_id] = self._never(job, "still waiting when the replay ended")
        if progress:
            progress(done)
        return [self.outcomes[j.job_id] for j in jobs]

    def _push(self, at: float, kind: int, job_id: str) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, kind, self._seq, job_id))

    def _wake(self, now: float) -> None:
        """Waiting jobs, oldest first, while there are GPUs to take (a job that cannot start does not hold up
        those behind it, as live routing retries each waiting job on its own). The policy is asked only for a
        job that some site it could ever run on has the GPUs free for: the others would wait all the same."""
        for job_id in list(self.waiting):
            if not any(n for free in self.free.values() for n in free.values()):
                return
            job, spec = self.waiting[job_id]
            need = spec.resources.total_gpus
            if not any(self.free[site][t] >= need for site, types in self.fits[job_id] for t in types):
                continue
            seen = self._seen(job_id, spec)
            if self.tried.get(job_id) == seen:
                continue  # nothing it depends on changed since the policy last said no
            if self._try(job, spec, now):
                del self.waiting[job_id]
            else:
                self.tried[job_id] = seen

    def _seen(self, job_id: str, spec: JobSpec) -> tuple:
        """What a job's placement depends on, as versions: its sites', the public sites' (public first), its
        tenant's room. The same versions, the same answer (the policy is a function of them)."""
        return (tuple(self.site_version[site] for site, _ in self.fits[job_id]),
                tuple(self.site_version[site.id] for site in self.sites if site.public),
                self.tenant_version[spec.tenant])

    # --- a placement --------------------------------------------------------------------------------------------

    def _spec(self, job: TraceJob, now: float) -> JobSpec:
        tenant = self.catalog.tenants[self.tenants[job.user]]
        extra: dict = {}
        if self.policy == "public-only":
            extra["overflow"] = "forbidden"
        if self.policy in ("carbon", "carbon-shift"):
            extra["objective"] = "carbon"
        if self.policy == "carbon-shift":
            slack = min(job.runtime_s, SHIFT_SLACK_CAP_S)
            extra["deadline"] = self._at(now + math.ceil(job.runtime_s) + slack)
        return JobSpec(tenant=tenant.id, name=job.job_id, command=["replay"], walltime_s=max(1, math.ceil(job.runtime_s)),
                       resources=Resources(gpus=job.gpus, gpu_type="any"), residency=tenant.residency, **extra)

    def _fits(self, spec: JobSpec) -> list[tuple[str, list[str]]]:
        tenant, need = self.catalog.tenants[spec.tenant], spec.resources.total_gpus
        return [(site.id, [t for t in gpu_types(spec, site.gpus) if site.gpus[t] >= need])
                for site in self.sites if not permanent_reasons(spec, tenant, site)]

    def _try(self, job: TraceJob, spec: JobSpec, now: float) -> bool:
        """Place the job now if the policy says where; True when it is settled (started, or never can)."""
        tenant = self.catalog.tenants[spec.tenant]
        at = self._at(now)
        decision = place(spec, tenant, self._views(now), self._budget(spec.tenant, at), at,
                         forecast=self._forecast if self.policy == "carbon-shift" else None,
                         weights=CHEAPEST if self.policy == "cheapest" else None)
        if decision.impossible:
            self.outcomes[job.job_id] = self._never(job, "; ".join(decision.reasons)[:500])
            return True
        if decision.wait_until is not None:  # a greener hour is coming: the job asks to be tried then
            self.waiting.setdefault(job.job_id, (job, spec))
            self._push((decision.wait_until - self.start).total_seconds(), RETRY, job.job_id)
            return False
        if decision.site is None:
            return False
        site = self.catalog.sites[decision.site]
        gpus = spec.resources.total_gpus
        self.free[site.id][decision.gpu_type] -= gpus
        self._changed(site.id, spec.tenant)
        run = _Run(job, spec, site.id, decision.gpu_type, now, decision.overflow,
                   0.0 if site.public else worst_case_cost(spec, site, decision.gpu_type),
                   worst_case_allocation_h(spec, site, decision.gpu_type) if site.public else 0.0)
        self.running[site.id][job.job_id] = run
        ledger = self.ledger[spec.tenant]
        ledger.committed_eur += run.cost_eur
        ledger.committed_h += run.allocation_h
        self._push(now + job.runtime_s, END, job.job_id)
        return True

    def _end(self, job_id: str, now: float) -> None:
        job, spec = self.jobs[job_id], self.specs[job_id]
        site = next(s for s in self.sites if job_id in self.running[s.id])
        run = self.running[site.id].pop(job_id)
        gpus = spec.resources.total_gpus
        self.free[site.id][run.gpu_type] += gpus
        self._changed(site.id, spec.tenant)
        line = rate(site, job_id=job_id, tenant=spec.tenant, gpu_type=run.gpu_type, gpus=gpus,
                    started_at=self._at(run.start_s), ended_at=self._at(now), state="succeeded",
                    intensity=lambda at: self._carbon(site, at))
        ledger = self.ledger[spec.tenant]
        ledger.committed_eur -= run.cost_eur
        ledger.committed_h -= run.allocation_h
        ledger.allocation_used_h += line.allocation_hours
        month = f"{line.ended_at:%Y-%m}"
        ledger.spent_eur[month] = ledger.spent_eur.get(month, 0.0) + line.amount_eur
        tenant = self.catalog.tenants[spec.tenant]
        self.outcomes[job_id] = Outcome(
            job_id=job_id, tenant=spec.tenant, submit_s=job.submit_s, start_s=run.start_s, end_s=now, site=site.id,
            gpu_type=run.gpu_type, gpus=gpus, overflow=run.overflow, cost_eur=line.amount_eur,
            allocation_hours=line.allocation_hours, energy_kwh=line.energy_kwh, co2e_kg=line.co2e_kg,
            residency_ok=residency_reason(spec, tenant, site) is None)

    def _changed(self, site: str, tenant: str) -> None:
        self.site_version[site] += 1
        self.tenant_version[tenant] += 1
        self._view_cache = None

    def _never(self, job: TraceJob, reason: str) -> Outcome:
        return Outcome(job_id=job.job_id, tenant=self.tenants[job.user], submit_s=job.submit_s, start_s=None,
                       end_s=None, site=None, gpu_type=None, gpus=job.gpus, reason=reason)

    # --- what the policy sees -----------------------------------------------------------------------------------

    def _views(self, now: float) -> list[SiteView]:
        """Every site as the policy sees it now (the same until a job starts or ends)."""
        if self._view_cache is not None and self._view_cache[0] == now:
            return self._view_cache[1]
        at = self._at(now)
        views = [SiteView(entry=site, up=True, free=self.free[site.id], carbon_g_per_kwh=self._carbon(site, at),
                         holdings=tuple(Holding(r.gpu_type, r.spec.resources.total_gpus,
                                                max(0.0, r.start_s + r.spec.walltime_s - now), r.overflow)
                                        for r in self.running[site.id].values()))
                 for site in self.sites]
        self._view_cache = (now, views)
        return views

    def _budget(self, tenant_id: str, at: datetime) -> TenantBudget:
        tenant, ledger = self.catalog.tenants[tenant_id], self.ledger[tenant_id]
        return TenantBudget(
            allocation_left_h=tenant.allocation_gpu_hours - ledger.allocation_used_h - ledger.committed_h,
            budget_left_eur=tenant.monthly_budget_eur - ledger.spent_eur.get(f"{at:%Y-%m}", 0.0)
            - ledger.committed_eur)

    def _at(self, seconds: float) -> datetime:
        return self.start + timedelta(seconds=seconds)

    def _carbon(self, site: SiteEntry, at: datetime) -> float:
        """The site's intensity at `at`, by the hour (cached: a replay asks for the same hours many times)."""
        key = (site.id, int(at.timestamp() // 3600))
        if key not in self._intensity:
            self._intensity[key] = site_intensity(site, at, self.carbon)
        return self._intensity[key]

    def _forecast(self, site: SiteEntry, at: datetime) -> float:
        return self._carbon(site, at)


def replay(jobs: list[TraceJob], catalog: Catalog, carbon: CarbonProvider, policy: str, start: datetime,
           tenants: dict[str, str], progress: Callable[[int], None] | None = None) -> list[Outcome]:
    """Every job's outcome under the policy, in the trace's order."""
    return Replay(catalog, carbon, policy, start, tenants).run(jobs, progress)
