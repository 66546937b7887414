"""Reservations: the GPUs that placed jobs hold at a site, one document per site. Pure.

The routing service changes a site's document by compare-and-set on its revision (JetStream KV), so
several routing replicas never promise the same GPUs twice: a replica that loses the race re-reads and
re-checks. A job's reservation is released when it ends, is cancelled, or is requeued. The document also
counts, per tenant, the overflow jobs ever placed at the site: counted in the same write as the
reservation, so a count is never lost or doubled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from services.routing.policy import Holding


class NoCapacity(Exception):
    pass


@dataclass(frozen=True)
class Reservation:
    tenant: str
    gpu_type: str
    gpus: int
    attempt: int = 0
    overflow: bool = False
    cost_eur: float = 0.0  # worst case (walltime), what the tenant's budget must still cover
    allocation_h: float = 0.0  # worst case, likewise for its allocation
    placed_at: float = 0.0  # epoch seconds
    walltime_s: float = 0.0
    # the placement try that made it: of two tries at one attempt, the one whose `placed` event the stream
    # keeps owns the GPUs, and the other gives back only what it made itself
    token: str = ""

    @classmethod
    def of(cls, raw: dict) -> Reservation:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def jobs(doc: dict | None) -> dict[str, Reservation]:
    return {job_id: Reservation.of(r) for job_id, r in (doc or {}).get("jobs", {}).items()}


def job(doc: dict | None, job_id: str) -> Reservation | None:
    raw = (doc or {}).get("jobs", {}).get(job_id)
    return Reservation.of(raw) if raw is not None else None


# Totals kept in the document beside the jobs, changed in the same write as a job's entry: what a placement
# reads (free GPUs, overflow held, what a tenant's running jobs may still cost) costs the same whether the
# site holds ten jobs or ten thousand. A document written before they existed is summed once.

def totals(doc: dict | None) -> dict:
    """{"held": {type: gpus}, "overflow": {type: gpus}, "committed": {tenant: [eur, allocation hours]}}."""
    if doc and "totals" in doc:
        return doc["totals"]
    out: dict = {"held": {}, "overflow": {}, "committed": {}}
    for r in jobs(doc).values():
        _count(out, r, 1)
    return out


def _count(out: dict, r: Reservation, sign: int, gpus: bool = True, cost: bool = True) -> None:
    if gpus:
        out["held"][r.gpu_type] = out["held"].get(r.gpu_type, 0) + sign * r.gpus
        if r.overflow:
            out["overflow"][r.gpu_type] = out["overflow"].get(r.gpu_type, 0) + sign * r.gpus
    if cost:
        eur, hours = out["committed"].get(r.tenant, (0.0, 0.0))
        out["committed"][r.tenant] = [eur + sign * r.cost_eur, hours + sign * r.allocation_h]


def _with(doc: dict | None, job_id: str, r: Reservation, sign: int, gpus: bool = True, cost: bool = True) -> dict:
    """The document with the job's entry added (sign 1) or removed (-1), and its totals to match (only its
    GPUs, or only its cost, if told)."""
    new = dict(doc or {})
    entries = dict(new.get("jobs", {}))
    if sign > 0:
        entries[job_id] = asdict(r)
    else:
        entries.pop(job_id, None)
    new["jobs"], new["totals"] = entries, _totals_with(doc, r, sign, gpus, cost)
    return new


def _totals_with(doc: dict | None, r: Reservation, sign: int, gpus: bool = True, cost: bool = True) -> dict:
    sums = totals(doc)
    sums = {"held": dict(sums["held"]), "overflow": dict(sums["overflow"]), "committed": dict(sums["committed"])}
    _count(sums, r, sign, gpus, cost)
    return sums


def reserved(doc: dict | None) -> dict[str, int]:
    """GPUs held by type."""
    return {t: n for t, n in totals(doc)["held"].items() if n}


def free(doc: dict | None, total: dict[str, int]) -> dict[str, int]:
    held = totals(doc)["held"]
    return {t: n - held.get(t, 0) for t, n in total.items()}


def overflow_held(doc: dict | None) -> dict[str, int]:
    """GPUs held by overflow jobs, by type."""
    return dict(totals(doc)["overflow"])


def committed(doc: dict | None, tenant: str) -> tuple[float, float]:
    """What the tenant's jobs here may still cost at most: euros, allocation hours."""
    eur, hours = totals(doc)["committed"].get(tenant, (0.0, 0.0))
    return eur, hours


def holdings(doc: dict | None, now: float, gpu_types: set[str] | None = None) -> tuple[Holding, ...]:
    """Each job's GPUs and when they are back at the latest (of the given types only, if given: reading them
    all costs a pass over every job here, needed only where GPUs are short)."""
    if gpu_types is not None and not gpu_types:
        return ()
    return tuple(Holding(r.gpu_type, r.gpus, max(0.0, r.placed_at + r.walltime_s - now), r.overflow)
                 for raw in (doc or {}).get("jobs", {}).values()
                 if gpu_types is None or raw["gpu_type"] in gpu_types for r in (Reservation.of(raw),))


def holds(doc: dict | None, job_id: str) -> bool:
    return job_id in (doc or {}).get("jobs", {})


def overflow_placed(doc: dict | None) -> dict[str, int]:
    """Overflow jobs ever placed at the site, by tenant."""
    return dict((doc or {}).get("overflow_placed", {}))


def reserve(doc: dict | None, job_id: str, reservation: Reservation, total: dict[str, int],
            limit: tuple[float, float] | None = None, overflow_share: float = 1.0) -> dict | None:
    """The document with the job's GPUs held; None if it holds them already for this attempt (or a later one);
    NoCapacity if they are gone, if an overflow job would take overflow jobs past the site's `overflow_share`
    of its GPUs, or if the tenant's jobs here would commit more than `limit` (euros, allocation hours).
    GPUs still held for an earlier attempt (one it left) are taken over.

    Tries placed at once each decided on the document as it was before the others: these are the checks
    that must hold for all of them together."""
    r = reservation
    earlier = job(doc, job_id)
    if earlier is not None and earlier.attempt >= r.attempt:
        return None
    base = release(doc, job_id) or doc
    if r.gpus and free(base, total).get(r.gpu_type, 0) < r.gpus:
        raise NoCapacity(f"{r.gpus} {r.gpu_type} no longer free")
    share = int(overflow_share * total.get(r.gpu_type, 0))  # as the policy counts it
    if r.overflow and r.gpus and overflow_held(base).get(r.gpu_type, 0) + r.gpus > share:
        raise NoCapacity(f"the overflow share of {r.gpu_type} is taken meanwhile")
    if limit is not None:
        eur, hours = committed(base, r.tenant)
        over_eur = r.cost_eur and eur + r.cost_eur > limit[0] + 1e-9
        over_hours = r.allocation_h and hours + r.allocation_h > limit[1] + 1e-9
        if over_eur or over_hours:
            raise NoCapacity(f"{r.tenant}'s budget is committed meanwhile")
    new = _with(base, job_id, r, 1)
    if r.overflow:
        counts = overflow_placed(doc)
        counts[r.tenant] = counts.get(r.tenant, 0) + 1
        new["overflow_placed"] = counts
    return new


def release(doc: dict | None, job_id: str, before_attempt: int | None = None, token: str | None = None,
            until_metered: bool = False) -> dict | None:
    """The document without the job (only an attempt older than `before_attempt`, if given: a requeued job's
    new placement may already hold GPUs; only the reservation made with `token`, if given); None if there is
    nothing to release.

    With `until_metered` (a run that ended, which billing meters), the GPUs come back but what the job may
    cost stays committed until `metered` says billing counted it: between the two, a tenant's budget would
    otherwise look larger than it is, by the job's cost."""
    if doc is None or not holds(doc, job_id):
        return None
    raw = doc["jobs"][job_id]
    if before_attempt is not None and raw.get("attempt", 0) >= before_attempt:
        return None
    if token is not None and raw.get("token", "") != token:
        return None
    r = Reservation.of(raw)
    keep_cost = until_metered and not raw.get("metered") and bool(r.cost_eur or r.allocation_h)
    new = _with(doc, job_id, r, -1, cost=not keep_cost)
    if keep_cost:
        new["unmetered"] = {**doc.get("unmetered", {}), job_id: asdict(r)}
    return new


def metered(doc: dict | None, job_id: str) -> dict | None:
    """The document once billing has metered the job (its real cost is spent now): what it may cost is no
    longer committed. Metered before its GPUs came back, it is marked so, and `release` frees it whole."""
    if doc is None:
        return None
    if unmetered(doc, job_id):
        new = dict(doc)
        new["totals"] = _totals_with(doc, Reservation.of(doc["unmetered"][job_id]), -1, gpus=False)
        new["unmetered"] = {k: v for k, v in doc["unmetered"].items() if k != job_id}
        return new
    if holds(doc, job_id) and not doc["jobs"][job_id].get("metered"):
        new = dict(doc)
        new["jobs"] = {**doc["jobs"], job_id: {**doc["jobs"][job_id], "metered": True}}
        return new
    return None


def unmetered(doc: dict | None, job_id: str) -> bool:
    return job_id in (doc or {}).get("unmetered", {})


def holder(held: dict[str, dict], job_id: str, attempt: int | None = None) -> tuple[str, Reservation] | None:
    """The site whose GPUs the job holds (for this attempt, if given), of the sites' documents `held`."""
    for site_id, doc in held.items():
        r = job(doc, job_id)
        if r is not None and (attempt is None or r.attempt == attempt):
            return site_id, r
    return None


def overflow_summary(held: dict[str, dict]) -> dict:
    """Overflow placed so far, per site and per tenant, and the GPUs overflow jobs hold now."""
    by_site: dict[str, dict] = {}
    by_tenant: dict[str, int] = {}
    for site_id, doc in held.items():
        counts = overflow_placed(doc)
        now = sum(r.gpus for r in jobs(doc).values() if r.overflow)
        by_site[site_id] = {"jobs": sum(counts.values()), "by_tenant": counts, "gpus_now": now}
        for tenant, n in counts.items():
            by_tenant[tenant] = by_tenant.get(tenant, 0) + n
    return {"sites": by_site, "tenants": by_tenant}
