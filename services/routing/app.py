"""routing: places each accepted job on a site, reserving its GPUs, and dispatches it there.

A job that fits nowhere now is `queued` and its accepted (or requeued) event is handed back to JetStream
with a delay: it is tried again until it fits, and a routing replica that dies while holding it loses
nothing, since the event is redelivered to another.
"""

from __future__ import annotations

import structlog
from faststream.exceptions import NackMessage
from faststream.middlewares import AckPolicy
from faststream.nats import JStream, NatsMessage, PullSub

from services.routing import reservations
from services.routing.policy import SiteView, place
from shared.bus import TRACEPARENT, Bus, create_app, create_bus
from shared.carbon import default_carbon
from shared.contracts.catalog import Catalog
from shared.contracts.streams import consumer_config
from shared.contracts.events import CloudEvent, make_event
from shared.contracts.jobs import Decision, Dispatch, JobRecord, JobSpec, JobState, job_event_data
from shared.settings import Settings

log = structlog.get_logger()
SERVICE = "routing"
_RELEASING = {JobState.succeeded, JobState.failed, JobState.cancelled, JobState.rejected}


class Router:
    def __init__(self, bus: Bus, catalog: Catalog) -> None:
        self.bus = bus
        self.catalog = catalog
        self.carbon = default_carbon()

    async def views(self) -> list[SiteView]:
        statuses = await self.bus.get_many(self.bus.topology.sites_bucket, self.catalog.sites)
        held = await self.bus.get_many(self.bus.topology.reservations_bucket, self.catalog.sites)
        views = []
        for site in self.catalog.sites.values():
            status = statuses.get(site.id)
            views.append(SiteView(entry=site, up=bool(status and status["state"] == "up"),
                                  free=reservations.free(held.get(site.id), site.gpus),
                                  carbon_g_per_kwh=status["carbon_g_per_kwh"] if status else 0.0))
        return views

    async def holder(self, job_id: str, attempt: int | None = None) -> tuple[str, dict] | None:
        """The site whose GPUs the job holds (for this attempt, if given)."""
        held = await self.bus.get_many(self.bus.topology.reservations_bucket, self.catalog.sites)
        for site_id, doc in held.items():
            if reservations.holds(doc, job_id):
                reservation = doc["jobs"][job_id]
                if attempt is None or reservation.get("attempt", 0) == attempt:
                    return site_id, reservation
        return None

    async def place(self, event: CloudEvent, traceparent: str | None) -> None:
        job_id, tenant_id = event.data["job_id"], event.data["tenant"]
        attempt = int(event.data.get("attempt", 0))
        current, _ = await self.bus.get_json(self.bus.topology.jobs_bucket, job_id)
        record = JobRecord.model_validate(current) if current else None
        if record is None:
            raise LookupError(f"job {job_id} is not in the registry yet")
        if record.state.terminal:
            await self.release(job_id)  # cancelled while waiting: nothing to place
            return
        if record.attempt > attempt or record.spec is None:
            return  # a newer attempt owns the job now
        spec: JobSpec = record.spec
        tenant = self.catalog.tenants[tenant_id]

        held = await self.holder(job_id, attempt)
        if held is not None:  # placed before a crash: finish the same placement
            site_id, reservation = held
            decision = record.decision or Decision(site=site_id, gpu_type=reservation["gpu_type"], candidates=[])
            await self.dispatch(record, spec, site_id, reservation["gpu_type"], decision, attempt, traceparent)
            return

        while True:
            decision = place(spec, tenant, await self.views())
            if decision.impossible:
                await self.publish(record, JobState.rejected, traceparent, attempt, decision=decision,
                                   reasons=decision.reasons, reason="no site in the catalog can ever run this job")
                log.info("job.impossible", job_id=job_id, tenant=tenant_id)
                return
            if decision.site is None:
                if record.state != JobState.queued:
                    await self.publish(record, JobState.queued, traceparent, attempt, decision=decision,
                                       reasons=decision.reasons)
                raise NackMessage(delay=self.bus.settings.placement_retry_s)
            site = self.catalog.site(decision.site)
            gpus = spec.resources.total_gpus
            try:
                await self.bus.update_json(self.bus.topology.reservations_bucket, site.id,
                                           lambda doc: reservations.reserve(doc, job_id, decision.gpu_type, gpus,
                                                                            site.gpus, attempt))
            except reservations.NoCapacity:
                continue  # another replica took those GPUs first: decide again on the new view
            await self.dispatch(record, spec, site.id, decision.gpu_type, decision, attempt, traceparent)
            return

    async def dispatch(self, record: JobRecord, spec: JobSpec, site_id: str, gpu_type: str, decision: Decision,
                       attempt: int, traceparent: str | None) -> None:
        await self.publish(record, JobState.placed, traceparent, attempt, site=site_id, gpu_type=gpu_type,
                           overflow=decision.overflow, decision=decision)
        order = Dispatch(job_id=record.job_id, tenant=record.tenant, site=site_id, gpu_type=gpu_type,
                         attempt=attempt, spec=spec)
        await self.bus.publish_command(self.bus.subjects.dispatch(site_id), order,
                                       msg_id=f"{record.job_id}.dispatch.{attempt}", traceparent=traceparent)
        log.info("job.placed", job_id=record.job_id, tenant=record.tenant, site=site_id, gpu_type=gpu_type,
                 overflow=decision.overflow)

    async def publish(self, record: JobRecord, state: JobState, traceparent: str | None, attempt: int,
                      decision: Decision | None = None, **data) -> None:
        body = job_event_data(record.job_id, record.tenant, state, attempt=attempt,
                              decision=decision.model_dump(mode="json") if decision else None, **data)
        event = make_event(SERVICE, "job", state.value, record.job_id, body, record.job_id, attempt)
        await self.bus.publish_event(self.bus.subjects.job_event(record.tenant, record.job_id, state.value), event,
                                     traceparent)

    async def release(self, job_id: str, before_attempt: int | None = None) -> None:
        held = await self.holder(job_id)
        if held is not None:
            await self.bus.update_json(self.bus.topology.reservations_bucket, held[0],
                                       lambda doc: reservations.release(doc, job_id, before_attempt))


def create_routing_app(settings: Settings):
    bus = create_bus(settings, SERVICE)
    router = Router(bus, Catalog.load(settings.sites_file, settings.tenants_file))
    broker, subjects, topology = bus.broker, bus.subjects, bus.topology
    bus.document_events(subjects.job_event(kind="placed"), "A job was placed; data.decision explains why there.")
    bus.document_events(subjects.job_event(kind="queued"), "A job waits; data.reasons and data.decision say why.")
    bus.document_events(subjects.job_event(kind="rejected"), "No site in the catalog can ever run the job.")
    events = JStream(topology.events_stream, declare=False)
    # waiting jobs stay unacknowledged while they wait: allow many of them
    waiting = consumer_config(max_ack_pending=100_000)

    async def place(event: CloudEvent, msg: NatsMessage) -> None:
        await router.place(event, (msg.headers or {}).get(TRACEPARENT))

    for kind in (JobState.accepted, JobState.requeued):
        broker.subscriber(subjects.job_event(kind=kind.value), stream=events,
                          durable=topology.durable(SERVICE, kind.value),
                          pull_sub=PullSub(batch_size=64, timeout=1.0), ack_policy=AckPolicy.NACK_ON_ERROR, config=waiting,
                          title=f"place-{kind.value}")(place)

    @broker.subscriber(subjects.job_events_all, stream=events, durable=topology.durable(SERVICE, "release"),
                       pull_sub=PullSub(batch_size=128, timeout=1.0), ack_policy=AckPolicy.NACK_ON_ERROR, config=consumer_config(),
                       title="release")
    async def release(event: CloudEvent) -> None:
        """A job that ended, was cancelled or goes back to placement frees the GPUs it held."""
        kind = JobState(event.kind)
        if kind == JobState.requeued:
            await router.release(event.data["job_id"], before_attempt=int(event.data.get("attempt", 0)))
        elif kind in _RELEASING:
            await router.release(event.data["job_id"])

    return create_app(bus)
