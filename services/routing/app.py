"""routing: places each accepted job on a site under the policy, reserving its GPUs, and dispatches it.

A job that fits nowhere now is `queued` and its accepted (or requeued) event is handed back to JetStream
with a delay (shorter for higher priorities): it is tried again until it fits, and a routing replica that
dies while holding it loses nothing, since the event is redelivered to another.
"""

from __future__ import annotations

import math
import time
import uuid
from datetime import datetime

import orjson
import structlog
from faststream.exceptions import NackMessage
from nats.js.api import DeliverPolicy

from services.routing import reservations
from services.routing.reports import ReportGate
from services.routing.policy import (
    LINE_EXACT,
    Hold,
    Holding,
    SiteView,
    TenantBudget,
    departures,
    line_entry,
    place,
    retry_delay_s,
    worst_case_allocation_h,
    worst_case_cost,
)
from services.routing.reservations import Reservation
from shared import telemetry
from shared.bus import AFTER_HEADER, ATTEMPT_HEADER, Bus, KvMirror, create_app, create_bus
from shared.carbon import CarbonProvider, default_carbon, site_intensity
from shared.contracts.catalog import Catalog, SiteEntry
from shared.contracts.events import CloudEvent, make_event, utcnow
from shared.contracts.jobs import (
    Decision,
    Dispatch,
    JobRecord,
    JobSpec,
    JobState,
    StopJob,
    job_event_data,
)
from shared.contracts.sites import SiteStatus
from shared.registry import apply_event
from shared.settings import Settings

log = structlog.get_logger()
SERVICE = "routing"
_RELEASING = {JobState.succeeded, JobState.failed, JobState.cancelled, JobState.rejected}
# a waiting job refreshes its entry on the waiting board this often; an entry not refreshed for three
# times as long is ignored (its job is no longer being placed: dead-lettered, say)
WAITING_REFRESH_S = 60.0
class Router:
    def __init__(self, bus: Bus, catalog: Catalog, carbon: CarbonProvider) -> None:
        self.bus = bus
        self.catalog = catalog
        self.carbon = carbon  # the hourly data stands for the day-ahead forecast greener hours are chosen by
        # sites, reservations and metered budgets, kept in memory by watches: a placement reads no bucket
        self.mirrors: dict[str, KvMirror] = {}
        # one wake at a time in this process; releases meanwhile ask for one more round after it
        self.waking = False
        self.wake_again = False

    async def start(self) -> None:
        t = self.bus.topology
        for bucket in (t.sites_bucket, t.reservations_bucket, t.budgets_bucket, t.waiting_bucket):
            self.mirrors[bucket] = await KvMirror(await self.bus.kv(bucket)).start()
        # the consumers of each site's orders: made here, where the orders come from, for a site's principal
        # may only use them (docs/security.md)
        for site in self.catalog.sites:
            for durable, subject, config in t.site_orders(site):
                await self.bus.declare(t.dispatch_stream, durable, subject, config)

    async def stop(self) -> None:
        for mirror in self.mirrors.values():
            await mirror.stop()

    def _mirrored(self, bucket: str) -> dict[str, dict]:
        mirror = self.mirrors[bucket]
        return {key: value for key in self.catalog.sites if (value := mirror.get(key)[0]) is not None}

    def held(self) -> dict[str, dict]:
        return self._mirrored(self.bus.topology.reservations_bucket)

    async def views(self, held: dict[str, dict], need: int, give_back: tuple[str, Reservation] | None = None,
                    ahead: dict[str, list] | None = None) -> list[SiteView]:
        """Every site as the policy sees it, for a job that needs `need` GPUs, behind the jobs `ahead` of it in
        line at each site. Each job's holding (when its GPUs come back) is read only for the GPU types short of
        `need`, where the wait depends on it; elsewhere one holding a type stands for the GPUs overflow jobs
        hold, which is all the policy asks there."""
        ahead = ahead or {}
        backlog: dict[str, dict[str, float]] = {}
        for site_id, queued in ahead.items():  # beyond the jobs run out one by one: their GPU-seconds
            extra = backlog[site_id] = {}
            for gpu_type, gpus, walltime in queued[LINE_EXACT:]:
                extra[gpu_type] = extra.get(gpu_type, 0.0) + gpus * walltime
        statuses = self._mirrored(self.bus.topology.sites_bucket)
        now = time.time()
        views = []
        for site in self.catalog.sites.values():
            status, doc = statuses.get(site.id), held.get(site.id)
            free = reservations.free(doc, site.gpus)
            if give_back and give_back[0] == site.id:  # explain a placement as it was made: without its own GPUs
                free[give_back[1].gpu_type] = free.get(give_back[1].gpu_type, 0) + give_back[1].gpus
            short = {t for t, n in free.items() if n < need}
            holdings = reservations.holdings(doc, now, short) + tuple(
                Holding(t, n, 0.0, overflow=True) for t, n in reservations.overflow_held(doc).items()
                if n and t not in short)
            saturated = bool(status and status.get("saturated"))
            views.append(SiteView(entry=site, up=bool(status and status["state"] == "up"), free=free,
                                  carbon_g_per_kwh=status["carbon_g_per_kwh"] if status else 0.0,
                                  holdings=holdings,
                                  queued_at_site=status.get("queued", 0) if saturated else 0,
                                  reported_wait_s=status.get("est_wait_s_by_type", {}) if saturated else {},
                                  queue=tuple(ahead.get(site.id, ())[:LINE_EXACT]),
                                  backlog_gpu_s=backlog.get(site.id, {})))
        return views

    def line_ahead(self, job_id: str, priority: int) -> dict[str, list]:
        """For each site, the waiting jobs ahead of this one that wait for its GPUs, as its line (higher
        priorities first, then the longest waiting; the same order `_wake` tries them in)."""
        now = time.time()
        board = {k: e for k, (e, _) in self.mirrors[self.bus.topology.waiting_bucket].values.items()
                 if now - e["refreshed_at"] <= 3 * WAITING_REFRESH_S}
        mine = board.get(job_id)
        place_in_line = (-priority, mine["since"] if mine else now)
        lines: dict[str, list] = {}
        for other, entry in sorted(board.items(), key=lambda e: (-e[1]["priority"], e[1].get("since", 0))):
            if other == job_id or (-entry["priority"], entry.get("since", 0)) >= place_in_line:
                continue
            for site_id, queued in entry.get("line", {}).items():
                lines.setdefault(site_id, []).append(tuple(queued))
        return lines

    def forecast(self, site: SiteEntry, at: datetime) -> float:
        return site_intensity(site, at, self.carbon)

    async def budget(self, tenant_id: str, held: dict[str, dict]) -> TenantBudget:
        """The tenant's room: its allocation and monthly budget, less what billing metered and what its
        running jobs may still use (their worst case, until they end and are metered)."""
        tenant = self.catalog.tenants[tenant_id]
        metered = self.mirrors[self.bus.topology.budgets_bucket].get(tenant_id)[0] or {}
        this_month = metered.get("period") == utcnow().strftime("%Y-%m")
        spent = metered.get("spent_eur", 0.0) if this_month else 0.0
        # billing's limits include top-ups; a new month starts again from the catalog's budget
        budget_eur = metered.get("budget_eur", tenant.monthly_budget_eur) if this_month else tenant.monthly_budget_eur
        allocation_h = metered.get("allocation_h", tenant.allocation_gpu_hours)
        committed_eur = committed_h = 0.0
        for doc in held.values():
            eur, hours = reservations.committed(doc, tenant_id)
            committed_eur += eur
            committed_h += hours
        return TenantBudget(allocation_left_h=allocation_h - metered.get("allocation_used_h", 0.0) - committed_h,
                            budget_left_eur=budget_eur - spent - committed_eur)

    def holder(self, held: dict[str, dict], job_id: str, attempt: int | None = None) -> tuple[str, Reservation] | None:
        """The site whose GPUs the job holds (for this attempt, if given)."""
        for site_id, doc in held.items():
            r = reservations.job(doc, job_id)
            if r is not None and (attempt is None or r.attempt == attempt):
                return site_id, r
        return None

    async def place(self, event: CloudEvent, traceparent: str | None, tries: int = 1) -> None:
        # a job's first try: its accepted event is all the registry holds of it (intake writes it there with the
        # event), so the try needs no read; a cancel meanwhile is seen by the read after the reservation
        first = JobRecord.model_validate(apply_event(None, event, 0)) \
            if event.kind == JobState.accepted and tries == 1 else None
        await self.place_job(event.data["job_id"], event.data["tenant"], int(event.data.get("attempt", 0)),
                             traceparent, tries, known=first)

    async def wake(self) -> None:
        """GPUs came back: try waiting jobs now, rather than at their next retry. The releases of a fetch are
        handled at once, and each would try the same waiting jobs at the same time: a release during a wake
        asks for one more round after it instead."""
        if self.waking:
            self.wake_again = True
            return
        self.waking = True
        try:
            self.wake_again = True
            while self.wake_again:
                self.wake_again = False
                await self._wake()
        finally:
            self.waking = False

    async def _wake(self, limit: int = 8) -> None:
        """Waiting jobs, highest priority and longest waiting first. A job placed here finds itself placed when
        its own event comes back (the same placement, dispatched once: ids and reservations make it
        idempotent)."""
        now = time.time()
        board = [(job_id, entry) for job_id, (entry, _) in self.mirrors[self.bus.topology.waiting_bucket].values.items()
                 if now - entry["refreshed_at"] <= 3 * WAITING_REFRESH_S]
        for job_id, entry in sorted(board, key=lambda e: (-e[1]["priority"], e[1].get("since", 0)))[:limit]:
            current, _ = await self.bus.get_json(self.bus.topology.jobs_bucket, job_id)
            if not current or current["state"] != JobState.queued:
                continue
            try:
                await self.place_job(job_id, current["tenant"], current.get("attempt", 0), current.get("traceparent"),
                                     woken=True)
            except NackMessage:
                continue  # still no room for it
            except Exception as e:  # its own event retries it
                log.warning("wake.failed", job_id=job_id, reason=repr(e))

    async def place_job(self, job_id: str, tenant_id: str, attempt: int, traceparent: str | None,
                        tries: int = 1, woken: bool = False, known: JobRecord | None = None) -> None:
        """Place the job (or find it a reason to wait) in a span of its trace: what this try decided, and why."""
        with telemetry.job_span(telemetry.SpanName.PLACE, traceparent, job_id, tenant_id,
                                **{telemetry.Attr.ATTEMPT: attempt, telemetry.Attr.TRIES: tries}) as span:
            # a job that waits may be placed by its own event and, woken, by a release at the same time
            contended = woken or self.mirrors[self.bus.topology.waiting_bucket].get(job_id)[0] is not None
            await self._place_job(job_id, tenant_id, attempt, tries, contended, span, known)

    async def _place_job(self, job_id: str, tenant_id: str, attempt: int, tries: int, contended: bool,
                         span, known: JobRecord | None) -> None:
        record = known
        if record is None:
            current, _ = await self.bus.get_json(self.bus.topology.jobs_bucket, job_id)
            record = JobRecord.model_validate(current) if current else None
        if record is None:
            raise LookupError(f"job {job_id} is not in the registry yet")
        if record.state.terminal:
            span.set_attribute(telemetry.Attr.OUTCOME, f"already {record.state.value}")
            await self.release(job_id)  # cancelled while waiting: nothing to place
            await self.leave_line(job_id)
            return
        if record.attempt > attempt or record.spec is None:
            span.set_attribute(telemetry.Attr.OUTCOME, "superseded")
            return  # a newer attempt owns the job now
        if record.attempt < attempt:  # the sites it left must be known before it is placed again
            raise LookupError(f"the registry has not seen attempt {attempt} of job {job_id} yet")
        spec: JobSpec = record.spec
        tenant = self.catalog.tenants[tenant_id]
        left = departures(record.history, utcnow())
        if left.give_up:
            span.set_attribute(telemetry.Attr.OUTCOME, JobState.failed.value)
            await self.publish(record, JobState.failed, attempt, reasons=record.reasons, reason=left.give_up)
            return
        need = spec.resources.total_gpus

        # Two tries may place the same attempt at once: a waiting job woken by a release and its own event, or
        # a message whose ack wait ran out. Where that may be, a try first looks whether the stream has this
        # attempt's placement (the try that made it may have run and freed the job's GPUs since; the GPUs a
        # losing try held a moment are not the job's): that one stands.
        if (contended or tries > 1) and (winner := await self.placed_by_another(record, attempt)):
            span.set_attribute(telemetry.Attr.OUTCOME, f"placed by another try at {winner['site']}")
            if int(winner.get("attempt", 0)) == attempt:  # its order may not be out yet: JetStream drops a copy
                await self.send_order(record, spec, winner["site"], winner["gpu_type"], attempt)
            await self.leave_line(job_id)
            return
        held = self.held()
        holding = self.holder(held, job_id, attempt)
        if holding is not None:
            # reserved by a try at this attempt that crashed before announcing it, or that is still at work (a
            # woken try and the job's own event): announce that placement, explained again. The stream keeps
            # the first announcement; if another try's came first, only its order goes out, for the job may
            # hold GPUs at two sites a moment (the other try's give its own back)
            site_id, r = holding
            span.set_attribute(telemetry.Attr.OUTCOME, f"already {record.state.value}")
            if record.state not in (JobState.dispatched, JobState.started):
                decision = place(spec, tenant, await self.views(held, need, give_back=holding),
                                 await self.budget(tenant_id, held), utcnow(), left.avoid, left.refused)
                decision = decision.model_copy(update={"site": site_id, "gpu_type": r.gpu_type, "overflow": r.overflow})
                if not await self.dispatch(record, spec, decision, attempt, span, r.token):
                    await self.follow_winner(record, spec, attempt, span, site_id, r.token)
            await self.leave_line(job_id)
            return

        token = uuid.uuid4().hex
        ahead = self.line_ahead(job_id, spec.priority)
        while True:
            views = await self.views(held, need, ahead=ahead)
            room = await self.budget(tenant_id, held)
            decision = place(spec, tenant, views, room, utcnow(), left.avoid, left.refused, forecast=self.forecast)
            if decision.impossible and left.refused:  # it was tried, and every site that could run it said no
                _trace_decision(span, decision, JobState.failed)
                await self.publish(record, JobState.failed, attempt, decision=decision, reasons=decision.reasons,
                                   reason="refused by every site that could run it: "
                                          + "; ".join(f"{site}: {words}" for site, words in left.refused.items()))
                log.info("job.refused_everywhere", job_id=job_id, tenant=tenant_id)
                return
            if decision.impossible:
                _trace_decision(span, decision, JobState.rejected)
                await self.publish(record, JobState.rejected, attempt, decision=decision,
                                   reasons=decision.reasons, reason="no site in the catalog can ever run this job")
                log.info("job.impossible", job_id=job_id, tenant=tenant_id)
                return
            if decision.site is not None:
                ahead = await self.outranked_by(spec, decision.site, views, held)
                if ahead:
                    reason = f"{decision.site}: yields to job {ahead} of higher priority, waiting for it"
                    decision = decision.model_copy(update={"site": None, "gpu_type": None, "overflow": False})
                    decision.candidates = [c.model_copy(update={"eligible": False, "reasons": [*c.reasons, reason]})
                                           if c.eligible else c for c in decision.candidates]
            if decision.site is None:
                _trace_decision(span, decision, JobState.queued)
                if record.state != JobState.queued:
                    await self.publish(record, JobState.queued, attempt, decision=decision,
                                       reasons=decision.reasons)
                await self.wait_in_line(job_id, spec, decision)
                delay = retry_delay_s(self.bus.settings.placement_retry_s, spec.priority, tries)
                if decision.wait_until is not None:  # a greener hour: tried again then, not before
                    delay = max(delay, (decision.wait_until - utcnow()).total_seconds())
                raise NackMessage(delay=delay)
            site = self.catalog.site(decision.site)
            reservation = Reservation(
                tenant=tenant_id, gpu_type=decision.gpu_type, gpus=spec.resources.total_gpus, attempt=attempt,
                overflow=decision.overflow, placed_at=time.time(), walltime_s=spec.walltime_s,
                cost_eur=0.0 if site.public else worst_case_cost(spec, site, decision.gpu_type),
                allocation_h=worst_case_allocation_h(spec, site, decision.gpu_type) if site.public else 0.0,
                token=token)
            holding_token = token

            # the most the tenant's jobs at this site may commit, this one included: the room the decision saw,
            # so that tries placing the same tenant's jobs at once cannot each spend it (checked in the write)
            seen_eur, seen_h = reservations.committed(held.get(site.id), tenant_id)
            limit = (room.budget_left_eur + seen_eur, room.allocation_left_h + seen_h)

            def hold(doc: dict | None) -> dict | None:
                nonlocal holding_token
                new = reservations.reserve(doc, job_id, reservation, site.gpus, limit, site.overflow_share)
                # None: the job holds GPUs here for this attempt already (another try's): this try uses them
                holding_token = token if new is not None else reservations.job(doc, job_id).token
                return new
            try:
                await self.bus.update_json(self.bus.topology.reservations_bucket, site.id, hold,
                                           self.mirrors[self.bus.topology.reservations_bucket])
            except reservations.NoCapacity:
                held = self.held()  # another replica took those GPUs first: decide again
                continue
            latest, _ = await self.bus.get_json(self.bus.topology.jobs_bucket, job_id)
            if latest and JobState(latest["state"]).terminal:  # cancelled while we placed it
                await self.release(job_id)
                await self.leave_line(job_id)
                return
            # if two tries got this far, the stream decides: the first `placed` event it stores (the id is the
            # job's and the attempt's) wins, and the other try gives back what it reserved, unless the winner
            # uses those very GPUs
            if await self.dispatch(record, spec, decision, attempt, span, holding_token):
                await self.leave_line(job_id)
                return
            await self.follow_winner(record, spec, attempt, span, site.id, token)
            return

    async def follow_winner(self, record: JobRecord, spec: JobSpec, attempt: int, span, site_id: str,
                            token: str) -> None:
        """Another try's `placed` event for this attempt came first, and it stands: the reservation made with
        `token` at the site goes back unless the winner uses it, and the winner's order goes out (again, if
        the winner sent it: one id, JetStream keeps one)."""
        winner = await self.placed_by_another(record, attempt) or {}
        span.set_attribute(telemetry.Attr.OUTCOME, f"placed by another try at {winner.get('site')}")
        if winner.get("reservation") != token:
            await self.bus.update_json(self.bus.topology.reservations_bucket, site_id,
                                       lambda doc: reservations.release(doc, record.job_id, token=token))
        if int(winner.get("attempt", 0)) == attempt:
            await self.send_order(record, spec, winner["site"], winner["gpu_type"], attempt)

    async def wait_in_line(self, job_id: str, spec: JobSpec, decision: Decision) -> None:
        """Put the job on the waiting board (or refresh it there), with what a lower priority must check and
        its place in the line of each site whose GPUs (and nothing else) it waits for."""
        entry = self.mirrors[self.bus.topology.waiting_bucket].get(job_id)[0]
        if entry is None or time.time() - entry["refreshed_at"] > WAITING_REFRESH_S:
            line = {site_id: queued for site_id, holds in decision.holds.items()
                    if holds == {Hold.GPUS} and (queued := line_entry(spec, self.catalog.site(site_id)))}
            kv = await self.bus.kv(self.bus.topology.waiting_bucket)
            await kv.put(job_id, orjson.dumps({"priority": spec.priority, "refreshed_at": time.time(),
                                               "since": entry["since"] if entry else time.time(),
                                               "spec": spec.model_dump(mode="json"), "line": line}))

    async def leave_line(self, job_id: str) -> None:
        if self.mirrors[self.bus.topology.waiting_bucket].get(job_id)[0] is not None:
            kv = await self.bus.kv(self.bus.topology.waiting_bucket)
            await kv.delete(job_id)

    async def outranked_by(self, spec: JobSpec, site_id: str, views: list[SiteView], held: dict) -> str | None:
        """A waiting job of higher priority that the policy would place on the same site now, if any: this job
        lets it go first, so that freed GPUs go to higher priorities."""
        now = time.time()
        for job_id, (entry, _) in list(self.mirrors[self.bus.topology.waiting_bucket].values.items()):
            if entry["priority"] <= spec.priority or now - entry["refreshed_at"] > 3 * WAITING_REFRESH_S:
                continue
            other = JobSpec.model_validate(entry["spec"])
            theirs = place(other, self.catalog.tenants[other.tenant], views, await self.budget(other.tenant, held))
            if theirs.site != site_id:
                continue
            record, _ = await self.bus.get_json(self.bus.topology.jobs_bucket, job_id)
            if record and record["state"] in (JobState.accepted, JobState.queued, JobState.requeued):
                return job_id
            # an entry left behind by a job placed or ended meanwhile (another replica's write crossed ours)
            kv = await self.bus.kv(self.bus.topology.waiting_bucket)
            await kv.delete(job_id)
        return None

    async def placed_by_another(self, record: JobRecord, attempt: int) -> dict | None:
        """This attempt's `placed` event data if the event stream has it already (another try made it)."""
        data = await self.bus.last_job_event(record.tenant, record.job_id, JobState.placed.value)
        return data if data and int(data.get("attempt", 0)) >= attempt else None

    async def dispatch(self, record: JobRecord, spec: JobSpec, decision: Decision, attempt: int, span,
                       reservation: str) -> bool:
        """Announce the placement (with the token of the reservation it uses) and send the site its order.
        False if the stream had this attempt's `placed` event already (another try placed it first): the
        order is not this try's to send, since the two may have chosen different sites."""
        _trace_decision(span, decision, JobState.placed)
        ack = await self.publish(record, JobState.placed, attempt, site=decision.site, gpu_type=decision.gpu_type,
                                 overflow=decision.overflow, reservation=reservation, decision=decision)
        if ack is not None and ack.duplicate:
            return False
        await self.send_order(record, spec, decision.site, decision.gpu_type, attempt)
        entered = next((h.time for h in reversed(record.history)
                        if h.state in (JobState.accepted, JobState.requeued)), None)
        if entered is not None:
            telemetry.placement_latency.record((utcnow() - entered).total_seconds(),
                                               {"site": decision.site, "overflow": decision.overflow})
        if decision.overflow:
            telemetry.overflow_jobs.add(1, {"site": decision.site, "tenant": record.tenant})
        log.info("job.placed", job_id=record.job_id, tenant=record.tenant, site=decision.site,
                 gpu_type=decision.gpu_type, overflow=decision.overflow)
        return True

    async def send_order(self, record: JobRecord, spec: JobSpec, site_id: str, gpu_type: str, attempt: int) -> None:
        order = Dispatch(job_id=record.job_id, tenant=record.tenant, site=site_id, gpu_type=gpu_type, attempt=attempt,
                         spec=spec)
        await self.bus.publish_command(self.bus.subjects.dispatch(site_id), order,
                                       msg_id=f"{record.job_id}.dispatch.{attempt}")

    async def publish(self, record: JobRecord, state: JobState, attempt: int, decision: Decision | None = None,
                      **data):
        """A job event, in the trace of the placement span in progress; JetStream's ack (`duplicate` if the
        stream had this event already)."""
        body = job_event_data(record.job_id, record.tenant, state, attempt=attempt,
                              decision=decision.model_dump(mode="json") if decision else None, **data)
        event = make_event(SERVICE, "job", state.value, record.job_id, body, record.job_id, attempt)
        return await self.bus.publish_event(self.bus.subjects.job_event(record.tenant, record.job_id, state.value),
                                            event)

    async def release(self, job_id: str, before_attempt: int | None = None, until_metered: bool = False) -> None:
        """Free the job's GPUs wherever it holds some (a try that lost a race and stopped before giving its own
        back leaves a second site); with `until_metered`, its cost stays committed until billing meters it."""
        await self.change_where(job_id, reservations.holds, lambda doc: reservations.release(
            doc, job_id, before_attempt, until_metered=until_metered))

    async def metered(self, job_id: str) -> None:
        """Billing metered the job: its cost is spent, no longer committed."""
        await self.change_where(job_id, lambda doc, j: reservations.holds(doc, j) or reservations.unmetered(doc, j),
                                lambda doc: reservations.metered(doc, job_id))

    async def change_where(self, job_id: str, concerns, change) -> None:
        """Change every site document that concerns the job. The mirror says which, unless it has not seen the
        job there yet (a job that ended at once): then the bucket itself."""
        bucket = self.bus.topology.reservations_bucket
        docs = {site_id: doc for site_id, doc in self.held().items() if concerns(doc, job_id)}
        if not docs:
            docs = await self.bus.get_many(bucket, self.catalog.sites)
        for site_id, doc in docs.items():
            if concerns(doc, job_id):
                await self.bus.update_json(bucket, site_id, change, self.mirrors[bucket])

    # Outages: a site that went down, or whose agent restarted, gives back the jobs it holds

    async def site_down(self, site_id: str, down_since: datetime, first_look: bool) -> None:
        """Requeue the jobs of a site that went down: those that had not started at once, those running
        there once the grace period is over (unless the site came back first: then `site_up` decides)."""
        status, _ = await self.bus.get_json(self.bus.topology.sites_bucket, site_id)  # not the mirror: it may lag
        if status and status["state"] == "up" and datetime.fromisoformat(status["last_seen"]) > down_since:
            return
        grace = self.bus.settings.lost_job_grace_s
        waited = (utcnow() - down_since).total_seconds()
        # one more look soon in any case: a placement decided just before the site went down may land after
        look_again = 1.0 if first_look else None
        for record, _ in await self.jobs_at(site_id):
            if record.state in (JobState.placed, JobState.dispatched):
                await self.requeue(record, site_id, f"site {site_id} went down before the job started there")
            elif record.state == JobState.started and waited >= grace:
                await self.requeue(record, site_id, f"site {site_id} has been down for {waited:.0f} s "
                                                    f"(grace {grace:.0f} s) while the job ran there")
            elif record.state == JobState.started:
                look_again = min(look_again or math.inf, grace - waited)
            else:  # being placed there right now: look again once its placement is recorded
                look_again = min(look_again or math.inf, 1.0)
        if look_again is not None:
            raise NackMessage(delay=look_again)

    async def site_up(self, site_id: str, since: datetime | None, present: set[str]) -> None:
        """A site reports again: the jobs it was given before its agent (re)started and that it does not report
        having are gone with the old agent (the new one skips their dispatches): place them again."""
        if since is None:
            return
        for record, entered in await self.jobs_at(site_id):
            if record.state in (JobState.dispatched, JobState.started) and entered < since \
                    and record.job_id not in present:
                await self.requeue(record, site_id, f"site {site_id}'s agent restarted and lost the job")

    async def jobs_at(self, site_id: str) -> list[tuple[JobRecord, datetime]]:
        """The jobs whose current attempt holds GPUs at the site, with when they entered their state."""
        held = await self.bus.get_many(self.bus.topology.reservations_bucket, [site_id])
        found = []
        for job_id, r in reservations.jobs(held.get(site_id)).items():
            current, _ = await self.bus.get_json(self.bus.topology.jobs_bucket, job_id)
            if not current:
                continue
            record = JobRecord.model_validate(current)
            if record.state.terminal or record.attempt != r.attempt:
                continue  # its GPUs are on their way back
            entered = next((h.time for h in reversed(record.history) if h.state == record.state), utcnow())
            found.append((record, entered))
        return found

    async def requeue(self, record: JobRecord, site_id: str, reason: str) -> None:
        """Back to placement, elsewhere. The site is told first to stop the run without a report if it still
        has it (so that a crash in between cannot leave it running there)."""
        with telemetry.job_span(telemetry.SpanName.REQUEUE, record.traceparent, record.job_id, record.tenant,
                                **{telemetry.Attr.SITE: site_id, telemetry.Attr.REASON: reason}):
            await self._requeue(record, site_id, reason)

    async def _requeue(self, record: JobRecord, site_id: str, reason: str) -> None:
        await self.bus.publish_command(self.bus.subjects.stop(site_id),
                                       StopJob(job_id=record.job_id, reason=reason, superseded=True,
                                               attempt=record.attempt),
                                       msg_id=f"{record.job_id}.superseded.{record.attempt}")
        # the id is the attempt being left, as an agent's requeue has: one event whoever sends it
        event = make_event(SERVICE, "job", JobState.requeued.value, record.job_id, job_event_data(
            record.job_id, record.tenant, JobState.requeued, site_id, attempt=record.attempt + 1, reason=reason),
            record.job_id, record.attempt)
        await self.bus.publish_event(self.bus.subjects.job_event(record.tenant, record.job_id, "requeued"), event)
        log.warning("job.requeued", job_id=record.job_id, tenant=record.tenant, site=site_id, reason=reason)

    async def overflow(self) -> dict:
        """Overflow placed so far, per site and per tenant, and the GPUs overflow jobs hold now."""
        by_site, by_tenant = {}, {}
        for site_id, doc in self.held().items():
            counts = reservations.overflow_placed(doc)
            now = sum(r.gpus for r in reservations.jobs(doc).values() if r.overflow)
            by_site[site_id] = {"jobs": sum(counts.values()), "by_tenant": counts, "gpus_now": now}
            for tenant, n in counts.items():
                by_tenant[tenant] = by_tenant.get(tenant, 0) + n
        return {"sites": by_site, "tenants": by_tenant}


def _trace_decision(span, decision: Decision, outcome: JobState) -> None:
    """The placement's span says what was decided and why: how many sites could take the job, and the chosen
    one's score and its parts."""
    span.set_attribute(telemetry.Attr.OUTCOME, outcome.value)
    span.set_attribute(telemetry.Attr.CANDIDATES, len(decision.candidates))
    span.set_attribute(telemetry.Attr.ELIGIBLE, sum(c.eligible for c in decision.candidates))
    if decision.reasons:
        span.set_attribute(telemetry.Attr.REASON, "; ".join(decision.reasons)[:1000])
    if decision.site is None:
        return
    span.set_attribute(telemetry.Attr.SITE, decision.site)
    span.set_attribute(telemetry.Attr.GPU_TYPE, decision.gpu_type)
    span.set_attribute(telemetry.Attr.OVERFLOW, decision.overflow)
    chosen = next((c for c in decision.candidates if c.site == decision.site), None)
    if chosen is not None and chosen.score is not None:
        span.set_attribute(telemetry.Attr.SCORE, chosen.score)
        for attr, part in ((telemetry.Attr.WAIT_S, "wait_s"), (telemetry.Attr.COST_EUR, "cost_eur"),
                           (telemetry.Attr.CO2E_KG, "co2e_kg")):
            if (value := chosen.parts.get(part)) is not None:
                span.set_attribute(attr, value)


def create_routing_app(settings: Settings):
    bus = create_bus(settings, SERVICE)
    router = Router(bus, Catalog.load(settings.sites_file, settings.tenants_file), default_carbon())
    gate = ReportGate(bus)
    subjects, topology = bus.subjects, bus.topology
    bus.document_events(subjects.job_event(kind="placed"), "A job was placed; data.decision explains why there.")
    bus.document_events(subjects.job_event(kind="queued"), "A job waits; data.reasons and data.decision say why.")
    bus.document_events(subjects.job_event(kind="rejected"), "No site in the catalog can ever run the job.")
    async def place(event: CloudEvent) -> None:
        await router.place(event, bus.traceparent(), bus.message().metadata.num_delivered)

    for kind in (JobState.accepted, JobState.requeued):
        # waiting jobs stay unacknowledged while they wait: allow many of them; JetStream counts their rounds
        # as deliveries, so the dead-letter count would drop a job that waited long on its first hiccup
        bus.consumer(subjects.job_event(kind=kind.value), topology.events_stream, kind.value, dead_letter=False,
                     max_ack_pending=100_000)(place)

    async def release(event: CloudEvent) -> None:
        """A job that ended, was cancelled or goes back to placement frees the GPUs it held."""
        if event.kind == JobState.requeued:
            await router.release(event.data["job_id"], before_attempt=int(event.data.get("attempt", 0)))
        else:  # a run that started is metered: until then its cost stays committed
            await router.release(event.data["job_id"], until_metered=bool(event.data.get("started_at")))
            await router.leave_line(event.data["job_id"])
        await router.wake()

    # a report waiting for the one before it counts its rounds as deliveries: never dead-lettered for that
    # (one that fails the check is, at once: Unacceptable)
    @bus.consumer(subjects.report(), topology.reports_stream, "reports", batch=128, dead_letter=False)
    async def vouch(event: CloudEvent) -> None:
        """A site's report on a job: the job's event once routing has checked the job was dispatched there."""
        msg = bus.message()
        headers = msg.headers or {}
        await gate.vouch(msg.subject, event, int(headers.get(ATTEMPT_HEADER, -1)), headers.get(AFTER_HEADER),
                           msg.metadata.num_delivered)

    @bus.consumer(subjects.billing_event(kind="usage"), topology.events_stream, "metered", batch=128)
    async def metered(event: CloudEvent) -> None:
        await router.metered(event.data["job_id"])

    for kind in (*sorted(_RELEASING), JobState.requeued):  # only these: most of a job's events concern it not
        bus.consumer(subjects.job_event(kind=kind.value), topology.events_stream, f"release-{kind.value}",
                     batch=128)(release)

    # outages are acted on as they happen: a routing service deployed later does not replay old ones
    # its waits for a grace period count as deliveries too: never dead-lettered
    @bus.consumer(subjects.site_event(kind="down"), topology.events_stream, "site-down", batch=8, dead_letter=False,
                  deliver_policy=DeliverPolicy.NEW)
    async def site_down(event: CloudEvent) -> None:
        status = SiteStatus.model_validate(event.data)
        first_look = bus.message().metadata.num_delivered == 1
        await router.site_down(status.site_id, status.down_since or event.time, first_look=first_look)

    @bus.consumer(subjects.site_event(kind="up"), topology.events_stream, "site-up", batch=8,
                  deliver_policy=DeliverPolicy.NEW)
    async def site_up(event: CloudEvent) -> None:
        status = SiteStatus.model_validate(event.data)
        await router.site_up(status.site_id, status.since, set(status.jobs))

    @bus.responder(subjects.routing_overflow, "routing.overflow")
    async def overflow() -> dict:
        """Overflow from public to paid capacity, per site and per tenant."""
        return await router.overflow()

    telemetry.observe(telemetry.JOBS_WAITING, "Jobs waiting for capacity (the waiting board)", "{job}",
                      lambda: [(len(router.mirrors[topology.waiting_bucket].values), {})]
                      if topology.waiting_bucket in router.mirrors else [])
    return create_app(bus, on_startup=(router.start,), on_shutdown=(router.stop,))
