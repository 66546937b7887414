"""Placement: a job's try to be placed. It asks the policy where the job should run (or why it waits, or why it
never can), reserves its GPUs there by compare-and-set, announces the placement and sends the site its order.

A job that fits nowhere now is `queued`, joins the waiting line, and its accepted (or requeued) event is handed
back to JetStream with a delay (`NackMessage`): it is tried again until it fits, and a routing replica that
dies while holding it loses nothing, since the event is redelivered to another. GPUs that come back wake the
waiting jobs at once, in line order.

Two tries may place the same attempt of a job at once (a waiting job woken by a release and its own event, or
a message whose ack wait ran out): the event stream decides, for it keeps the first `placed` event of an
attempt (its id is the job's and the attempt's), and the other try gives back what it reserved.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import NoReturn

import structlog
from faststream.exceptions import NackMessage

from services.routing import SERVICE, reservations
from services.routing.inputs import site_views, tenant_budget
from services.routing.line import WaitingLine
from services.routing.policy import (
    Departures,
    Hold,
    SiteView,
    TenantBudget,
    departures,
    place,
    retry_delay_s,
    worst_case_allocation_h,
    worst_case_cost,
)
from services.routing.reservations import NoCapacity, Reservation
from services.routing.store import ReservationStore
from shared import telemetry
from shared.carbon import CarbonProvider, site_intensity
from shared.contracts.catalog import Catalog, SiteEntry
from shared.contracts.events import utcnow
from shared.contracts.jobs import Decision, Dispatch, JobEvent, JobEventData, JobRecord, JobSpec, JobState
from shared.contracts.subjects import Subjects
from shared.registry import apply_event
from shared.stores import Documents, EventLog

log = structlog.get_logger()
WAKE_LIMIT = 8  # waiting jobs tried at each release: the first in line


class Placement:
    def __init__(self, catalog: Catalog, carbon: CarbonProvider, store: ReservationStore, line: WaitingLine,
                 sites: Documents, budgets: Documents, jobs: Documents, events: EventLog, subjects: Subjects,
                 retry_s: float, clock: Callable[[], datetime] = utcnow) -> None:
        self.catalog = catalog
        self.carbon = carbon  # the hourly data stands for the day-ahead forecast greener hours are chosen by
        self.store, self.line = store, line
        self.sites, self.budgets, self.jobs = sites, budgets, jobs  # statuses and metered budgets: local copies
        self.events, self.subjects = events, subjects
        self.retry_s = retry_s
        self.clock = clock
        # one wake at a time in this process; releases meanwhile ask for one more round after it
        self.waking = False
        self.wake_again = False

    # What the policy is given

    def views(self, held: dict[str, dict], need: int, give_back: tuple[str, Reservation] | None = None,
              ahead: dict[str, list] | None = None) -> list[SiteView]:
        statuses = {site_id: s for site_id in self.catalog.sites if (s := self.sites.cached(site_id)) is not None}
        return site_views(self.catalog, statuses, held, need, self.clock().timestamp(), give_back, ahead)

    def budget(self, tenant_id: str, held: dict[str, dict]) -> TenantBudget:
        return tenant_budget(self.catalog.tenants[tenant_id], self.budgets.cached(tenant_id), held, self.clock())

    def forecast(self, site: SiteEntry, at: datetime) -> float:
        return site_intensity(site, at, self.carbon)

    # A try

    async def place(self, event: JobEvent, traceparent: str | None, tries: int = 1) -> None:
        """A try at the job of an accepted or requeued event (its `tries`-th delivery)."""
        # a job's first try: its accepted event is all the registry holds of it (intake writes it there with the
        # event), so the try needs no read; a cancel meanwhile is seen by the read after the reservation
        first = JobRecord.model_validate(apply_event(None, event, 0)) \
            if event.kind == JobState.accepted and tries == 1 else None
        await self.place_job(event.data.job_id, event.data.tenant, event.data.attempt, traceparent, tries,
                             known=first)

    async def place_job(self, job_id: str, tenant_id: str, attempt: int, traceparent: str | None,
                        tries: int = 1, woken: bool = False, known: JobRecord | None = None) -> None:
        """Place the job (or find it a reason to wait) in a span of its trace: what this try decided, and why."""
        with telemetry.job_span(telemetry.SpanName.PLACE, traceparent, job_id, tenant_id,
                                **{telemetry.Attr.ATTEMPT: attempt, telemetry.Attr.TRIES: tries}) as span:
            # a try may race another at this attempt: a waiting job's own event and a release that wakes it, or a
            # redelivery after the ack wait ran out
            contended = woken or tries > 1 or self.line.waits(job_id)
            record = known or await self._record(job_id)
            if (spec := await self._to_place(record, attempt, span)) is None:
                return
            left = departures(record.history, self.clock())
            if left.give_up:
                span.set_attribute(telemetry.Attr.OUTCOME, JobState.failed.value)
                await self.publish(record, JobState.failed, attempt, reasons=record.reasons, reason=left.give_up)
            elif contended and (winner := await self.placed_by_another(record, attempt)):
                # the try that made it may have run and freed the job's GPUs since (the GPUs a losing try held a
                # moment are not the job's): that placement stands
                span.set_attribute(telemetry.Attr.OUTCOME, f"placed by another try at {winner.site}")
                await self._send_winners_order(record, spec, winner, attempt)
                await self.line.leave(job_id)
            elif holding := reservations.holder(self.store.held(), job_id, attempt):
                await self._announce_again(record, spec, attempt, left, holding, span)
            else:
                await self._place_anew(record, spec, attempt, left, tries, span)

    async def _record(self, job_id: str) -> JobRecord:
        current = await self.jobs.read(job_id)
        if current is None:
            raise LookupError(f"job {job_id} is not in the registry yet")
        return JobRecord.model_validate(current)

    async def _to_place(self, record: JobRecord, attempt: int, span) -> JobSpec | None:
        """The job's spec, or None when there is nothing to place: the job ended (its GPUs go back), or a newer
        attempt owns it. A try ahead of the registry is retried: the sites the job left must be known before it
        is placed again."""
        if record.state.terminal:
            span.set_attribute(telemetry.Attr.OUTCOME, f"already {record.state.value}")
            await self.store.release(record.job_id)  # cancelled while waiting: nothing to place
            await self.line.leave(record.job_id)
            return None
        if record.attempt > attempt or record.spec is None:
            span.set_attribute(telemetry.Attr.OUTCOME, "superseded")
            return None
        if record.attempt < attempt:
            raise LookupError(f"the registry has not seen attempt {attempt} of job {record.job_id} yet")
        return record.spec

    async def _announce_again(self, record: JobRecord, spec: JobSpec, attempt: int, left: Departures,
                              holding: tuple[str, Reservation], span) -> None:
        """The job holds GPUs for this attempt already: reserved by a try that crashed before announcing it, or
        that is still at work. Announce that placement, explained again. The stream keeps the first
        announcement; if another try's came first, only its order goes out, for the job may hold GPUs at two
        sites a moment (the other try's give its own back)."""
        site_id, r = holding
        span.set_attribute(telemetry.Attr.OUTCOME, f"already {record.state.value}")
        if record.state not in (JobState.dispatched, JobState.started):
            held = self.store.held()
            decision = place(spec, self.catalog.tenants[record.tenant],
                             self.views(held, spec.resources.total_gpus, give_back=holding),
                             self.budget(record.tenant, held), self.clock(), left.avoid, left.refused)
            decision = decision.model_copy(update={"site": site_id, "gpu_type": r.gpu_type, "overflow": r.overflow})
            if not await self.dispatch(record, spec, decision, site_id, r.gpu_type, attempt, span, r.token):
                await self.follow_winner(record, spec, attempt, span, site_id, r.token)
        await self.line.leave(record.job_id)

    async def _place_anew(self, record: JobRecord, spec: JobSpec, attempt: int, left: Departures, tries: int,
                          span) -> None:
        """Decide, and reserve what was decided; another replica that took those GPUs first makes it decide
        again. A job that fits nowhere now waits (NackMessage), one that never can is rejected."""
        token = uuid.uuid4().hex  # this try's reservations are its own
        ahead = self.line.ahead(record.job_id, spec.priority)
        held = self.store.held()
        while True:
            views = self.views(held, spec.resources.total_gpus, ahead=ahead)
            room = self.budget(record.tenant, held)
            decision = place(spec, self.catalog.tenants[record.tenant], views, room, self.clock(), left.avoid,
                             left.refused, forecast=self.forecast)
            if decision.impossible:
                await self._never(record, attempt, decision, left.refused, span)
                return
            decision = await self._yield_to_higher(spec, decision, views, held)
            site_id, gpu_type = decision.site, decision.gpu_type
            if site_id is None or gpu_type is None:
                await self._wait(record, spec, attempt, decision, tries, span)
            try:
                holding_token = await self._reserve(record, spec, attempt, self.catalog.site(site_id), gpu_type,
                                                    decision.overflow, room, held, token)
                break
            except NoCapacity:
                held = self.store.held()  # another replica took those GPUs first: decide again
        latest = await self.jobs.read(record.job_id)
        if latest and JobState(latest["state"]).terminal:  # cancelled while we placed it
            await self.store.release(record.job_id)
        elif not await self.dispatch(record, spec, decision, site_id, gpu_type, attempt, span, holding_token):
            # if two tries got this far, the stream kept the first `placed` event: the other gives back what it
            # reserved, unless the winner uses those very GPUs
            await self.follow_winner(record, spec, attempt, span, site_id, token)
            return
        await self.line.leave(record.job_id)

    async def _never(self, record: JobRecord, attempt: int, decision: Decision, refused: dict[str, str],
                     span) -> None:
        """No site can ever run the job: rejected; or every site that could refused it for good: failed."""
        if refused:
            _trace_decision(span, decision, JobState.failed)
            words = "; ".join(f"{site}: {words}" for site, words in refused.items())
            await self.publish(record, JobState.failed, attempt, decision=decision, reasons=decision.reasons,
                               reason=f"refused by every site that could run it: {words}")
            log.info("job.refused_everywhere", job_id=record.job_id, tenant=record.tenant)
        else:
            _trace_decision(span, decision, JobState.rejected)
            await self.publish(record, JobState.rejected, attempt, decision=decision, reasons=decision.reasons,
                               reason="no site in the catalog can ever run this job")
            log.info("job.impossible", job_id=record.job_id, tenant=record.tenant)

    async def _yield_to_higher(self, spec: JobSpec, decision: Decision, views: list[SiteView],
                               held: dict[str, dict]) -> Decision:
        """The decision, unless a waiting job of higher priority would be placed on the same site now: then this
        one waits for it, so that freed GPUs go to higher priorities."""
        if decision.site is None or not (ahead := await self.outranked_by(spec, decision.site, views, held)):
            return decision
        reason = f"{decision.site}: yields to job {ahead} of higher priority, waiting for it"
        waiting = decision.model_copy(update={"site": None, "gpu_type": None, "overflow": False})
        waiting.candidates = [c.model_copy(update={"eligible": False, "reasons": [*c.reasons, reason],
                                                   "holds": [Hold.LINE.value]})
                              if c.eligible else c for c in decision.candidates]
        return waiting

    async def outranked_by(self, spec: JobSpec, site_id: str, views: list[SiteView], held: dict) -> str | None:
        """A waiting job of higher priority that the policy would place on the same site now, if any."""
        for job_id, entry in self.line.entries():
            if entry["priority"] <= spec.priority:
                break  # the line is in priority order
            other = JobSpec.model_validate(entry["spec"])
            if place(other, self.catalog.tenants[other.tenant], views, self.budget(other.tenant, held)).site != site_id:
                continue
            record = await self.jobs.read(job_id)
            if record and record["state"] in (JobState.accepted, JobState.queued, JobState.requeued):
                return job_id
            await self.line.forget(job_id)
        return None

    async def _wait(self, record: JobRecord, spec: JobSpec, attempt: int, decision: Decision, tries: int,
                    span) -> NoReturn:
        """The job fits nowhere now: it says why (once), joins the line, and is tried again later."""
        _trace_decision(span, decision, JobState.queued)
        if record.state != JobState.queued:
            await self.publish(record, JobState.queued, attempt, decision=decision, reasons=decision.reasons)
        await self.line.join(record.job_id, spec, decision)
        raise NackMessage(delay=retry_delay_s(self.retry_s, spec.priority, tries, self.clock(), decision.wait_until))

    async def _reserve(self, record: JobRecord, spec: JobSpec, attempt: int, site: SiteEntry, gpu_type: str,
                       overflow: bool, room: TenantBudget, held: dict[str, dict], token: str) -> str:
        """Hold the decided GPUs; the token of the reservation the job now holds there (this try's, or that of
        another try at this attempt that got there first). NoCapacity if they are gone."""
        reservation = Reservation(
            tenant=record.tenant, gpu_type=gpu_type, gpus=spec.resources.total_gpus, attempt=attempt,
            overflow=overflow, placed_at=self.clock().timestamp(), walltime_s=spec.walltime_s,
            cost_eur=0.0 if site.public else worst_case_cost(spec, site, gpu_type),
            allocation_h=worst_case_allocation_h(spec, site, gpu_type) if site.public else 0.0,
            token=token)
        # the most the tenant's jobs at this site may commit, this one included: the room the decision saw, so
        # that tries placing the same tenant's jobs at once cannot each spend it (checked in the write)
        seen_eur, seen_h = reservations.committed(held.get(site.id), record.tenant)
        limit = (room.budget_left_eur + seen_eur, room.allocation_left_h + seen_h)
        holding = [token]

        def hold(doc: dict | None) -> dict | None:
            earlier = reservations.job(doc, record.job_id)
            new = reservations.reserve(doc, record.job_id, reservation, site.gpus, limit, site.overflow_share)
            # None: the job holds GPUs here for this attempt already (another try's): this try uses them
            holding[0] = earlier.token if new is None and earlier is not None else token
            return new

        await self.store.change(site.id, hold)
        return holding[0]

    async def follow_winner(self, record: JobRecord, spec: JobSpec, attempt: int, span, site_id: str,
                            token: str) -> None:
        """Another try's `placed` event for this attempt came first, and it stands: the reservation made with
        `token` at the site goes back unless the winner uses it, and the winner's order goes out (again, if
        the winner sent it: one id, JetStream keeps one)."""
        winner = await self.placed_by_another(record, attempt)
        span.set_attribute(telemetry.Attr.OUTCOME, f"placed by another try at {winner and winner.site}")
        if winner is None or winner.reservation != token:
            await self.store.give_back(site_id, record.job_id, token)
        if winner is not None:
            await self._send_winners_order(record, spec, winner, attempt)

    async def _send_winners_order(self, record: JobRecord, spec: JobSpec, winner: JobEventData, attempt: int) -> None:
        """The order of this attempt's placement the stream kept, made by another try: its order may not be out
        yet (one id: JetStream keeps one)."""
        if winner.attempt == attempt and winner.site and winner.gpu_type:
            await self.send_order(record, spec, winner.site, winner.gpu_type, attempt)

    async def placed_by_another(self, record: JobRecord, attempt: int) -> JobEventData | None:
        """This attempt's `placed` event data if the event stream has it already (another try made it)."""
        data = await self.events.last_job_event(record.tenant, record.job_id, JobState.placed.value)
        return data if data and data.attempt >= attempt else None

    async def dispatch(self, record: JobRecord, spec: JobSpec, decision: Decision, site_id: str, gpu_type: str,
                       attempt: int, span, reservation: str) -> bool:
        """Announce the placement (with the token of the reservation it uses) and send the site its order.
        False if the stream had this attempt's `placed` event already (another try placed it first): the
        order is not this try's to send, since the two may have chosen different sites."""
        _trace_decision(span, decision, JobState.placed)
        ack = await self.publish(record, JobState.placed, attempt, site=site_id, gpu_type=gpu_type,
                                 overflow=decision.overflow, reservation=reservation, decision=decision)
        if ack is not None and ack.duplicate:
            return False
        await self.send_order(record, spec, site_id, gpu_type, attempt)
        entered = next((h.time for h in reversed(record.history)
                        if h.state in (JobState.accepted, JobState.requeued)), None)
        if entered is not None:
            telemetry.placement_latency.record((self.clock() - entered).total_seconds(),
                                               {"site": site_id, "overflow": decision.overflow})
        if decision.overflow:
            telemetry.overflow_jobs.add(1, {"site": site_id, "tenant": record.tenant})
        log.info("job.placed", job_id=record.job_id, tenant=record.tenant, site=site_id, gpu_type=gpu_type,
                 overflow=decision.overflow)
        return True

    async def send_order(self, record: JobRecord, spec: JobSpec, site_id: str, gpu_type: str, attempt: int) -> None:
        order = Dispatch(job_id=record.job_id, tenant=record.tenant, site=site_id, gpu_type=gpu_type, attempt=attempt,
                         spec=spec)
        await self.events.publish_command(self.subjects.dispatch(site_id), order,
                                          msg_id=f"{record.job_id}.dispatch.{attempt}")

    async def publish(self, record: JobRecord, state: JobState, attempt: int, decision: Decision | None = None,
                      **data):
        """A job event, in the trace of the placement span in progress; JetStream's ack (`duplicate` if the
        stream had this event already)."""
        body = JobEventData(job_id=record.job_id, tenant=record.tenant, state=state, attempt=attempt,
                            decision=decision, **data)
        event = JobEvent.of(SERVICE, body, attempt)
        return await self.events.publish_event(self.subjects.job_event(record.tenant, record.job_id, state.value),
                                               event)

    # Waking the line

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

    async def _wake(self) -> None:
        """The first waiting jobs in line. A job placed here finds itself placed when its own event comes back
        (the same placement, dispatched once: ids and reservations make it idempotent)."""
        for job_id, _ in self.line.entries()[:WAKE_LIMIT]:
            current = await self.jobs.read(job_id)
            if not current or current["state"] != JobState.queued:
                continue
            try:
                await self.place_job(job_id, current["tenant"], current.get("attempt", 0), current.get("traceparent"),
                                     woken=True, known=JobRecord.model_validate(current))
            except NackMessage:
                continue  # still no room for it
            except Exception as e:  # its own event retries it
                log.warning("wake.failed", job_id=job_id, reason=repr(e))


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
