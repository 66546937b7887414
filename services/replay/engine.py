"""The replay: a trace's jobs through the production policy, in virtual time. Deterministic: no clock, no
randomness; the same inputs give the same outcomes.

A discrete-event loop. Events are arrivals (a trace job is submitted), ends (a job's runtime is over), the
first hour of each month (budgets start again) and retries at an hour the policy named (a greener one, or
when the public capacity a job waits for was forecast to start it). The state is what the live services
keep: each site's GPUs and the jobs holding them (routing's reservations), each tenant's allocation and
monthly budget net of what ran and of what runs (billing's ledger and routing's commitments), and routing's
line of waiting jobs. A job is placed by `services/routing/policy.choose` (what routing's `place` runs), on
`SiteView`s built from that state, each with the jobs ahead in its line (the wait forecast runs them out); a
job that ended is rated by `services/billing/rating.rate`, as billing rates it, with the hour-by-hour carbon
of its site's zone. Simulated sites start a job the moment it is placed, as the live simulated backend does.

Live routing tries each waiting job again on a timer and when GPUs come back. Between events nothing
changes, so the replay asks the policy about a waiting job only when something that holds it back may have
changed: the policy says, site by site, what that is (`Choice.holds`, and `Choice.gate` for public capacity
first), and the job watches exactly that (GPUs coming back at a site, its tenant's budget, a site's overflow
share; the hour the public forecast gave, and every start at the public site, which may move it).
"""

from __future__ import annotations

import bisect
import gc
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial

from services.billing.rating import rate
from services.replay.traces import TraceJob
from services.routing.policy import (
    LINE_EXACT,
    Choice,
    Hold,
    Holding,
    SiteView,
    TenantBudget,
    choose,
    gpu_types,
    line_entry,
    permanent_reasons,
    residency_reason,
    worst_case_allocation_h,
    worst_case_cost,
)
from shared.carbon import CarbonProvider, site_intensity
from shared.contracts.catalog import Catalog, SiteEntry
from shared.contracts.jobs import JobSpec, Resources
from shared.queueing import Drained, End, Queued, holding

POLICIES = ("public-only", "cheapest", "continuum", "carbon", "carbon-shift")
# carbon-shift's slack: a job may end as late as its runtime again after its earliest end, a day at most (the
# traces have no deadlines; "Let's Wait Awhile" and GAIA use windows of this order)
SHIFT_SLACK_CAP_S = 24 * 3600.0
CHEAPEST = (0.0, 1.0, 0.0)  # time, cost, carbon: the cheapest eligible site, blind to carbon and to waiting
MAX_RUNTIME_S = 2_592_000  # a JobSpec's longest walltime (30 days): a trace job that ran longer is cut there

# at one instant: GPUs come back first, then waiting jobs are tried, then newcomers come
END, MONTH, RETRY, ARRIVE = 0, 1, 2, 3
GATE_MOVED = ("gate",)  # why a job is woken: its public forecast may have moved (Replay._try_gate)
ONLY_GPUS = frozenset({Hold.GPUS})  # a site held by its busy GPUs alone: the job stands in its line


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


@dataclass
class _Waiting:
    seq: int  # its place in line: arrival order
    job: TraceJob
    spec: JobSpec
    # why each site could never run it (policy.permanent_reasons): the same at every try
    permanent: dict[str, list[str]]
    ticket: int = 0  # which of its watches are current (older ones are left behind, and skipped when met)
    lines: tuple[str, ...] = ()  # the sites whose line it stands in
    # how it stands in a site's line (policy.line_entry; None: it cannot), by site: the same at every try
    entries: dict[str, Queued | None] = field(default_factory=dict)


class Replay:
    def __init__(self, catalog: Catalog, carbon: CarbonProvider, policy: str, start: datetime,
                 tenants: dict[str, str], gpu_type: str = "any") -> None:
        if policy not in POLICIES:
            raise ValueError(f"no policy {policy!r}; one of {', '.join(POLICIES)}")
        self.catalog, self.carbon, self.policy, self.start = catalog, carbon, policy, start.astimezone(UTC)
        self.tenants = tenants  # trace user -> catalog tenant
        self.gpu_type = gpu_type  # what every trace job asks for: a catalog GPU type, or any
        self.sites = sorted(catalog.sites.values(), key=lambda s: s.id)
        self.public_sites = [s for s in self.sites if s.public]
        self.public_ids = frozenset(s.id for s in self.public_sites)
        self._entry_views = {s.id: SiteView(entry=s, up=True) for s in self.sites}  # the entry alone (Replay._views)
        self.free: dict[str, dict[str, int]] = {s.id: dict(s.gpus.items()) for s in self.sites}
        self.running: dict[str, dict[str, _Run]] = {s.id: {} for s in self.sites}
        self.ledger = {t: _Tenant() for t in catalog.tenants}
        self.outcomes: dict[str, Outcome] = {}
        self.events: list[tuple[float, int, int, str]] = []
        self.jobs: dict[str, TraceJob] = {}
        self.specs: dict[str, JobSpec] = {}
        self.where: dict[str, str] = {}  # running job -> its site
        # routing's line: waiting jobs, and for each site the ones waiting for its GPUs, in line order
        self.waiting: dict[str, _Waiting] = {}
        self.line: dict[str, list[int]] = {s.id: [] for s in self.sites}  # seqs, in order
        self.line_entries: dict[str, list[Queued]] = {s.id: [] for s in self.sites}  # theirs, in the same order
        # their GPUs x walltimes, too (whole numbers: summed in any order, the same), and the sum of all
        self.line_gpu_s: dict[str, list[int]] = {s.id: [] for s in self.sites}
        self.line_gpu_s_all = dict.fromkeys(self.line, 0)
        self.line_types: dict[str, dict[str, int]] = {s.id: dict.fromkeys(s.gpus, 0) for s in self.sites}
        # watches: (busy GPUs or a full overflow share, site) -> GPUs needed -> heap of (seq, job, ticket);
        # tenant -> (euros, allocation hours) -> heap of (what the job needs at the least, seq, job, ticket), for
        # a spent budget
        self.watch: dict[tuple[Hold, str], dict[int, list[tuple[int, str, int]]]] = {}
        self.budget_watch: dict[str, dict[str, list[tuple[float, int, str, int]]]] = {
            t: {"eur": [], "hours": []} for t in catalog.tenants}
        # public site -> {job: ticket} held back by public capacity first, in that site's line; and the ones to
        # ask again because a job started there (ahead of them, the forecast did not count it)
        self.gate_watch: dict[str, dict[str, int]] = {s.id: {} for s in self.sites}
        self.gates_moved: list[tuple[str, int]] = []
        self.overflow_held: dict[str, dict[str, int]] = {s.id: dict.fromkeys(s.gpus, 0) for s in self.sites}
        self._seq = 0
        self._intensity: dict[int, dict[str, float]] = {}  # hour -> site -> gCO2eq/kWh
        self._permanents: dict[tuple[str, int, int], dict[str, list[str]]] = {}
        # each site's running jobs as the policy's holdings, their ends counted from the replay's start; as a
        # tuple, kept until a job starts or ends there
        self.held: dict[str, dict[str, Holding]] = {s.id: {} for s in self.sites}
        # and their ends, in order (as the run-out of a line starts from)
        self.ends: dict[str, list[End]] = {s.id: [] for s in self.sites}
        self._holdings: dict[str, tuple[Holding, ...]] = {}
        # each site's running jobs and the first jobs of its line run out, by how many (LINE_EXACT at most), kept
        # until one of them changes (at the clock they were run at, or while time moves: Drained.timeless)
        self._drained: dict[str, tuple[dict[int, tuple[float, Drained]], list[int]]] = {}
        self._rooms: dict[tuple[Hold, str], int] = {}
        self._budgets: dict[str, tuple[str, TenantBudget]] = {}  # tenant -> (month, what it has left then)
        # the last instant asked for (seconds -> datetime), and the sites' intensities at the last one viewed
        self._last_at = (math.nan, self.start)
        self._last_carbon: tuple[datetime | None, dict[str, float]] = (None, {})

    # --- the loop ---------------------------------------------------------------------------------------------

    def run(self, jobs: list[TraceJob], progress: Callable[[int], None] | None = None) -> list[Outcome]:
        # the loop makes millions of short-lived tuples, dicts and views, and no cycles worth collecting: the
        # collector runs rarely while it does (a twentieth of the time, else), and as it did once it is over
        thresholds = gc.get_threshold()
        gc.set_threshold(50_000, 20, 100)
        try:
            return self._run(jobs, progress)
        finally:
            gc.set_threshold(*thresholds)

    def _run(self, jobs: list[TraceJob], progress: Callable[[int], None] | None) -> list[Outcome]:
        jobs = [replace(j, runtime_s=MAX_RUNTIME_S) if j.runtime_s > MAX_RUNTIME_S else j for j in jobs]
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
            now, kind, ticket, job_id = heapq.heappop(self.events)
            if kind == ARRIVE:
                job = self.jobs[job_id]
                spec = self.specs[job_id] = self._spec(job, now)
                self._seq += 1
                self._try(_Waiting(self._seq, job, spec, self._permanent(spec)), now)
            elif kind == END:
                self._wake(now, self._end(job_id, now))
                done += 1
                if progress and done % 1000 == 0:
                    progress(done)
            elif kind == MONTH:  # budgets start again
                self._wake(now, [j for tenant in self.budget_watch for j in self._budget_woken(tenant, now)])
            elif kind == RETRY and (waiting := self.waiting.get(job_id)) and waiting.ticket == ticket:
                self._try(waiting, now)
            while self.gates_moved:
                moved, self.gates_moved = self.gates_moved, []
                self._wake(now, moved, GATE_MOVED)
        for waiting in self.waiting.values():  # the trace ended with these still waiting
            self.outcomes[waiting.job.job_id] = self._never(waiting.job, "still waiting when the replay ended")
        if progress:
            progress(done)
        return [self.outcomes[j.job_id] for j in jobs]

    def _push(self, at: float, kind: int, job_id: str, ticket: int = 0) -> None:
        # ties: by kind (GPUs come back before waiting jobs are tried, newcomers last), then in the order pushed
        self._seq += 1
        heapq.heappush(self.events, (at, kind, ticket if kind == RETRY else self._seq, job_id))

    def _wake(self, now: float, woken: list[tuple[str, int]], why: tuple = ()) -> None:
        """Try again, oldest first, the waiting jobs that watch what just changed (`woken`: (job, ticket) from
        the budget watches, or the public forecasts that may have moved: `why` GATE_MOVED), and those that wait
        for GPUs which are now free at a site, while they are. A job tried here and still waiting is not tried
        twice in one wake."""
        heads: list[tuple[int, str, int, tuple]] = []  # (seq, job, ticket, the watch it came from)
        for job_id, ticket in woken:
            if (w := self.waiting.get(job_id)) and w.ticket == ticket:
                heads.append((w.seq, job_id, ticket, why))
        tried: set[str] = set()
        for (hold, site_id), watches in list(self.watch.items()):
            room = self._room(hold, site_id)
            for need, watch in list(watches.items()):
                if not watch:
                    del watches[need]  # a job that watches the same again makes it anew
                elif room >= need:
                    self._next_head((hold, site_id, need), heads, tried)
            if not watches:
                del self.watch[(hold, site_id)]
        heapq.heapify(heads)
        while heads:
            _, job_id, ticket, key = heapq.heappop(heads)
            waiting = self.waiting.get(job_id)
            if waiting and waiting.ticket == ticket and job_id not in tried:
                tried.add(job_id)
                if key is GATE_MOVED:
                    self._try_gate(waiting, now)
                else:
                    self._try(waiting, now)
            if key and key is not GATE_MOVED:  # from a GPU or share watch: its next watcher, if there is room
                self._next_head(key, heads, tried)

    def _next_head(self, key: tuple[Hold, str, int], heads: list, tried: set[str]) -> None:
        """Move the oldest current watcher of a site's GPUs or overflow share onto `heads`, if there is room for
        as many GPUs as it needs (one tried already in this wake, and waiting again, keeps its place)."""
        hold, site, need = key
        watch = self.watch[(hold, site)][need]
        if self._room(hold, site) < need:
            return
        again = []
        while watch:
            seq, job_id, ticket = heapq.heappop(watch)
            if (w := self.waiting.get(job_id)) and w.ticket == ticket:
                if job_id in tried:
                    again.append((seq, job_id, ticket))
                    continue
                heapq.heappush(heads, (seq, job_id, ticket, key))
                break
        for entry in again:
            heapq.heappush(watch, entry)

    def _room(self, hold: Hold, site: str) -> int:
        """The most GPUs of one type free at the site (GPUS), or left in its overflow share (SHARE); kept until
        a job starts or ends there."""
        if (room := self._rooms.get((hold, site))) is None:
            if hold == Hold.GPUS:
                room = max(self.free[site].values(), default=0)
            else:
                entry = self.catalog.sites[site]
                room = max((int(entry.overflow_share * n) - self.overflow_held[site][t]
                            for t, n in entry.gpus.items()), default=0)
            self._rooms[(hold, site)] = room
        return room

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
        return JobSpec(tenant=tenant.id, name=job.job_id, command=["replay"],
                       walltime_s=max(1, math.ceil(job.runtime_s)),
                       resources=Resources(gpus=job.gpus, gpu_type=self.gpu_type), residency=tenant.residency, **extra)

    def _permanent(self, spec: JobSpec) -> dict[str, list[str]]:
        """Why each site could never run the job (policy.permanent_reasons). A replay's specs differ only by
        tenant, GPUs and walltime (and by a deadline, which no permanent reason reads): jobs alike share them."""
        key = (spec.tenant, spec.resources.total_gpus, spec.walltime_s)
        if (reasons := self._permanents.get(key)) is None:
            tenant = self.catalog.tenants[spec.tenant]
            reasons = self._permanents[key] = {site.id: permanent_reasons(spec, tenant, site) for site in self.sites}
        return reasons

    def _try(self, waiting: _Waiting, now: float) -> None:
        """Place the job now if the policy says where; else it waits, watching what holds it back."""
        job, spec = waiting.job, waiting.spec
        tenant = self.catalog.tenants[spec.tenant]
        at = self._at(now)
        choice = choose(spec, tenant, self._views(now, at, waiting), self._budget(spec.tenant, at), at,
                        forecast=self._intensity_at if self.policy == "carbon-shift" else None,
                        weights=CHEAPEST if self.policy == "cheapest" else None, permanent=waiting.permanent)
        if choice.impossible:
            self._leave_line(waiting)
            reasons = "; ".join(f"{site}: {why}" for site, whys in choice.reasons.items() for why in whys)
            self.outcomes[job.job_id] = self._never(job, reasons[:500])
        elif choice.site is not None:
            assert choice.gpu_type is not None  # a site is chosen with the GPU type the job takes there
            self._leave_line(waiting)
            self._start(job, spec, choice.site, choice.gpu_type, choice.overflow, now)
        else:
            self._wait(waiting, choice, now)

    def _try_gate(self, waiting: _Waiting, now: float) -> None:
        """Ask again a job held by public capacity first, whose public forecast may have moved: the public sites
        alone answer whether the gate still holds (one site of the demo's seven). While it does, the whole
        question would have the same answer (every paid site held by the gate, which the job neither watches
        nor stands in line for) and the job waits as it would; once it does not, the whole question is asked."""
        spec, at = waiting.spec, self._at(now)
        public = choose(spec, self.catalog.tenants[spec.tenant], self._views(now, at, waiting, self.public_sites),
                        self._budget(spec.tenant, at), at, permanent=waiting.permanent)
        if public.site is None and public.gate:
            self._wait(waiting, public, now)
        else:
            self._try(waiting, now)

    def _wait(self, waiting: _Waiting, choice: Choice, now: float) -> None:
        """Stand in line at the sites whose GPUs it waits for, and watch what holds it back everywhere."""
        job_id, spec = waiting.job.job_id, waiting.spec
        waiting.ticket = self._seq = self._seq + 1
        self.waiting[job_id] = waiting
        need, ticket = spec.resources.total_gpus, waiting.ticket
        # a job waiting for a greener hour waits for nothing else: it stands in no line and watches nothing
        held = choice.holds if choice.wait_until is None else {}
        lines = {site_id: entry for site_id, holds in held.items()
                 if holds == ONLY_GPUS and (entry := self._line_entry(waiting, site_id))}
        for site_id in waiting.lines:  # where it stays, it keeps its place (and the line its run-out)
            self.gate_watch[site_id].pop(job_id, None)
            if site_id not in lines:
                self._leave(site_id, waiting.seq)
        for site_id, entry in lines.items():
            if site_id not in waiting.lines:
                self._join(site_id, waiting.seq, entry)
        # a site takes the job once all that holds it back there has passed: the job watches one of those
        # things, and when that one passes it is asked again (and watches what still holds, if anything). The
        # one watched is the one least often changed: public capacity first (which holds every paid site at
        # once, rechecked on the forecast's timer below), the tenant's budget, a full overflow share, busy GPUs.
        for site_id, holds in held.items():
            if choice.gate and site_id not in self.public_ids:
                continue
            if Hold.BUDGET in holds:
                # the least it could cost there (or use of the allocation), of the GPU types it may take
                site = self.catalog.sites[site_id]
                kind, need_of = ("hours", worst_case_allocation_h) if site.public else ("eur", worst_case_cost)
                least = min(need_of(spec, site, t) for t in gpu_types(spec, site.gpus))
                heapq.heappush(self.budget_watch[spec.tenant][kind], (least, waiting.seq, job_id, ticket))
            else:
                watches = self.watch.setdefault((Hold.SHARE if Hold.SHARE in holds else Hold.GPUS, site_id), {})
                heapq.heappush(watches.setdefault(need, []), (waiting.seq, job_id, ticket))
        waiting.lines = tuple(lines)
        if choice.wait_until is not None:  # a greener hour is coming: the job asked to be tried then
            self._push((choice.wait_until - self.start).total_seconds(), RETRY, job_id, ticket)
        elif choice.gate:
            # public capacity first, and the forecast says when it starts the job. The forecast grows when a job
            # starts at the public site without being counted in it (one behind, fitting where this one did not):
            # the job is asked again then, and when its forecast start comes without it
            public = choice.public_waits.values()
            if public and min(public) >= 0:
                self._push(now + min(public) + 1, RETRY, job_id, ticket)
            for site_id in lines:
                if site_id in self.public_ids:
                    self.gate_watch[site_id][job_id] = ticket

    def _line_entry(self, waiting: _Waiting, site_id: str) -> Queued | None:
        if site_id not in waiting.entries:
            waiting.entries[site_id] = line_entry(waiting.spec, self.catalog.sites[site_id])
        return waiting.entries[site_id]

    def _leave_line(self, waiting: _Waiting) -> None:
        """It waits no more: out of every line."""
        job_id = waiting.job.job_id
        if self.waiting.pop(job_id, None) is None:
            return
        for site_id in waiting.lines:
            self._leave(site_id, waiting.seq)
            self.gate_watch[site_id].pop(job_id, None)
        waiting.lines = ()

    def _join(self, site_id: str, seq: int, entry: Queued) -> None:
        at = bisect.bisect_left(self.line[site_id], seq)
        self.line[site_id].insert(at, seq)
        if at < LINE_EXACT:
            self._drained.pop(site_id, None)
        self.line_entries[site_id].insert(at, entry)
        self.line_gpu_s[site_id].insert(at, gpu_s := entry[1] * int(entry[2]))
        self.line_gpu_s_all[site_id] += gpu_s
        self.line_types[site_id][entry[0]] += 1

    def _leave(self, site_id: str, seq: int) -> None:
        line = self.line[site_id]
        at = bisect.bisect_left(line, seq)
        del line[at]
        if at < LINE_EXACT:
            self._drained.pop(site_id, None)
        self.line_types[site_id][self.line_entries[site_id].pop(at)[0]] -= 1
        self.line_gpu_s_all[site_id] -= self.line_gpu_s[site_id].pop(at)

    def _start(self, job: TraceJob, spec: JobSpec, site_id: str, gpu_type: str, overflow: bool, now: float) -> None:
        site = self.catalog.sites[site_id]
        self.free[site_id][gpu_type] -= spec.resources.total_gpus
        run = _Run(job, spec, site_id, gpu_type, now, overflow,
                   0.0 if site.public else worst_case_cost(spec, site, gpu_type),
                   worst_case_allocation_h(spec, site, gpu_type) if site.public else 0.0)
        self.running[site_id][job.job_id] = run
        held = self.held[site_id][job.job_id] = Holding(gpu_type, spec.resources.total_gpus, now + spec.walltime_s,
                                                        overflow)
        bisect.insort(self.ends[site_id], (held.ends_in_s, held.gpu_type, held.gpus))
        self._site_changed(site_id)
        self.where[job.job_id] = site_id
        if overflow:
            self.overflow_held[site_id][gpu_type] += spec.resources.total_gpus
        # a start moves the public forecast of the jobs held by public capacity first (one it did not count, one
        # on another GPU type than it counted, the line's exact part moving on): their gate is looked at again
        self.gates_moved += self.gate_watch[site_id].items()
        ledger = self.ledger[spec.tenant]
        self._budgets.pop(spec.tenant, None)
        ledger.committed_eur += run.cost_eur
        ledger.committed_h += run.allocation_h
        self._push(now + job.runtime_s, END, job.job_id)

    def _end(self, job_id: str, now: float) -> list[tuple[str, int]]:
        """The job's GPUs come back and it is rated; the waiting jobs its end may free, as (job, ticket)."""
        job, spec = self.jobs[job_id], self.specs[job_id]
        site = self.catalog.sites[self.where.pop(job_id)]
        run = self.running[site.id].pop(job_id)
        held = self.held[site.id].pop(job_id)
        ends = self.ends[site.id]
        del ends[bisect.bisect_left(ends, (held.ends_in_s, held.gpu_type, held.gpus))]
        gpus = spec.resources.total_gpus
        self.free[site.id][run.gpu_type] += gpus
        if run.overflow:
            self.overflow_held[site.id][run.gpu_type] -= gpus
        self._site_changed(site.id)
        line = rate(site, job_id=job_id, tenant=spec.tenant, gpu_type=run.gpu_type, gpus=gpus,
                    started_at=self._at(run.start_s), ended_at=self._at(now), state="succeeded",
                    intensity=partial(self._intensity_at, site))
        ledger = self.ledger[spec.tenant]
        self._budgets.pop(spec.tenant, None)
        ledger.committed_eur -= run.cost_eur
        ledger.committed_h -= run.allocation_h
        ledger.allocation_used_h += line.allocation_hours
        month = _month(line.ended_at)
        ledger.spent_eur[month] = ledger.spent_eur.get(month, 0.0) + line.amount_eur
        tenant = self.catalog.tenants[spec.tenant]
        self.outcomes[job_id] = Outcome(
            job_id=job_id, tenant=spec.tenant, submit_s=job.submit_s, start_s=run.start_s, end_s=now, site=site.id,
            gpu_type=run.gpu_type, gpus=gpus, overflow=run.overflow, cost_eur=line.amount_eur,
            allocation_hours=line.allocation_hours, energy_kwh=line.energy_kwh, co2e_kg=line.co2e_kg,
            residency_ok=residency_reason(spec, tenant, site) is None)
        return self._budget_woken(spec.tenant, now)

    def _budget_woken(self, tenant: str, now: float) -> list[tuple[str, int]]:
        """The jobs held by the tenant's spent budget that its room now covers at one site at least."""
        room = self._budget(tenant, self._at(now))
        woken = []
        for kind, left in (("eur", room.budget_left_eur), ("hours", room.allocation_left_h)):
            heap = self.budget_watch[tenant][kind]
            while heap and heap[0][0] <= left:
                _, _, job_id, ticket = heapq.heappop(heap)
                woken.append((job_id, ticket))
        return woken

    def _never(self, job: TraceJob, reason: str) -> Outcome:
        return Outcome(job_id=job.job_id, tenant=self.tenants[job.user], submit_s=job.submit_s, start_s=None,
                       end_s=None, site=None, gpu_type=None, gpus=job.gpus, reason=reason)

    # --- what the policy sees -----------------------------------------------------------------------------------

    def _views(self, now: float, at: datetime, waiting: _Waiting,
               sites: list[SiteEntry] | None = None) -> list[SiteView]:
        """Every site (or those given) as the policy sees it now (`at`), for the waiting job: with the jobs ahead
        of it in line there. A site the job could never use is seen by its entry alone: the policy leaves such a
        site out of its work (`choose`: its state would only explain the decision, which the replay does not
        write out), and most of a trace's jobs have such sites (residency)."""
        if at != self._last_carbon[0]:
            self._last_carbon = (at, self._carbons(self._hour(at)))
        carbon = self._last_carbon[1]
        views = []
        seq = waiting.seq
        for site in self.sites if sites is None else sites:
            site_id = site.id
            if waiting.permanent[site_id]:
                views.append(self._entry_views[site_id])
                continue
            # the line ahead of it, run out when a wait needs it
            line = partial(self._line_ahead, site_id, now, bisect.bisect_left(self.line[site_id], seq))
            views.append(SiteView(entry=site, up=True, free=self.free[site_id], holdings=self._held(site_id),
                                  holdings_age_s=now, line=line, carbon_g_per_kwh=carbon[site_id],
                                  overflow_gpus=self.overflow_held[site_id]))
        return views

    def _line_ahead(self, site_id: str, now: float, ahead: int) -> tuple[Drained, dict[str, float]]:
        """The first `ahead` of the site's line as a wait starts from them (SiteView.line): the first LINE_EXACT
        run out, and the GPU-seconds of the rest by type."""
        backlog: dict[str, float] = {}
        if ahead > LINE_EXACT:
            types = [t for t, n in self.line_types[site_id].items() if n]
            if len(types) == 1:  # the usual line: of one type (a trace's jobs all ask alike)
                backlog[types[0]] = float(self._line_between(site_id, LINE_EXACT, ahead))
            else:
                for gpu_type, gpus, walltime in self.line_entries[site_id][LINE_EXACT:ahead]:
                    backlog[gpu_type] = backlog.get(gpu_type, 0.0) + gpus * walltime
        return self._line_drained(site_id, now, min(ahead, LINE_EXACT)), backlog

    def _line_between(self, site_id: str, first: int, end: int) -> int:
        """The GPU-seconds of the site's line from place `first` to `end` (not included): summed directly, or
        as what the rest leaves of the whole when that is shorter (a newcomer stands at the end of a long line)."""
        gpu_s = self.line_gpu_s[site_id]
        if end - first <= len(gpu_s) - end + first:
            return sum(gpu_s[first:end])
        return self.line_gpu_s_all[site_id] - sum(gpu_s[:first]) - sum(gpu_s[end:])

    def _held(self, site_id: str) -> tuple[Holding, ...]:
        if (held := self._holdings.get(site_id)) is None:
            held = self._holdings[site_id] = tuple(self.held[site_id].values())
        return held

    def _line_drained(self, site_id: str, now: float, ahead: int) -> Drained:
        """The site's running jobs and the first `ahead` of its line run out (at most LINE_EXACT: all that a job
        further back waits for, before the backlog). Kept until the site or the line's exact part changes, and
        while time moves if it does not depend on the clock; a longer part runs on from the longest kept."""
        # jobs ahead -> (the clock it was run at, the run-out); and the counts kept, in order
        kept, counts = self._drained.setdefault(site_id, ({}, []))
        if (hit := kept.get(ahead)) and (hit[0] == now or hit[1].timeless):
            return hit[1]
        entries = self.line_entries[site_id]
        drained = None
        at = bisect.bisect_left(counts, ahead)
        while drained is None and at:  # the longest shorter one that may be kept at this clock
            at -= 1
            clock, shorter = kept[counts[at]]
            if clock == now or shorter.timeless:
                drained = shorter.then(entries[counts[at]:ahead], now)
        if drained is None:
            drained = holding(self.free[site_id], self.ends[site_id], now).then(entries[:ahead], now)
        if ahead not in kept:
            bisect.insort(counts, ahead)
        kept[ahead] = (now, drained)
        return drained

    def _site_changed(self, site_id: str) -> None:
        """A job started or ended at the site: what was kept of its state is stale."""
        for kept in (self._holdings, self._drained):
            kept.pop(site_id, None)
        for hold in (Hold.GPUS, Hold.SHARE):
            self._rooms.pop((hold, site_id), None)

    def _budget(self, tenant_id: str, at: datetime) -> TenantBudget:
        """What the tenant has left in the month of `at`; kept until one of its jobs starts or ends."""
        month = _month(at)
        if (kept := self._budgets.get(tenant_id)) is None or kept[0] != month:
            tenant, ledger = self.catalog.tenants[tenant_id], self.ledger[tenant_id]
            kept = self._budgets[tenant_id] = (month, TenantBudget(
                allocation_left_h=tenant.allocation_gpu_hours - ledger.allocation_used_h - ledger.committed_h,
                budget_left_eur=tenant.monthly_budget_eur - ledger.spent_eur.get(month, 0.0) - ledger.committed_eur))
        return kept[1]

    def _at(self, seconds: float) -> datetime:
        """The instant, `seconds` after the replay's start (the last one asked kept: a wake asks it many times)."""
        if seconds != self._last_at[0]:
            self._last_at = (seconds, self.start + timedelta(seconds=seconds))
        return self._last_at[1]

    @staticmethod
    def _hour(at: datetime) -> int:
        return int(at.timestamp() // 3600)

    def _carbons(self, hour: int) -> dict[str, float]:
        """Every site's intensity in the hour (hours since the epoch; kept: a replay asks for the same ones many
        times)."""
        if (carbon := self._intensity.get(hour)) is None:
            when = datetime.fromtimestamp(hour * 3600, UTC)
            carbon = self._intensity[hour] = {site.id: site_intensity(site, when, self.carbon) for site in self.sites}
        return carbon

    def _intensity_at(self, site: SiteEntry, at: datetime) -> float:
        return self._carbons(self._hour(at))[site.id]


def _month(at: datetime) -> str:
    return f"{at.year:04d}-{at.month:02d}"  # as f"{at:%Y-%m}", at a fraction of the cost (asked at every question)


def replay(jobs: list[TraceJob], catalog: Catalog, carbon: CarbonProvider, policy: str, start: datetime,
           tenants: dict[str, str], progress: Callable[[int], None] | None = None,
           gpu_type: str = "any") -> list[Outcome]:
    """Every job's outcome under the policy, in the trace's order."""
    return Replay(catalog, carbon, policy, start, tenants, gpu_type).run(jobs, progress)
