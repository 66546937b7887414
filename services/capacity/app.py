"""capacity: the live view of every site (JetStream KV), from agent heartbeats; site events (up, down,
saturated, unsaturated) when a site's state changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import structlog
from faststream import Path

from services.capacity.view import (
    MISSED_BEATS_DOWN,
    SATURATED_FREE_SHARE,
    UNSATURATED_FREE_SHARE,
    SiteTracker,
    is_lost,
    never_seen,
    site_changes,
)
from shared import telemetry
from shared.bus import create_app, create_bus
from shared.carbon import CarbonProvider, default_carbon, site_intensity
from shared.contracts.catalog import Catalog, SiteEntry
from shared.contracts.events import utcnow
from shared.contracts.sites import Heartbeat, SiteEvent, SitesReply, SiteStatus
from shared.contracts.subjects import Subjects
from shared.settings import Settings
from shared.stores import BusDocuments, Documents, EventLog

log = structlog.get_logger()
SERVICE = "capacity"
# the sweep for lost sites runs this many times per heartbeat interval, so a site is found down soon after
# its third missed heartbeat
SWEEPS_PER_INTERVAL = 4


class CapacityView:
    """The service's domain, given what it works against (a test gives it in-memory stores and a clock)."""

    def __init__(self, catalog: Catalog, carbon: CarbonProvider, statuses: Documents, events: EventLog,
                 subjects: Subjects, heartbeat_interval_s: float, clock: Callable[[], datetime] = utcnow) -> None:
        self.catalog = catalog
        self.carbon = carbon
        self.statuses, self.events, self.subjects = statuses, events, subjects
        self.heartbeat_interval_s = heartbeat_interval_s
        self.clock = clock
        self.trackers: dict[str, SiteTracker] = {}
        self.latest: dict[str, SiteStatus] = {}  # each site as this replica last stored or found it, for metrics

    def intensity(self, site: SiteEntry) -> float:
        return site_intensity(site, self.clock(), self.carbon)

    async def tracker(self, site: SiteEntry) -> SiteTracker:
        if site.id not in self.trackers:  # after a restart, the wait model starts from the stored one
            stored = await self.statuses.read(site.id)
            self.trackers[site.id] = SiteTracker(site, SiteStatus.model_validate(stored) if stored else None)
        return self.trackers[site.id]

    async def heartbeat(self, beat: Heartbeat) -> None:
        site = self.catalog.sites.get(beat.site_id)
        if site is None:
            log.warning("heartbeat.unknown_site", site=beat.site_id)
            return
        tracker = await self.tracker(site)
        tracker.observe(beat)
        carbon = self.intensity(site)
        changes: list[str] = []
        new: SiteStatus | None = None

        def change(current: dict | None) -> dict | None:
            nonlocal changes, new
            stored = SiteStatus.model_validate(current) if current else None
            if stored and stored.last_seen and stored.last_seen >= beat.time:
                changes = []
                return None  # an older heartbeat, late
            new = tracker.status(beat, carbon, was_saturated=bool(stored and stored.saturated))
            changes = site_changes(stored, new)
            return new.model_dump(mode="json")

        stored = await self.statuses.change(site.id, change)
        if stored is not None:  # what the bucket holds now, this beat's status or a newer one
            self.latest[site.id] = SiteStatus.model_validate(stored)
        if new is not None:  # changes are of this beat's status
            for kind in changes:
                await self.site_event(site.id, kind, new)

    async def sweep(self) -> None:
        """Mark down every site that stopped sending heartbeats."""
        now = self.clock()
        for site in self.catalog.sites.values():
            went_down = False

            def change(current: dict | None) -> dict | None:
                nonlocal went_down
                if not current:
                    return None
                status = SiteStatus.model_validate(current)
                went_down = is_lost(status, now, self.heartbeat_interval_s)
                return status.model_copy(update={"state": "down", "down_since": now}).model_dump(mode="json") \
                    if went_down else None

            stored = await self.statuses.change(site.id, change)
            if went_down and stored is not None:
                self.latest[site.id] = SiteStatus.model_validate(stored)
                await self.site_event(site.id, "down", self.latest[site.id])

    async def site_event(self, site_id: str, kind: str, status: SiteStatus) -> None:
        # the event's id comes from the site, the kind and the time of the heartbeat (or of the outage) it
        # follows, so a replica or a retry that sees the same change publishes it once
        at = status.down_since if kind == "down" else status.last_seen
        event = SiteEvent.make(SERVICE, "site", kind, site_id, status, at)
        await self.events.publish_event(self.subjects.site_event(site_id, kind), event)
        log.info(f"site.{kind}", site=site_id, free={t: g.free for t, g in status.gpus.items()},
                 queued=status.queued, est_wait_s=status.est_wait_s)

    def free_gpus(self) -> list[tuple[int, dict]]:
        """Free GPUs per site and type, for the metrics (none counted at a site that is down)."""
        return [(g.free if status.state == "up" else 0, {"site": site_id, "gpu_type": gpu_type})
                for site_id, status in self.latest.items() for gpu_type, g in status.gpus.items()]

    def queued(self) -> list[tuple[int, dict]]:
        return [(status.queued, {"site": site_id}) for site_id, status in self.latest.items()]

    async def sites(self) -> SitesReply:
        stored = {site_id: await self.statuses.read(site_id) for site_id in self.catalog.sites}
        return SitesReply(sites=[
            SiteStatus.model_validate(status) if (status := stored[s.id]) else never_seen(s, self.intensity(s))
            for s in self.catalog.sites.values()])


def create_capacity_app(settings: Settings):
    bus = create_bus(settings, SERVICE)
    catalog = Catalog.load(settings.sites_file, settings.tenants_file)
    subjects = bus.subjects
    view = CapacityView(catalog, default_carbon(), BusDocuments(bus, bus.topology.sites_bucket, mirrored=False), bus,
                        subjects, settings.heartbeat_interval_s)
    for kind, meaning in (
            ("up", "A site reports again, or its agent restarted; data is its SiteStatus."),
            ("down", f"A site missed {MISSED_BEATS_DOWN} heartbeats; data is its SiteStatus."),
            ("saturated", f"At most {SATURATED_FREE_SHARE:.0%} of a site's GPUs are free; data is its SiteStatus."),
            ("unsaturated", (f"A saturated site has {UNSATURATED_FREE_SHARE:.0%} of its GPUs free and nothing "
                             "queued again."))):
        bus.document_events(subjects.site_event(kind=kind), SiteEvent, meaning)

    # every replica sees every heartbeat (no queue group): each keeps a whole tracker of every site, and
    # their writes of the same status meet in the compare-and-set, which lets one through
    @bus.broker.subscriber(subjects.heartbeat("{site}"), title="heartbeats")
    async def heartbeat(beat: Heartbeat, site: str = Path()) -> None:
        if beat.site_id != site:  # a site's principal may only send on its own subject: the body must agree
            log.warning("heartbeat.refused", site=site, claims=beat.site_id)
            return
        await view.heartbeat(beat)

    @bus.responder(subjects.sites_list, "sites.list")
    async def sites() -> SitesReply:
        return await view.sites()

    telemetry.observe(telemetry.SITE_GPUS_FREE, "Free GPUs per site and type", "{gpu}", view.free_gpus)
    telemetry.observe(telemetry.SITE_QUEUED, "Jobs queued at each site", "{job}", view.queued)
    tasks: list[asyncio.Task] = []

    async def watch_for_lost_sites() -> None:
        while True:
            await asyncio.sleep(settings.heartbeat_interval_s / SWEEPS_PER_INTERVAL)
            try:
                await view.sweep()
            except Exception:
                log.exception("sweep.failed")

    async def start() -> None:
        tasks.append(asyncio.create_task(watch_for_lost_sites(), name="sweep"))

    async def stop() -> None:
        for task in tasks:
            task.cancel()

    return create_app(bus, after_startup=(start,), on_shutdown=(stop,))
