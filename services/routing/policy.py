"""Where should this job run? Pure: the job, its tenant and a view of every site in; a Decision out.

Hard constraints come first, each failing one named as a reason on the site's candidate. Some can never
change (residency, certifications, GPU types the site lacks, overflow rights): when every site fails one of
those, the job is impossible and is rejected instead of waiting forever. Others pass (a site down, GPUs
busy): the job waits. Among eligible sites the skeleton's rule applies: a tenant with a public allocation
runs on public capacity first; then the site with the most GPUs free wins, ties broken by site id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from shared.contracts.catalog import SiteEntry, TenantEntry
from shared.contracts.jobs import Candidate, Decision, JobSpec

NO_GPU = "none"


@dataclass(frozen=True)
class SiteView:
    """What routing knows of a site when it places a job."""

    entry: SiteEntry
    up: bool
    free: dict[str, int] = field(default_factory=dict)  # GPUs by type not reserved by any job
    carbon_g_per_kwh: float = 0.0

    @property
    def id(self) -> str:
        return self.entry.id


def permanent_reasons(spec: JobSpec, tenant: TenantEntry, site: SiteEntry) -> list[str]:
    """Why the site could never run the job, whatever its load."""
    reasons = []
    residency = spec.residency or tenant.residency
    if residency == "EU" and site.jurisdiction != "EU":
        reasons.append(f"residency EU: site's jurisdiction is {site.jurisdiction}")
    elif residency not in ("EU", "any") and site.country != residency:
        reasons.append(f"residency {residency}: site is in {site.country}")
    missing = sorted(set(spec.certifications) - set(site.certifications))
    if missing:
        reasons.append(f"lacks certification {', '.join(missing)}")
    if not site.public and (spec.overflow == "forbidden" or tenant.overflow == "forbidden"):
        who = "job" if spec.overflow == "forbidden" else "tenant"
        reasons.append(f"overflow forbidden by the {who}: site is paid capacity")
    if site.public and tenant.allocation_gpu_hours <= 0:
        reasons.append("tenant has no public allocation")
    need = spec.resources.total_gpus
    if need > 0:
        types = _types(spec, site.gpus)
        if not types:
            reasons.append(f"offers no {spec.resources.gpu_type} GPUs")
        elif max(site.gpus[t] for t in types) < need:
            reasons.append(f"needs {need} {spec.resources.gpu_type} GPUs, has {max(site.gpus[t] for t in types)}")
    return reasons


def place(spec: JobSpec, tenant: TenantEntry, sites: Iterable[SiteView]) -> Decision:
    need = spec.resources.total_gpus
    hours = spec.walltime_s / 3600
    candidates: list[Candidate] = []
    choices: list[tuple[tuple, str, str]] = []
    impossible = True
    views = {s.id: s for s in sites}
    for site in sorted(views.values(), key=lambda s: s.id):
        reasons = permanent_reasons(spec, tenant, site.entry)
        impossible = impossible and bool(reasons)
        gpu_type = NO_GPU
        if not reasons:
            if not site.up:
                reasons.append("site is down or has not reported")
            elif need > 0:
                fitting = [t for t in _types(spec, site.free) if site.free[t] >= need]
                if fitting:
                    gpu_type = max(fitting, key=lambda t: (site.free[t], t))
                else:
                    free = max((site.free.get(t, 0) for t in _types(spec, site.entry.gpus)), default=0)
                    reasons.append(f"needs {need} {spec.resources.gpu_type} GPUs now, {free} free")
        parts = _parts(site, gpu_type, need, hours)
        score = None
        if not reasons:
            free_after = float(site.free.get(gpu_type, 0) - need) if need else 0.0
            score = free_after
            public_first = site.entry.public and tenant.allocation_gpu_hours > 0
            choices.append(((not public_first, -free_after, site.id), site.id, gpu_type))
        candidates.append(Candidate(site=site.id, eligible=not reasons, reasons=reasons, score=score, parts=parts))

    if not choices:
        return Decision(site=None, candidates=candidates, impossible=impossible and bool(candidates))
    _, site_id, gpu_type = min(choices)
    # overflow: a tenant with public hours that leaves public capacity for paid capacity
    overflow = tenant.allocation_gpu_hours > 0 and not views[site_id].entry.public
    return Decision(site=site_id, gpu_type=gpu_type, overflow=overflow, candidates=candidates)


def _types(spec: JobSpec, offered: dict[str, int]) -> list[str]:
    wanted = spec.resources.gpu_type
    return sorted(offered) if wanted == "any" else [wanted] if wanted in offered else []


def _parts(site: SiteView, gpu_type: str, gpus: int, hours: float) -> dict[str, float]:
    entry = site.entry
    if gpu_type == NO_GPU:
        gpu_type = next(iter(sorted(entry.gpus)), NO_GPU)
    price = entry.price(gpu_type) if gpu_type != NO_GPU else 0.0
    watts = entry.watts(gpu_type) if gpu_type != NO_GPU else 0.0
    energy_kwh = watts * gpus * hours * entry.pue / 1000
    return {"wait_s": 0.0, "cost_eur": round(price * gpus * hours, 4),
            "co2e_kg": round(energy_kwh * site.carbon_g_per_kwh / 1000, 4)}

