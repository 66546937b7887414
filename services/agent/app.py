"""agent: the execution edge of one or more sites. Takes dispatches, runs them on the site's backend,
reports lifecycle events and sends capacity heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import structlog

from services.agent.backends import Outcome, SiteBackend, SubmitError, backend_for
from shared import telemetry
from shared.bus import Bus, create_app, create_bus, dumps, request_json
from shared.contracts.catalog import Catalog, SiteEntry
from shared.contracts.events import utcnow
from shared.contracts.jobs import Dispatch, JobEvent, JobEventData, JobState, StopJob
from shared.contracts.sites import Heartbeat
from shared.settings import Settings

log = structlog.get_logger()
SERVICE = "agent"
LOST_IN_RESTART = "taken by this site's agent before it restarted"


class SiteLink(Protocol):
    """What a site's agent asks of the continuum and tells it."""

    async def job_record(self, job_id: str) -> dict | None:
        """The job's record, if it was ever placed at this site (intake answers for no other)."""

    async def report(self, tenant: str, job_id: str, event: JobEvent, attempt: int, after: str | None) -> None:
        """A report on a job dispatched here at `attempt`, after this attempt's report of kind `after`."""


class BusSiteLink:
    """A site's link over the bus: intake's `agents.job` on the site's own subject, and the reports stream."""

    def __init__(self, bus: Bus, site_id: str) -> None:
        self.bus, self.site_id = bus, site_id

    async def job_record(self, job_id: str) -> dict | None:
        reply = await request_json(self.bus.nc, self.bus.subjects.site_job(self.site_id), {"job_id": job_id})
        return None if "error" in reply else reply

    async def report(self, tenant: str, job_id: str, event: JobEvent, attempt: int, after: str | None) -> None:
        await self.bus.publish_report(self.bus.subjects.job_report(self.site_id, tenant, job_id, event.kind), event,
                                      attempt, after)


class SiteAgent:
    """One site's agent: the bridge between the continuum (its link) and the site's backend."""

    def __init__(self, site: SiteEntry, link: SiteLink, heartbeat_interval_s: float,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.site = site
        self.link = link
        self.heartbeat_interval_s = heartbeat_interval_s
        self.clock = clock
        self.backend: SiteBackend = backend_for(site, self)
        # each job's trace context here: its dispatch span's, then its run's (the parent of what it reports)
        self.traces: dict[str, str | None] = {}
        self.runs: dict[str, telemetry.Span] = {}
        self.since = clock()  # this agent's start: capacity and routing tell a restart by it
        self.reported: dict[tuple[str, int], str] = {}  # each job attempt's last report, while it runs here

    async def take(self, order: Dispatch, traceparent: str | None) -> None:
        if order.job_id in self.backend.known:
            return  # a redelivered dispatch
        with telemetry.job_span(telemetry.SpanName.DISPATCH, traceparent, order.job_id, order.tenant,
                                **{telemetry.Attr.SITE: self.site.id, telemetry.Attr.ATTEMPT: order.attempt,
                                   telemetry.Attr.GPU_TYPE: order.gpu_type,
                                   telemetry.Attr.GPUS: order.spec.resources.total_gpus}) as span:
            span.set_attribute(telemetry.Attr.OUTCOME, await self._take(order))

    async def _take(self, order: Dispatch) -> str:
        """Run the order here, or say why not; the outcome names what happened."""
        record = await self.record(order.job_id)
        stale = record and self.stale(order, record)
        if stale == LOST_IN_RESTART:
            # routing requeues it too when it sees this agent's new start (the same event: one id)
            await self.publish(order, JobState.requeued, attempt=order.attempt + 1,
                               reason=f"site {self.site.id}'s agent restarted and lost the job")
        if stale and record is not None:
            log.info("job.skipped", job_id=order.job_id, site=self.site.id, state=record["state"], reason=stale)
            return f"skipped: {stale}"
        refusal = self.refusal(order)
        if refusal:
            return await self.refuse(order, refusal, permanent=True)
        self.traces[order.job_id] = telemetry.current_traceparent()
        await self.publish(order, JobState.dispatched)
        try:
            await self.backend.submit(order)
        except SubmitError as e:  # the site's scheduler refused it
            outcome = await self.refuse(order, str(e), e.permanent)
            self.traces.pop(order.job_id, None)
            return outcome
        return JobState.dispatched.value

    async def refuse(self, order: Dispatch, words: str, permanent: bool) -> str:
        """Back to placement, with the site's words: elsewhere, or here again later if the refusal was a passing
        one; a job every eligible site refused for good fails with their words."""
        refusal = "permanent" if permanent else "transient"
        await self.publish(order, JobState.requeued, attempt=order.attempt + 1, reason=f"site refused: {words}",
                           refusal=refusal)
        log.warning("job.refused", job_id=order.job_id, site=self.site.id, reason=words, refusal=refusal)
        return f"refused ({refusal}): {words}"

    def stale(self, order: Dispatch, record: dict) -> str | None:
        """Why a dispatch must not run here, though it was sent here: the job ended, moved on, or this site's
        agent took it before it restarted (it was lost with that agent, and routing places it again)."""
        if JobState(record["state"]).terminal:
            return "the job is over"
        if record.get("attempt", 0) > order.attempt:
            return "the job was placed again since"
        if record["state"] in (JobState.dispatched, JobState.started) and record.get("site") == self.site.id:
            return LOST_IN_RESTART
        return None

    def refusal(self, order: Dispatch) -> str | None:
        """Why this site cannot run the order at all (its catalog entry and the router's disagree)."""
        need = order.spec.resources.total_gpus
        if need and self.site.gpus.get(order.gpu_type, 0) < need:
            return f"has {self.site.gpus.get(order.gpu_type, 0)} {order.gpu_type} GPUs, the job needs {need}"
        return self.site.cannot_stage(order.spec)

    async def stop(self, command: StopJob, traceparent: str | None) -> None:
        if await self.backend.cancel(command.job_id, command.reason, command.superseded, command.attempt):
            if command.superseded:
                log.warning("job.superseded", job_id=command.job_id, site=self.site.id, reason=command.reason)
            return
        if command.superseded:
            return  # the job lives on elsewhere: nothing to stop or record here
        # not here (never arrived, or already over): record the cancellation so a late dispatch is skipped
        record = await self.record(command.job_id)
        if record and not JobState(record["state"]).terminal:
            # the id intake's own cancellation has: one event, whichever comes first
            attempt = record.get("attempt", 0)
            event = JobEvent.of(f"agent/{self.site.id}", JobEventData(
                job_id=command.job_id, tenant=record["tenant"], state=JobState.cancelled, site=self.site.id,
                reason=command.reason, attempt=attempt))
            with telemetry.in_trace(traceparent, command.job_id, record["tenant"]):
                await self.report(record["tenant"], command.job_id, event, attempt)

    # Reports, called by the backend. The run is a span from the job's start to its end at the site: the
    # parent of the events it reports, and so of billing's rating.
    async def started(self, order: Dispatch, at: datetime) -> None:
        run = telemetry.tracer.start_span(
            telemetry.SpanName.RUN, context=telemetry.context_of(self.traces.get(order.job_id)),
            start_time=_ns(at), attributes={telemetry.Attr.JOB_ID: order.job_id, telemetry.Attr.TENANT: order.tenant,
                                            telemetry.Attr.SITE: self.site.id, telemetry.Attr.ATTEMPT: order.attempt,
                                            telemetry.Attr.GPU_TYPE: order.gpu_type,
                                            telemetry.Attr.GPUS: order.spec.resources.total_gpus})
        self.runs[order.job_id] = run
        self.traces[order.job_id] = telemetry.traceparent_of(run)
        await self.publish(order, JobState.started, started_at=at)

    async def ended(self, order: Dispatch, started_at: datetime | None, at: datetime, outcome: Outcome) -> None:
        try:
            await self._report_end(order, started_at, at, outcome)
        except BaseException:
            self.left(order, at, "its end could not be reported", outcome, failed=True)
            raise

    async def _report_end(self, order: Dispatch, started_at: datetime | None, at: datetime, outcome: Outcome) -> None:
        if outcome.requeue:
            state = JobState.requeued
            await self.publish(order, state, attempt=order.attempt + 1, reason=outcome.reason)
        else:
            if outcome.cancelled:
                state = JobState.cancelled
            elif outcome.exit_code == 0:
                state = JobState.succeeded
            else:
                state = JobState.failed
            await self.publish(order, state, exit_code=outcome.exit_code, reason=outcome.reason,
                               started_at=started_at, ended_at=at)
        self.left(order, at, state.value, outcome, failed=state == JobState.failed)

    def left(self, order: Dispatch, at: datetime, outcome: str, how: Outcome | None = None,
             failed: bool = False) -> None:
        """The job is gone from this site (ended, or moved elsewhere without a report): its run span ends."""
        self.traces.pop(order.job_id, None)
        run = self.runs.pop(order.job_id, None)
        if run is None:
            return
        run.set_attribute(telemetry.Attr.OUTCOME, outcome)
        if how is not None and how.exit_code is not None:
            run.set_attribute(telemetry.Attr.EXIT_CODE, how.exit_code)
        if how is not None and how.reason:
            run.set_attribute(telemetry.Attr.REASON, how.reason)
        if failed:
            run.set_status(telemetry.Status(telemetry.StatusCode.ERROR, (how and how.reason) or "failed"))
        run.end(end_time=_ns(at))

    async def publish(self, order: Dispatch, state: JobState, **data) -> None:
        data.setdefault("attempt", order.attempt)
        body = JobEventData(job_id=order.job_id, tenant=order.tenant, state=state, site=self.site.id,
                            gpu_type=order.gpu_type, gpus=order.spec.resources.total_gpus, **data)
        event = JobEvent.of(f"agent/{self.site.id}", body, order.attempt)
        # the child of the job's dispatch here, or of its run once it started
        with telemetry.in_trace(self.traces.get(order.job_id), order.job_id, order.tenant):
            await self.report(order.tenant, order.job_id, event, order.attempt)
            if state != JobState.dispatched:
                log.info(f"job.{state.value}", site=self.site.id,
                         **{k: data[k] for k in ("attempt", "exit_code", "reason") if data.get(k) is not None})

    async def record(self, job_id: str) -> dict | None:
        """The job's record, if it was ever placed at this site (intake answers for no other: a site sees only
        the jobs it is given)."""
        return await self.link.job_record(job_id)

    async def report(self, tenant: str, job_id: str, event: JobEvent, attempt: int) -> None:
        """To routing, which makes it the job's event if the job was dispatched here at `attempt` (a site reports
        only on its own jobs: services/routing/reports.py), and after this attempt's report before it: the
        event stream has a job's steps in the order they happened, whichever routing replica vouches for each."""
        key = (job_id, attempt)
        await self.link.report(tenant, job_id, event, attempt, self.reported.get(key))
        if JobState(event.kind) in (JobState.dispatched, JobState.started):
            self.reported[key] = event.kind
        else:  # the attempt is over here
            self.reported.pop(key, None)

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(site_id=self.site.id, time=self.clock(), interval_s=self.heartbeat_interval_s,
                         gpus=self.backend.capacity(), queued=self.backend.queued(),
                         running=sorted(self.backend.running), waited_total=self.backend.waited_total,
                         since=self.since, jobs=self.backend.jobs())


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1e9)


def create_agent_app(settings: Settings, site_ids: list[str] | None = None):
    """Agents for the given catalog sites (all of them by default), in one process."""
    bus = create_bus(settings, SERVICE)
    catalog = Catalog.load(settings.sites_file, settings.tenants_file)
    unknown = set(site_ids or []) - set(catalog.sites)
    if unknown:
        raise ValueError(f"no site {sorted(unknown)} in the catalog; known: {sorted(catalog.sites)}")
    agents = [SiteAgent(catalog.site(s), BusSiteLink(bus, s), settings.heartbeat_interval_s)
              for s in (site_ids or sorted(catalog.sites))]
    broker, subjects, topology = bus.broker, bus.subjects, bus.topology
    for kind in ("dispatched", "started", "succeeded", "failed", "cancelled"):
        bus.document_events(subjects.job_event(kind=kind), JobEvent, f"A site agent reports that a job {kind}.")
    for agent in agents:
        def bind(agent: SiteAgent) -> None:
            site = agent.site.id

            @bus.consumer(subjects.dispatch(site), topology.dispatch_stream, f"{site}-run")
            async def run(order: Dispatch) -> None:
                await agent.take(order, bus.traceparent())

            @bus.consumer(subjects.stop(site), topology.dispatch_stream, f"{site}-cancel", batch=16)
            async def stop(command: StopJob) -> None:
                await agent.stop(command, bus.traceparent())
        bind(agent)

    tasks: list[asyncio.Task] = []

    async def beat() -> None:
        while True:
            for agent in agents:
                try:
                    await broker.publish(dumps(agent.heartbeat()), subjects.heartbeat(agent.site.id))
                except Exception as e:  # the next beat tries again
                    log.warning("heartbeat.failed", site=agent.site.id, error=str(e))
            await asyncio.sleep(settings.heartbeat_interval_s)

    async def start_heartbeats() -> None:
        for agent in agents:
            await agent.backend.start()
        tasks.append(asyncio.create_task(beat(), name="heartbeats"))

    async def stop_all() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*(a.backend.close() for a in agents), return_exceptions=True)

    return create_app(bus, after_startup=(start_heartbeats,), on_shutdown=(stop_all,))
