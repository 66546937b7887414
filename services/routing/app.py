"""routing: places each accepted job on a site under the policy, reserving its GPUs, and dispatches it; frees
the GPUs of jobs that end; requeues the jobs of sites that go down; vouches for what sites report. This module
only wires the parts (services/routing/bootstrap.py) to the bus: placement.py places a job, line.py keeps the
waiting line, store.py the reservations, outages.py the sites that went down, reports.py the sites' reports.
"""

from __future__ import annotations

from nats.js.api import DeliverPolicy

from services.routing import SERVICE
from services.routing.bootstrap import Routing, Stores, bootstrap
from services.routing.outages import Outages
from services.routing.reports import ReportGate
from shared import telemetry
from shared.bus import AFTER_HEADER, ATTEMPT_HEADER, Bus, create_app, create_bus
from shared.carbon import default_carbon
from shared.contracts.billing import UsageEvent
from shared.contracts.catalog import Catalog
from shared.contracts.jobs import JobEvent, JobState
from shared.contracts.sites import SiteEvent
from shared.settings import Settings
from shared.stores import BusDocuments

_RELEASING = {JobState.succeeded, JobState.failed, JobState.cancelled, JobState.rejected}


def create_routing_app(settings: Settings):
    bus = create_bus(settings, SERVICE)
    catalog = Catalog.load(settings.sites_file, settings.tenants_file)
    topology = bus.topology
    # sites, reservations, the line and metered budgets are kept in memory by watches: a placement reads no bucket
    mirrored = [BusDocuments(bus, bucket) for bucket in (topology.reservations_bucket, topology.waiting_bucket,
                                                         topology.sites_bucket, topology.budgets_bucket)]
    reservations, waiting, sites, budgets = mirrored
    stores = Stores(reservations, waiting, sites, budgets, jobs=BusDocuments(bus, topology.jobs_bucket, mirrored=False))
    routing = bootstrap(catalog, default_carbon(), stores, bus, bus.subjects, settings.placement_retry_s,
                        settings.lost_job_grace_s)
    _serve_placement(bus, routing)
    _serve_outages(bus, routing.outages)
    _serve_reports(bus, ReportGate(bus))
    telemetry.observe(telemetry.JOBS_WAITING, "Jobs waiting for capacity (the waiting board)", "{job}",
                      lambda: [(len(routing.line), {})] if waiting.mirror is not None else [])

    async def start() -> None:
        for documents in mirrored:
            await documents.start()
        # the consumers of each site's orders: made here, where the orders come from, for a site's principal may
        # only use them (docs/security.md)
        for site in catalog.sites:
            for durable, subject, config in topology.site_orders(site):
                await bus.declare(topology.dispatch_stream, durable, subject, config)

    async def stop() -> None:
        for documents in mirrored:
            await documents.stop()

    return create_app(bus, on_startup=(start,), on_shutdown=(stop,))


def _serve_placement(bus: Bus, routing: Routing) -> None:
    """Jobs to place, and the events that free GPUs (which wake the waiting line)."""
    subjects, topology = bus.subjects, bus.topology
    placement, line, store = routing.placement, routing.line, routing.store
    bus.document_events(subjects.job_event(kind="placed"), JobEvent,
                        "A job was placed; data.decision explains why there.")
    bus.document_events(subjects.job_event(kind="queued"), JobEvent,
                        "A job waits; data.reasons and data.decision say why.")
    bus.document_events(subjects.job_event(kind="rejected"), JobEvent, "No site in the catalog can ever run the job.")

    async def place(event: JobEvent) -> None:
        await placement.place(event, bus.traceparent(), bus.message().metadata.num_delivered)

    for kind in (JobState.accepted, JobState.requeued):
        # waiting jobs stay unacknowledged while they wait: allow many of them; JetStream counts their rounds
        # as deliveries, so the dead-letter count would drop a job that waited long on its first hiccup
        bus.consumer(subjects.job_event(kind=kind.value), topology.events_stream, kind.value, dead_letter=False,
                     max_ack_pending=100_000)(place)

    async def release(event: JobEvent) -> None:
        """A job that ended, was cancelled or goes back to placement frees the GPUs it held."""
        if event.kind == JobState.requeued:
            await store.release(event.data.job_id, before_attempt=event.data.attempt)
        else:  # a run that started is metered: until then its cost stays committed
            await store.release(event.data.job_id, until_metered=event.data.started_at is not None)
            await line.leave(event.data.job_id)
        await placement.wake()

    for kind in (*sorted(_RELEASING), JobState.requeued):  # only these: most of a job's events concern it not
        bus.consumer(subjects.job_event(kind=kind.value), topology.events_stream, f"release-{kind.value}",
                     batch=128)(release)

    @bus.consumer(subjects.billing_event(kind="usage"), topology.events_stream, "metered", batch=128)
    async def metered(event: UsageEvent) -> None:
        await store.metered(event.data.job_id)

    @bus.responder(subjects.routing_overflow, "routing.overflow")
    async def overflow() -> dict:
        """Overflow from public to paid capacity, per site and per tenant."""
        return store.overflow()


def _serve_outages(bus: Bus, outages: Outages) -> None:
    """Sites that go down or come back. Outages are acted on as they happen: a routing service deployed later
    does not replay old ones."""
    subjects, topology = bus.subjects, bus.topology

    # its waits for a grace period count as deliveries: never dead-lettered
    @bus.consumer(subjects.site_event(kind="down"), topology.events_stream, "site-down", batch=8, dead_letter=False,
                  deliver_policy=DeliverPolicy.NEW)
    async def site_down(event: SiteEvent) -> None:
        status = event.data
        first_look = bus.message().metadata.num_delivered == 1
        await outages.site_down(status.site_id, status.down_since or event.time, first_look=first_look)

    @bus.consumer(subjects.site_event(kind="up"), topology.events_stream, "site-up", batch=8,
                  deliver_policy=DeliverPolicy.NEW)
    async def site_up(event: SiteEvent) -> None:
        status = event.data
        await outages.site_up(status.site_id, status.since, set(status.jobs))


def _serve_reports(bus: Bus, gate: ReportGate) -> None:
    # a report waiting for the one before it counts its rounds as deliveries: never dead-lettered for that
    # (one that fails the check is, at once: Unacceptable)
    @bus.consumer(bus.subjects.report(), bus.topology.reports_stream, "reports", batch=128, dead_letter=False,
                  malformed="report refused: the report is not a job event")
    async def vouch(event: JobEvent) -> None:
        """A site's report on a job: the job's event once routing has checked the job was dispatched there."""
        msg = bus.message()
        headers = msg.headers or {}
        await gate.vouch(msg.subject, event, int(headers.get(ATTEMPT_HEADER, -1)), headers.get(AFTER_HEADER),
                         msg.metadata.num_delivered)
