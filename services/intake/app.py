"""intake: validates and accepts jobs, applies idempotency, and keeps the job registry behind jobs.get."""

from __future__ import annotations

import hashlib
import uuid

import structlog

from services.intake.validation import Rejection, check_submission
from shared import telemetry
from shared.bus import Bus, create_app, create_bus
from shared.contracts.catalog import Catalog
from shared.contracts.jobs import (
    CancelReply,
    CancelRequest,
    HistoryReply,
    HistoryRequest,
    JobEvent,
    JobEventData,
    JobRecord,
    JobRef,
    JobState,
    StopJob,
    SubmitReply,
)
from shared.contracts.subjects import Subjects
from shared.registry import apply_event
from shared.settings import Settings
from shared.stores import BusDocuments, Documents, EventLog

log = structlog.get_logger()
SERVICE = "intake"


class Intake:
    """The service's domain, given what it works against (a test gives it in-memory stores)."""

    def __init__(self, catalog: Catalog, registry: Documents, keys: Documents, sites: Documents, events: EventLog,
                 subjects: Subjects, max_request_bytes: int) -> None:
        self.catalog = catalog
        self.registry = registry  # the job records, folded from their events
        self.keys = keys  # idempotency keys, a slot each: the job that claimed it
        self.sites = sites  # capacity's site statuses (is a site up, for a cancel)
        self.events, self.subjects = events, subjects
        self.max_request_bytes = max_request_bytes

    async def submit(self, body: bytes, *, subject_tenant: str | None = None, msg_id: str | None = None,
                     traceparent: str | None = None) -> SubmitReply:
        """Validate and accept (or reject) a submission: the root of the job's trace, or the child of the
        submitter's own `traceparent`."""
        with telemetry.job_span(telemetry.SpanName.SUBMIT, traceparent) as span:
            reply = await self._submit(body, subject_tenant, msg_id, traceparent, span)
            span.set_attribute(telemetry.Attr.OUTCOME, reply.state)
            return reply

    async def _submit(self, body: bytes, subject_tenant: str | None, msg_id: str | None, traceparent: str | None,
                      span) -> SubmitReply:
        job_id = uuid.uuid4().hex
        try:
            with telemetry.tracer.start_as_current_span(telemetry.SpanName.VALIDATE):
                spec = check_submission(body, self.catalog, max_bytes=self.max_request_bytes,
                                        subject_tenant=subject_tenant)
        except Rejection as rejection:
            telemetry.name_job(span, job_id, rejection.tenant)
            span.set_attribute(telemetry.Attr.REASON, str(rejection))
            await self.record(JobEvent.of(SERVICE, JobEventData(
                job_id=job_id, tenant=rejection.tenant, state=JobState.rejected, errors=rejection.errors,
                reason=str(rejection))))
            log.info("job.rejected", job_id=job_id, tenant=rejection.tenant, reason=str(rejection))
            return SubmitReply(job_id=job_id, state="rejected", errors=rejection.errors)

        key = spec.idempotency_key or msg_id
        kept_context = None
        if key:
            # same tenant + same key = same job: the first writer of the key owns it
            slot = f"{spec.tenant}.{hashlib.sha256(key.encode()).hexdigest()[:40]}"
            claimed = await self.keys.change(slot, lambda cur: None if cur else {"job_id": job_id})
            if claimed is not None and claimed["job_id"] != job_id:
                job_id = claimed["job_id"]
                existing = await self.registry.read(job_id)
                telemetry.name_job(span, job_id, spec.tenant)
                if existing and await self.published(spec.tenant, job_id):
                    span.set_attribute(telemetry.Attr.REASON, "the same idempotency key: the same job")
                    log.info("job.duplicate", job_id=job_id, tenant=spec.tenant)
                    return SubmitReply(job_id=job_id, state="accepted")
                # the first submission stopped between claiming the key and publishing: finish it now
                kept_context = (existing or {}).get("traceparent")
        telemetry.name_job(span, job_id, spec.tenant)
        # the job's own trace context, kept in its record for the hops that start without a message
        traceparent = kept_context or telemetry.current_traceparent() or traceparent or telemetry.new_traceparent()
        event = JobEvent.of(SERVICE, JobEventData(
            job_id=job_id, tenant=spec.tenant, state=JobState.accepted, spec=spec, traceparent=traceparent))
        await self.record(event, traceparent)
        log.info("job.accepted", job_id=job_id, tenant=spec.tenant)
        return SubmitReply(job_id=job_id, state="accepted")

    async def published(self, tenant: str, job_id: str) -> bool:
        """Is the job's accepted event in the stream?"""
        return await self.events.last_job_event(tenant, job_id, JobState.accepted.value) is not None

    async def apply(self, event: JobEvent, seq: int) -> None:
        """Fold the event into the job's record."""
        applied: list[dict | None] = []

        def change(current: dict | None) -> dict | None:
            applied.append(apply_event(current, event, seq))
            return applied[-1]
        record = await self.registry.change(event.data.job_id, change)
        # counted once (not on a redelivery), and only when the job entered that state (not a late report)
        if applied[-1] is not None and record is applied[-1] and record["state"] == event.kind:
            telemetry.job_transitions.add(1, {"state": event.kind, "site": event.data.site or "none"})

    async def record(self, event: JobEvent, traceparent: str | None = None) -> None:
        """Write the event into the registry, then publish it: a `jobs.get` right after the reply finds the job."""
        data = event.data
        await self.apply(event, seq=0)
        await self.events.publish_event(self.subjects.job_event(data.tenant, data.job_id, event.kind), event,
                                        traceparent)

    async def placed_at(self, record: JobRecord) -> tuple[str | None, int]:
        """The site of the job's current placement if the event stream has it, and its attempt."""
        placed = await self.events.last_job_event(record.tenant, record.job_id, JobState.placed.value)
        if placed is None or placed.attempt < record.attempt:
            return None, record.attempt
        return placed.site, placed.attempt

    async def get(self, job_id: str, requester: str | None = None) -> JobRecord | None:
        """The job's record; None if there is none, or it is another tenant's than the requester's (the same
        answer, so that ids say nothing of other tenants)."""
        record = await self.registry.read(job_id)
        if record is None or requester not in (None, record["tenant"]):
            return None
        return JobRecord.model_validate(record)

    async def cancel(self, request: CancelRequest, requester: str | None = None) -> CancelReply | dict:
        record = await self.get(request.job_id, requester)
        if record is None:
            return {"error": f"no job {request.job_id!r}"}
        if record.state.terminal:
            return CancelReply(job_id=record.job_id, state=record.state.value)
        with telemetry.job_span(telemetry.SpanName.CANCEL, record.traceparent, record.job_id, record.tenant,
                                **{telemetry.Attr.REASON: request.reason}) as span:
            reply = await self._cancel(record, request.reason)
            span.set_attribute(telemetry.Attr.OUTCOME, reply.state)
            return reply

    async def _cancel(self, record: JobRecord, reason: str) -> CancelReply:
        site_down = False
        # the registry follows the events: a job placed a moment ago may not show its site there yet
        site, attempt = (record.site, record.attempt) if record.site else await self.placed_at(record)
        if site is not None:
            # the site stops it, and if it is down, stops it when it is back (a cancel is never lost)
            await self.events.publish_command(self.subjects.stop(site),
                                           StopJob(job_id=record.job_id, reason=reason, attempt=attempt),
                                           msg_id=f"{record.job_id}.stop.{attempt}")
            status = await self.sites.read(site)
            site_down = not status or status["state"] != "up"
        if site is None or site_down:
            # not at a working site: cancelled now, so routing neither places it nor moves it elsewhere
            await self.record(JobEvent.of(SERVICE, JobEventData(
                job_id=record.job_id, tenant=record.tenant, state=JobState.cancelled, site=site, reason=reason)))
            return CancelReply(job_id=record.job_id, state=JobState.cancelled.value)
        await self.record(JobEvent.of(SERVICE, JobEventData(
            job_id=record.job_id, tenant=record.tenant, state=JobState.cancelling, site=site, reason=reason)))
        return CancelReply(job_id=record.job_id, state=JobState.cancelling.value)


def intake_on(bus: Bus, catalog: Catalog) -> Intake:
    """Intake on the bus: the registry, the idempotency keys and the site statuses in their buckets."""
    topology = bus.topology
    # a job's events come one after another: its record needs no read each time
    return Intake(catalog, BusDocuments(bus, topology.jobs_bucket, mirrored=False, recent=True),
                  BusDocuments(bus, topology.idempotency_bucket, mirrored=False),
                  BusDocuments(bus, topology.sites_bucket, mirrored=False), bus, bus.subjects,
                  bus.settings.max_request_bytes)


def create_intake_app(settings: Settings):
    bus = create_bus(settings, SERVICE)
    intake = intake_on(bus, Catalog.load(settings.sites_file, settings.tenants_file))
    _serve_submissions(bus, intake)
    _serve_questions(bus, intake)
    return create_app(bus)


def _serve_submissions(bus: Bus, intake: Intake) -> None:
    """Jobs submitted (by request, or fire and forget), and the registry that folds every job's events."""
    subjects, topology = bus.subjects, bus.topology
    bus.document_events(subjects.job_event(kind="accepted"), JobEvent,
                        "A job was accepted; data.spec is its JobSpec.")
    bus.document_events(subjects.job_event(kind="rejected"), JobEvent,
                        "A submission was refused; data.errors says why.")
    bus.document_events(subjects.job_event(kind="cancelled"), JobEvent, "A job not yet at a site was cancelled.")
    bus.document_events(subjects.job_event(kind="cancelling"), JobEvent,
                        "A job at a working site was asked to stop: it ends when the site says so.")

    @bus.responder(subjects.jobs_submit, "jobs.submit", tenants=True)
    async def submit() -> SubmitReply:
        """Submit a JobSpec; the reply says accepted (with its job id) or rejected (with every problem)."""
        # the body as it came, not a JobSpec the bus validated: a bad submission is a rejection (an event, and
        # the reply's `errors`), and so is a failure here (the contract's reply to a submission, not the bus's)
        try:
            return await intake.submit(bus.message().data, subject_tenant=bus.tenant(),
                                       traceparent=bus.traceparent())
        except Exception as e:  # a request is answered, whatever happens
            log.exception("submit.failed")
            return SubmitReply(job_id="", state="rejected", errors=[{"loc": [], "msg": f"internal error: {e}"}])

    @bus.consumer(subjects.intake("*"), topology.intake_stream, "intake")
    async def fire_and_forget() -> None:
        """A JobSpec from a system that emits job events; the outcome is an accepted or rejected event."""
        msg = bus.message()
        headers = msg.headers or {}
        # without a key of its own, the message's place in the stream keeps a redelivery from being a second job
        key = headers.get("Nats-Msg-Id") or f"intake-seq-{msg.metadata.sequence.stream}"
        await intake.submit(msg.data, subject_tenant=msg.subject.rsplit(".", 1)[-1], msg_id=key,
                            traceparent=headers.get(telemetry.TRACEPARENT))

    # one filter for every kind: a consumer of several filters (every kind but `accepted`) had nats-server search
    # the subjects of the stream (six a job) at each fetch, more than half of its time
    @bus.consumer(subjects.job_events_all, topology.events_stream, "registry", batch=128)
    async def registry(event: JobEvent) -> None:
        """Fold every job event into the job's record; intake folded `accepted` itself, before publishing it."""
        if event.kind != JobState.accepted:
            await intake.apply(event, bus.message().metadata.sequence.stream)


def _serve_questions(bus: Bus, intake: Intake) -> None:
    """What tenants, operators and sites ask of jobs, and cancelling one."""
    subjects = bus.subjects

    @bus.responder(subjects.jobs_get, "jobs.get", tenants=True)
    async def get(ref: JobRef) -> JobRecord | dict:
        record = await intake.get(ref.job_id, bus.tenant())
        return record if record else {"error": f"no job {ref.job_id!r}"}

    @bus.responder(subjects.jobs_cancel, "jobs.cancel", tenants=True)
    async def cancel(request: CancelRequest) -> CancelReply | dict:
        return await intake.cancel(request, bus.tenant())

    @bus.responder(subjects.site_job(), "agents.job")
    async def site_job(ref: JobRef) -> dict:
        """A site's agent asks for the record of a job: answered only if the job was placed at that site (the
        NATS server lets a site ask only on its own subject)."""
        site = bus.message().subject.split(".")[-2]
        record = await intake.registry.read(ref.job_id)
        if record is None or not any(h["state"] == JobState.placed and h.get("site") == site
                                     for h in record["history"]):
            return {"error": f"no job {ref.job_id!r}"}
        return record

    @bus.responder(subjects.jobs_history, "jobs.history", tenants=True)
    async def history(request: HistoryRequest) -> HistoryReply:
        """A page of job and billing events from the event stream, after a sequence: a tenant reads its own
        history from the start (the operator, one tenant's or every event)."""
        tenant = bus.tenant() or request.tenant
        filters = list(subjects.tenant_events(tenant)) if tenant else [subjects.events_all]
        events, last = await bus.read_events(filters, request.after_seq, request.limit)
        return HistoryReply(events=events, last_seq=last)
