"""Where should this job run? Pure: the job, its tenant's rights and budget, and a view of every site in;
a Decision out, with every site's reasons, score and score parts.

1. Hard constraints, each failing one named on the site's candidate. Some never change (residency,
   certifications, GPU types and counts the site lacks, overflow rights, the job's own budget, files the site
   cannot stage): when every
   site fails one of those the job is impossible and is rejected rather than left waiting forever. Others
   pass (a site down, GPUs busy, the tenant's allocation or monthly budget spent, a private site's overflow
   share taken): the job waits.
2. Governed overflow. A tenant with public allocation hours left runs on public HPC first. It overflows to
   paid (private or partner) capacity only when the public estimated wait exceeds the tenant's threshold
   or the job's deadline cannot be met there; only if the job and the tenant allow overflow; only if the
   worst-case cost (walltime x GPUs x price) fits the job's budget and the tenant's remaining monthly
   budget; and only while overflow jobs hold no more than the private site's `overflow_share` of its GPUs.
   A tenant without an allocation goes straight to paid capacity (the same budget rules apply).
3. Score among the sites that can take the job now, by its objective: expected completion (wait + run),
   worst-case cost and carbon (GPU watts x GPUs x hours x PUE x the zone's intensity now), each normalised
   by the largest among them and weighted; the highest score wins, ties to the alphabetically first site.
4. Greener hours: a job whose objective is carbon and whose deadline leaves slack waits for the coming hour
   (within the slack, a day at most) when its chosen site's grid is greener then by 10 % or more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from shared.contracts.catalog import SiteEntry, TenantEntry
from shared.contracts.jobs import Candidate, Decision, HistoryEntry, JobSpec, JobState
from shared.queueing import Drained, Queued, run_out

NO_GPU = "none"
INF = math.inf
Intensity = Callable[[SiteEntry, datetime], float]  # a site's grid intensity (gCO2eq/kWh) at an hour

# objective -> weights of (time, cost, carbon)
WEIGHTS = {
    "balanced": (1 / 3, 1 / 3, 1 / 3),
    "time": (0.8, 0.1, 0.1),
    "cost": (0.1, 0.8, 0.1),
    "carbon": (0.1, 0.1, 0.8),
}


class Hold(StrEnum):
    """What keeps a site that could run the job some day from taking it now: what to watch for a change."""

    GPUS = "gpus"  # not enough of its GPUs free (or the site saturated with a queue of its own)
    GATE = "gate"  # public capacity first: the public wait is within the tenant's threshold
    BUDGET = "budget"  # the tenant's allocation or monthly budget is spent (net of what runs)
    SHARE = "share"  # overflow jobs hold the private site's overflow share
    DOWN = "down"  # the site is down or has not reported
    AVOID = "avoid"  # the site gave this job back a moment ago
    # only in a published decision (a Candidate's `holds`), for what the policy leaves to its callers:
    LINE = "line"  # a waiting job of higher priority takes the site's GPUs first (routing's line)
    GREENER = "greener"  # the job waits for a greener hour at the site (Decision.wait_until)


@dataclass(frozen=True)
class Holding:
    """GPUs a placed job holds at a site, and when they are expected back at the latest."""

    gpu_type: str
    gpus: int
    ends_in_s: float
    overflow: bool = False


# how many jobs ahead in a site's line a wait runs out one by one (the rest count by their GPU-seconds)
LINE_EXACT = 128


@dataclass
class SiteView:
    """What routing knows of a site when it places a job. Not changed once made (not frozen: a replay makes
    one for every site at every question, and a frozen dataclass is three times as slow to make)."""

    entry: SiteEntry
    up: bool
    free: dict[str, int] = field(default_factory=dict)  # GPUs by type not held by any job
    carbon_g_per_kwh: float = 0.0
    holdings: tuple[Holding, ...] = ()
    # how long ago the holdings' `ends_in_s` were counted: a caller that keeps them while its clock moves (the
    # replay, between a site's starts and ends) says so rather than building them again for every view
    holdings_age_s: float = 0.0
    # capacity reports the site saturated with a queue of its own (work Continuum did not place, on a shared
    # Slurm say): it takes no new job now, and a job would wait there at least as long as capacity forecasts
    queued_at_site: int = 0
    reported_wait_s: dict[str, float] = field(default_factory=dict)
    # the jobs ahead of this one in routing's own line that wait for this site's GPUs, in line order (their
    # `line_entry`): they take GPUs that come back before this job does. Only the first LINE_EXACT are run out
    # one by one; the GPU-seconds of any beyond them, by type, are `backlog_gpu_s`
    queue: tuple[Queued, ...] = ()
    backlog_gpu_s: dict[str, float] = field(default_factory=dict)
    # how to have the holdings and the queue's first LINE_EXACT run out (`shared.queueing.drain`, counted as the
    # holdings are), with the backlog beyond them, from a caller that keeps them between views (the replay): the
    # wait starts from them, when it needs to (instead of `queue` and `backlog_gpu_s`)
    line: Callable[[], tuple[Drained, Mapping[str, float]]] | None = None
    # the GPUs overflow jobs hold, by type, from a caller that counts them as they start and end (the replay);
    # else summed from the holdings
    overflow_gpus: Mapping[str, int] | None = None
    _waits: dict[tuple[str, int], float] = field(default_factory=dict, compare=False, repr=False)
    id: str = field(init=False)  # the entry's: a field, not a property, as the policy reads it for every site

    def __post_init__(self) -> None:
        self.id = self.entry.id

    @property
    def saturated(self) -> bool:
        return self.queued_at_site > 0

    def wait_s(self, gpu_type: str, need: int) -> float:
        """When `need` GPUs of the type are expected free for this job: now, or once the jobs ahead in line
        have had theirs and held jobs reach their walltime (the capacity forecast's `run_out`); on a saturated
        site, no sooner than capacity's forecast. Kept: the policy asks it of a view more than once."""
        if (gpu_type, need) not in self._waits:
            floor = self.reported_wait_s.get(gpu_type, INF) if self.saturated else 0.0
            if need <= self.free.get(gpu_type, 0):
                wait = floor
            else:
                backlog: Mapping[str, float]
                if self.line is not None:
                    drained, backlog = self.line()
                    wait = drained.start(gpu_type, need, self.holdings_age_s) - self.holdings_age_s
                else:
                    running = ((h.gpu_type, h.gpus, h.ends_in_s) for h in self.holdings)
                    wait = run_out(self.free, running, self.queue, gpu_type, need, self.holdings_age_s)
                    backlog = self.backlog_gpu_s
                # a line longer than that is days of work: spread over the site's GPUs of the type, it adds the
                # same order of wait as running it out would, at a cost that does not grow with it
                spread = max(1, self.entry.gpus.get(gpu_type, 0))
                wait = max(floor, wait + backlog.get(gpu_type, 0.0) / spread)
            self._waits[(gpu_type, need)] = wait
        return self._waits[(gpu_type, need)]

    def overflow_held(self, gpu_type: str) -> int:
        if self.overflow_gpus is not None:
            return self.overflow_gpus.get(gpu_type, 0)
        return sum(h.gpus for h in self.holdings if h.overflow and h.gpu_type == gpu_type)


# placements a job gets before it fails: the first, and one after each site that refused or lost it (a
# refusal for a passing reason, a controller busy or out of reach, counts apart: it is tried again later)
MAX_ATTEMPTS = 4
MAX_TRANSIENT_REFUSALS = 8
# how long a site that lost a job is passed over for it; one that was briefly unable to take it, for a time
# that doubles with each such refusal, up to the same
AVOID_S = 600.0
TRANSIENT_BACKOFF_S = 5.0


# A waiting job is tried again after the base delay, stretched for lower priorities (twice as long at priority
# 0 as at 9) and for a job that has waited long (a fifth more a try, up to five times at the 20th): at most ten
# times the base
RETRY_TOP_PRIORITY = 9
RETRY_STRETCH_TRIES = 5
RETRY_MOST_TRIES = 20


def retry_delay_s(base_s: float, priority: int, tries: int, now: datetime | None = None,
                  wait_until: datetime | None = None) -> float:
    """How long a waiting job waits before it is tried again: higher priorities come back sooner, so they take
    freed GPUs first; a job that has waited long comes back less often, so that a crowd of waiting jobs does
    not swamp the bus; a job waiting for a greener hour (`wait_until`) comes back then, not before."""
    delay = (base_s * (1 + (RETRY_TOP_PRIORITY - priority) / RETRY_TOP_PRIORITY)
             * (1 + min(tries, RETRY_MOST_TRIES) / RETRY_STRETCH_TRIES))
    if wait_until is not None and now is not None:
        delay = max(delay, (wait_until - now).total_seconds())
    return delay


@dataclass(frozen=True)
class Departures:
    """What a job's requeues say of the sites it left."""

    avoid: dict[str, str]  # site -> why it is passed over for now, in the site's own words
    refused: dict[str, str]  # site -> the words it refused the job with, for a reason that will not change
    give_up: str | None  # why the job fails now rather than be placed again


def departures(history: Iterable[HistoryEntry], now: datetime) -> Departures:
    """Read from the job's `requeued` events: which sites to avoid, for how long, and whether to stop."""
    until: dict[str, float] = {}
    words: dict[str, str] = {}
    refused: dict[str, str] = {}
    transient: dict[str, int] = {}
    lost = 0
    last = ""
    for h in history:
        site = getattr(h, "site", None)
        if h.state != JobState.requeued or not site:
            continue
        last = words[site] = getattr(h, "reason", None) or f"{site} gave the job back"
        kind = getattr(h, "refusal", None)
        if kind == "permanent":
            refused[site] = words[site]
        if kind == "transient":
            transient[site] = transient.get(site, 0) + 1
            window = min(AVOID_S, TRANSIENT_BACKOFF_S * 2 ** (transient[site] - 1))
        else:
            lost += 1
            window = AVOID_S
        until[site] = max(until.get(site, -INF), (h.time - now).total_seconds() + window)
    avoid = {site: f"{words[site]} (tried again in {left:.0f} s)" for site, left in until.items()
             if left > 0 and site not in refused}
    give_up = None
    if lost >= MAX_ATTEMPTS:
        give_up = f"placed {lost + sum(transient.values())} times, refused or lost every time; last: {last}"
    elif sum(transient.values()) >= MAX_TRANSIENT_REFUSALS:
        give_up = f"refused {sum(transient.values())} times by sites that were busy or out of reach; last: {last}"
    return Departures(avoid, refused, give_up)


@dataclass(frozen=True)
class TenantBudget:
    """What the tenant has left this period, net of what its running jobs may still use (worst case)."""

    allocation_left_h: float = INF
    budget_left_eur: float = INF


def residency_reason(spec: JobSpec, tenant: TenantEntry, site: SiteEntry) -> str | None:
    """Why the job's data may not go to the site, if it may not."""
    residency = spec.residency or tenant.residency
    if residency == "EU" and site.jurisdiction != "EU":
        return f"residency EU: site's jurisdiction is {site.jurisdiction}"
    if residency not in ("EU", "any") and site.country != residency:
        return f"residency {residency}: site is in {site.country}"
    return None


def permanent_reasons(spec: JobSpec, tenant: TenantEntry, site: SiteEntry) -> list[str]:
    """Why the site could never run the job, whatever its load and whatever the month."""
    reasons = []
    if residency := residency_reason(spec, tenant, site):
        reasons.append(residency)
    if spec.certifications and (missing := sorted(set(spec.certifications) - set(site.certifications))):
        reasons.append(f"lacks certification {', '.join(missing)}")
    if not site.public and (spec.overflow == "forbidden" or tenant.overflow == "forbidden"):
        who = "job" if spec.overflow == "forbidden" else "tenant"
        reasons.append(f"overflow forbidden by the {who}: site is paid capacity")
    if site.public and tenant.allocation_gpu_hours <= 0:
        reasons.append("tenant has no public allocation")
    need = spec.resources.total_gpus
    types = gpu_types(spec, site.gpus)
    if need > 0:
        if not types:
            reasons.append(f"offers no {spec.resources.gpu_type} GPUs")
        elif (most := max(site.gpus[t] for t in types)) < need:
            reasons.append(f"needs {need} {spec.resources.gpu_type} GPUs, has {most}")
    if not site.public and types:
        # worst_case_cost of the cheapest type (a price is never negative: the cheapest type costs least)
        cheapest = worst_case_cost(spec, site, min(types, key=site.price))
        if tenant.monthly_budget_eur <= 0:
            reasons.append("tenant has no budget for paid capacity")
        elif cheapest > tenant.monthly_budget_eur:
            reasons.append(f"worst-case cost {cheapest:.2f} EUR exceeds the tenant's monthly budget "
                           f"{tenant.monthly_budget_eur:.2f} EUR")
        if spec.budget_eur is not None and cheapest > spec.budget_eur:
            reasons.append(f"worst-case cost {cheapest:.2f} EUR exceeds the job's budget {spec.budget_eur:.2f} EUR")
    if site.public and types and tenant.allocation_gpu_hours > 0:
        hours = min(worst_case_allocation_h(spec, site, t) for t in types)
        if hours > tenant.allocation_gpu_hours:
            reasons.append(f"may use {hours:.1f} allocation hours, the tenant's grant is "
                           f"{tenant.allocation_gpu_hours:.1f}")
    # only a job with steps or files has paths to check (the replay asks this of jobs without, a great many times)
    if (spec.inputs or spec.outputs or spec.steps) and (staging := site.cannot_stage(spec)):
        reasons.append(staging)
    return reasons + beyond_limits(spec, site)


def beyond_limits(spec: JobSpec, site: SiteEntry) -> list[str]:
    """What the job asks for beyond the limits the site is known to have (its catalog's Slurm options). Only
    what the job says counts: what it leaves unset, the site's own defaults decide."""
    limits, r = site.slurm, spec.resources
    if limits is None:
        return []
    reasons = []
    if limits.max_mem_per_node_gb and r.memory_gb and r.memory_gb > limits.max_mem_per_node_gb:
        reasons.append(f"asks {r.memory_gb:g} GB of memory a node, the site's nodes have at most "
                       f"{limits.max_mem_per_node_gb:g} GB")
    if limits.max_cpus_per_node and r.cpus and r.cpus > limits.max_cpus_per_node:
        reasons.append(f"asks {r.cpus} CPUs a task, the site's nodes have at most {limits.max_cpus_per_node}")
    if limits.max_nodes and r.nodes > limits.max_nodes:
        reasons.append(f"asks {r.nodes} nodes, the site allows at most {limits.max_nodes} a job")
    if limits.max_walltime_s and spec.walltime_s > limits.max_walltime_s:
        reasons.append(f"asks a walltime of {spec.walltime_s} s, the site allows at most {limits.max_walltime_s} s")
    return reasons


def worst_case_cost(spec: JobSpec, site: SiteEntry, gpu_type: str) -> float:
    return spec.resources.total_gpus * spec.walltime_s / 3600 * site.price(gpu_type)


def worst_case_allocation_h(spec: JobSpec, site: SiteEntry, gpu_type: str) -> float:
    return spec.resources.total_gpus * spec.walltime_s / 3600 * site.allocation_factor.get(gpu_type, 1.0)


# What holds a job at a site, and why in words: a template and what fills it (str.format), written when asked
# (`Choice.reasons`). The words may need what the choice itself does not (a busy site's expected wait, which
# runs out its line), and the replay asks millions of questions and reads none of their words.
Held = tuple[Hold, str, tuple]


@dataclass
class Choice:
    """The policy's answer, before it is written as a contract `Decision`: where the job goes (`site` None: it
    waits, or never can), and every site's reasons, score and parts, keyed by site, in site order."""

    site: str | None
    gpu_type: str | None
    overflow: bool
    impossible: bool
    never: dict[str, list[str]]  # why each site could never run the job (empty: it could some day)
    # what holds the job at each site that could run it some day but not now, each with why in words
    held: dict[str, list[Held]]
    scores: dict[str, float]
    # of the sites it was scored on; the others' only explain the choice, and are worked out when it is written
    # out (`decision`)
    parts: dict[str, dict[str, float]]
    gate: str | None = None  # why public capacity first holds it back from every paid site (None: it does not)
    # the waits public capacity first weighed, of the public sites busy for the job (as parts write a wait)
    public_waits: dict[str, float] = field(default_factory=dict)
    wait_until: datetime | None = None  # the greener hour it waits for
    waits_at: str | None = None  # and the site where it waits for it
    greener: str = ""  # why it waits for that hour

    @property
    def holds(self) -> dict[str, frozenset[Hold]]:
        """What holds the job at each site that could run it some day but not now (see Hold)."""
        return {site: frozenset([kind for kind, _, _ in held]) for site, held in self.held.items() if held}

    @property
    def reasons(self) -> dict[str, list[str]]:
        """Every site's reasons, in words (none: it is eligible)."""
        reasons = {}
        for site, never in self.never.items():
            held = self.held.get(site)  # a site that could some day: what holds it there, if anything
            reasons[site] = list(never) if held is None else [words.format(*what) for _, words, what in held]
        if self.waits_at is not None:
            reasons[self.waits_at].append(self.greener)
        return reasons

    def decision(self, spec: JobSpec, views: Iterable[SiteView]) -> Decision:
        """Written out, with the parts of every site (`choose` works out only those it weighs)."""
        parts = {s.id: self.parts.get(s.id) or _parts(spec, s, _best_type(spec, s)) for s in views}
        holds = {site: sorted(kind.value for kind in kinds) for site, kinds in self.holds.items()}
        if self.waits_at is not None:
            holds[self.waits_at] = [Hold.GREENER.value]
        candidates = [Candidate.model_construct(site=site, eligible=not why, reasons=why, holds=holds.get(site, []),
                                                score=self.scores.get(site), parts=parts[site])
                      for site, why in self.reasons.items()]
        # built, not validated: every value is the policy's own, of the model's types
        return Decision.model_construct(site=self.site, gpu_type=self.gpu_type, overflow=self.overflow,
                                        candidates=candidates, impossible=self.impossible, wait_until=self.wait_until)


def place(spec: JobSpec, tenant: TenantEntry, sites: Iterable[SiteView], budget: TenantBudget | None = None,
          now: datetime | None = None, avoid: Mapping[str, str] | None = None,
          refused: Mapping[str, str] | None = None, forecast: Intensity | None = None,
          weights: tuple[float, float, float] | None = None,
          permanent: Mapping[str, list[str]] | None = None) -> Decision:
    """Where the job should run, explained (`choose`, as a contract Decision)."""
    views = list(sites)
    return choose(spec, tenant, views, budget, now, avoid, refused, forecast, weights,
                  permanent).decision(spec, views)


def choose(spec: JobSpec, tenant: TenantEntry, sites: Iterable[SiteView], budget: TenantBudget | None = None,
           now: datetime | None = None, avoid: Mapping[str, str] | None = None,
           refused: Mapping[str, str] | None = None, forecast: Intensity | None = None,
           weights: tuple[float, float, float] | None = None,
           permanent: Mapping[str, list[str]] | None = None) -> Choice:
    """`avoid`: sites passed over for now, with why; `refused`: sites that refused this job for good, with
    their words (`departures` reads both from the job's history). `forecast`: a site's grid intensity at an
    hour to come, for a job that may wait for a greener one (`greener_hour`). `weights`: (time, cost, carbon)
    instead of the objective's (a replay's carbon-blind `cheapest`, say). `permanent`: each site's
    `permanent_reasons` for the job, from a caller that keeps them between its tries (the replay)."""
    budget = budget or TenantBudget()
    avoid, refused = avoid or {}, refused or {}
    views = sorted(sites, key=lambda s: s.id)
    never: dict[str, list[str]] = {}
    chosen_type: dict[str, str] = {}  # of the sites that could run it some day: the GPU type it would take there
    for site in views:
        never[site.id] = (permanent[site.id] if permanent is not None
                          else permanent_reasons(spec, tenant, site.entry))
        if site.id in refused:
            never[site.id] = [*never[site.id], f"refused this job: {refused[site.id]}"]
        if not never[site.id]:  # a site that never could is left out of the rest (its parts only explain)
            chosen_type[site.id] = _best_type(spec, site)
    # overflow: a job that public capacity could run goes to paid capacity instead
    overflow = any(s.entry.public and s.id in chosen_type for s in views)
    need = spec.resources.total_gpus
    held = {s.id: _passing_reasons(spec, s, chosen_type[s.id], need, budget, avoid, overflow)
            for s in views if s.id in chosen_type}
    gate, public_waits = _public_first(spec, tenant, views, held, chosen_type, need, now) if overflow else (None, {})

    eligible = [s for s in views if s.id in held and not held[s.id]]
    parts = {site.id: _parts(spec, site, chosen_type[site.id]) for site in eligible}
    scores = _scores(spec, eligible, parts, weights)
    if not eligible:
        return Choice(None, None, False, not chosen_type and bool(views), never, held, scores, parts, gate,
                      public_waits)
    best = min(eligible, key=lambda s: (-scores[s.id], s.id))
    if forecast is not None and now is not None and (shift := _greener(spec, best.entry, now, forecast)):
        when, then_g, now_g = shift
        greener = f"waiting for {when:%H:%M} UTC on {when:%Y-%m-%d}, {then_g:.0f} g/kWh vs {now_g:.0f} now"
        return Choice(None, None, False, False, never, held, scores, parts, wait_until=when, waits_at=best.id,
                      greener=greener)
    return Choice(best.id, chosen_type[best.id], overflow and not best.entry.public, False, never, held, scores,
                  parts, gate, public_waits)


def _public_first(spec: JobSpec, tenant: TenantEntry, views: list[SiteView], held: dict[str, list[Held]],
                  chosen_type: dict[str, str], need: int, now: datetime | None) -> tuple[str | None, dict[str, float]]:
    """Why a job that public capacity could run may not go to paid capacity yet (None: it may): a public site
    takes it now, or the public wait is within the tenant's threshold (and its deadline not too near). The gate
    holds every paid site the job could use some day, whatever else holds it there: a job held by it does not
    stand in a paid site's line (it would not take those GPUs if they came back). With the waits it weighed, of
    the public sites busy for the job."""
    public_ok, public_busy = [], []  # the public sites that can take it now; that wait for GPUs alone
    for site in views:
        if site.entry.public and site.id in held:
            if not held[site.id]:
                public_ok.append(site)
            elif all(kind == Hold.GPUS for kind, _, _ in held[site.id]):
                public_busy.append(site)
    gate, waits = None, {}
    if public_ok:
        gate = f"public capacity first: {public_ok[0].id} can run it now"
    elif public_busy:
        waits = {site.id: _wait_part(site, chosen_type[site.id], need) for site in public_busy}
        gate = _overflow_gate(spec, tenant, min(w if w >= 0 else INF for w in waits.values()), now)
    if gate:
        for site in views:
            if not site.entry.public and site.id in held:
                held[site.id].append((Hold.GATE, "{}", (gate,)))
    return gate, waits


# Greener hours: a job whose objective is carbon and that has slack (a deadline later than its earliest
# finish) may start later, at the hour of the coming ones whose intensity at its site is lowest, if that is at
# least this much below now's. The hourly data stands for a day-ahead forecast.
SHIFT_MIN_SAVING = 0.10
SHIFT_HORIZON_H = 24


def greener_hour(now: datetime, slack_s: float, intensity: Callable[[datetime], float],
                 min_saving: float = SHIFT_MIN_SAVING) -> tuple[datetime, float, float] | None:
    """(the hour to start at, its intensity, now's) if a coming hour within the slack is greener enough."""
    current = intensity(now)
    best_at, best_g = now, current
    top = now.replace(minute=0, second=0, microsecond=0)
    for h in range(1, min(SHIFT_HORIZON_H, int(slack_s // 3600)) + 1):
        at = top + timedelta(hours=h)
        if (at - now).total_seconds() > slack_s:
            break
        g = intensity(at)
        if g < best_g:
            best_at, best_g = at, g
    return (best_at, best_g, current) if best_g <= current * (1 - min_saving) else None


def slack_s(spec: JobSpec, now: datetime) -> float:
    """How much later than now the job may start and still meet its deadline (0 without one)."""
    if spec.deadline is None:
        return 0.0
    return max(0.0, (spec.deadline - now).total_seconds() - spec.walltime_s)


def _greener(spec: JobSpec, site: SiteEntry, now: datetime, forecast: Intensity):
    if spec.objective != "carbon" or spec.resources.total_gpus == 0:
        return None
    return greener_hour(now, slack_s(spec, now), lambda at: forecast(site, at))


def _passing_reasons(spec: JobSpec, site: SiteView, gpu_type: str, need: int, budget: TenantBudget,
                     avoid: Mapping[str, str], overflow: bool) -> list[Held]:
    """Why the site cannot take the job (of `need` GPUs) now, though it could some day, each with what it waits
    on."""
    why: list[Held] = []
    if site.id in avoid:
        why.append((Hold.AVOID, "{}", (avoid[site.id],)))
    if not site.up:
        why.append((Hold.DOWN, "site is down or has not reported", ()))
    entry = site.entry
    if entry.public:
        hours = worst_case_allocation_h(spec, entry, gpu_type)
        if hours > budget.allocation_left_h:
            why.append((Hold.BUDGET, "allocation spent: {:.1f} h left, the job may use {:.1f} h",
                        (max(budget.allocation_left_h, 0), hours)))
    else:
        cost = worst_case_cost(spec, entry, gpu_type)
        if cost > budget.budget_left_eur:
            why.append((Hold.BUDGET, "monthly budget spent: {:.2f} EUR left, the job may cost {:.2f} EUR",
                        (max(budget.budget_left_eur, 0), cost)))
        if overflow and need:
            share = int(entry.overflow_share * entry.gpus.get(gpu_type, 0))
            held = site.overflow_held(gpu_type)
            if held + need > share:
                why.append((Hold.SHARE, "overflow share full: overflow jobs hold {} of {} {} GPUs allowed",
                            (held, share, gpu_type)))
    free = site.free.get(gpu_type, 0)
    if need and free < need:
        why.append((Hold.GPUS, "needs {} {} GPUs now, {} free{}", (need, gpu_type, free,
                                                                    _ExpectedWait(site, gpu_type, need))))
    elif site.saturated:
        why.append((Hold.GPUS, "saturated: {} jobs queue at the site{}",
                    (site.queued_at_site, _ExpectedWait(site, gpu_type, need))))
    return why


class _ExpectedWait:
    """The " (expected in N s)" of a busy site's reason, worked out when its words are written."""

    def __init__(self, site: SiteView, gpu_type: str, need: int) -> None:
        self.site, self.gpu_type, self.need = site, gpu_type, need

    def __format__(self, spec: str) -> str:
        wait = self.site.wait_s(self.gpu_type, self.need)
        return f" (expected in {wait:.0f} s)" if wait < INF else ""


def _overflow_gate(spec: JobSpec, tenant: TenantEntry, public_wait_s: float, now: datetime | None) -> str | None:
    """Why the job may not overflow yet, or None when it may."""
    if public_wait_s > tenant.overflow_after_wait_s:
        return None
    if spec.deadline is not None and now is not None:
        finish_s = (spec.deadline - now).total_seconds()
        if public_wait_s + spec.walltime_s > finish_s:
            return None
    return (f"public capacity first: expected public wait {public_wait_s:.0f} s is within the tenant's "
            f"overflow threshold of {tenant.overflow_after_wait_s:.0f} s")


def _best_type(spec: JobSpec, site: SiteView) -> str:
    """For `gpu_type: any`, the type with the most GPUs free now (then the most in total, then by name)."""
    wanted = spec.resources.gpu_type
    if spec.resources.total_gpus == 0:
        return NO_GPU
    if wanted != "any":
        return wanted
    best: str = wanted
    most = None  # a loop rather than max(key=...): asked of every site at every question
    within = _within_job_budget(spec, site.entry)
    for gpu_type, total in site.entry.gpus.items():
        if within is not None and gpu_type not in within:
            continue
        key = (site.free.get(gpu_type, 0), total, gpu_type)
        if most is None or key > most:
            best, most = gpu_type, key
    return best


def _within_job_budget(spec: JobSpec, site: SiteEntry) -> set[str] | None:
    """On paid capacity, the types a job with a budget of its own can afford there (None: any type). The
    cheapest is among them, or the site could never run the job (a permanent reason)."""
    if spec.budget_eur is None or site.public:
        return None
    affordable = {t for t in site.gpus if worst_case_cost(spec, site, t) <= spec.budget_eur}
    return affordable or None


def gpu_types(spec: JobSpec, offered: dict[str, int]) -> list[str]:
    wanted = spec.resources.gpu_type
    return sorted(offered) if wanted == "any" else [wanted] if wanted in offered else []


def line_entry(spec: JobSpec, site: SiteEntry) -> Queued | None:
    """A waiting job as it stands in a site's line (SiteView.queue): the GPUs it will take there, of the type
    the site has most of among those it may use (which it is likeliest to get), and its walltime."""
    need = spec.resources.total_gpus
    types = [t for t in gpu_types(spec, site.gpus) if site.gpus[t] >= need]
    if not need or not types:
        return None
    return max(types, key=lambda t: (site.gpus[t], t)), need, float(spec.walltime_s)


def _wait_part(site: SiteView, gpu_type: str, need: int) -> float:
    """The site's expected wait for `need` GPUs of the type, as a decision's parts write it: to a tenth of a
    second, -1 for never."""
    wait = site.wait_s(gpu_type, need)
    return round(wait, 1) if wait < INF else -1.0


def _parts(spec: JobSpec, site: SiteView, gpu_type: str) -> dict[str, float]:
    entry = site.entry
    gpus = spec.resources.total_gpus
    hours = spec.walltime_s / 3600
    if gpu_type not in entry.gpus:
        wait = site.wait_s(gpu_type, gpus) if not gpus else INF
        return {"wait_s": round(wait, 1) if wait < INF else -1.0, "run_s": float(spec.walltime_s),
                "cost_eur": 0.0, "co2e_kg": 0.0}
    energy_kwh = entry.watts(gpu_type) * gpus * hours * entry.pue / 1000
    return {"wait_s": _wait_part(site, gpu_type, gpus),
            "run_s": float(spec.walltime_s),
            "cost_eur": round(entry.price(gpu_type) * gpus * hours, 4),
            "co2e_kg": round(energy_kwh * site.carbon_g_per_kwh / 1000, 4)}


def _scores(spec: JobSpec, eligible: list[SiteView], parts: dict[str, dict[str, float]],
            weights: tuple[float, float, float] | None = None) -> dict[str, float]:
    """1 is best on every part; each part is normalised by the largest among the eligible sites."""
    if not eligible:
        return {}
    w_time, w_cost, w_carbon = weights or WEIGHTS[spec.objective]
    times = {s.id: parts[s.id]["wait_s"] + parts[s.id]["run_s"] for s in eligible}
    costs = {s.id: parts[s.id]["cost_eur"] for s in eligible}
    carbons = {s.id: parts[s.id]["co2e_kg"] for s in eligible}

    def norm(values: dict[str, float], key: str) -> float:
        top = max(values.values())
        return values[key] / top if top > 0 else 0.0

    return {s.id: round(1.0 - (w_time * norm(times, s.id) + w_cost * norm(costs, s.id)
                               + w_carbon * norm(carbons, s.id)), 6) for s in eligible}
