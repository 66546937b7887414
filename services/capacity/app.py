"""capacity: the live view of every site (JetStream KV), from agent heartbeats; site up/down events."""

from __future__ import annotations

import asyncio

import structlog
from faststream.nats import NatsMessage

from services.capacity.view import is_lost, never_seen, status_from_heartbeat
from shared.bus import Bus, create_app, create_bus
from shared.carbon import HourlyCarbon, default_carbon
from shared.contracts.catalog import Catalog, SiteEntry
from shared.contracts.events import make_event, utcnow
from shared.contracts.sites import Heartbeat, SitesReply, SiteStatus
from shared.settings import Settings

log = structlog.get_logger()
SERVICE = "capacity"


class CapacityView:
    def __init__(self, bus: Bus, catalog: Catalog, carbon: HourlyCarbon) -> None:
        self.bus = bus
        self.catalog = catalog
        self.carbon = carbon

    def intensity(self, site: SiteEntry) -> float:
        if site.carbon_g_per_kwh is not None:
            return site.carbon_g_per_kwh
        return self.carbon.intensity(site.carbon_zone, utcnow())

    async def heartbeat(self, beat: Heartbeat) -> None:
        site = self.catalog.sites.get(beat.site_id)
        if site is None:
            log.warning("heartbeat.unknown_site", site=beat.site_id)
            return
        new = status_from_heartbeat(site, beat, self.intensity(site))
        came_up = False

        def change(current: dict | None) -> dict | None:
            nonlocal came_up
            if current and current.get("last_seen") and SiteStatus.model_validate(current).last_seen >= beat.time:
                return None  # an older heartbeat, late
            came_up = not current or current["state"] != "up"
            return new.model_dump(mode="json")

        await self.bus.update_json(self.bus.topology.sites_bucket, site.id, change)
        if came_up:
            await self.site_event(site.id, "up", new)

    async def sweep(self) -> None:
        """Mark down every site that stopped sending heartbeats."""
        now = utcnow()
        for site in self.catalog.sites.values():
            went_down = False

            def change(current: dict | None) -> dict | None:
                nonlocal went_down
                if not current:
                    return None
                status = SiteStatus.model_validate(current)
                went_down = is_lost(status, now, self.bus.settings.heartbeat_interval_s)
                return status.model_copy(update={"state": "down"}).model_dump(mode="json") if went_down else None

            stored = await self.bus.update_json(self.bus.topology.sites_bucket, site.id, change)
            if went_down:
                await self.site_event(site.id, "down", SiteStatus.model_validate(stored))

    async def site_event(self, site_id: str, kind: str, status: SiteStatus) -> None:
        event = make_event(SERVICE, "site", kind, site_id, status.model_dump(mode="json"), status.last_seen)
        await self.bus.publish_event(self.bus.subjects.site_event(site_id, kind), event)
        log.info(f"site.{kind}", site=site_id)

    async def sites(self) -> SitesReply:
        stored = await self.bus.get_many(self.bus.topology.sites_bucket, self.catalog.sites)
        return SitesReply(sites=[
            SiteStatus.model_validate(stored[s.id]) if s.id in stored else never_seen(s, self.intensity(s))
            for s in self.catalog.sites.values()])


def create_capacity_app(settings: Settings):
    bus = create_bus(settings, SERVICE)
    catalog = Catalog.load(settings.sites_file, settings.tenants_file)
    view = CapacityView(bus, catalog, default_carbon())
    subjects = bus.subjects
    bus.document_events(subjects.site_event(kind="up"), "A site sends heartbeats again; data is its SiteStatus.")
    bus.document_events(subjects.site_event(kind="down"), "A site missed 3 heartbeats; data is its SiteStatus.")

    @bus.responder(subjects.heartbeat("*"), "heartbeats")
    async def heartbeat(beat: Heartbeat) -> None:
        await view.heartbeat(beat)

    @bus.responder(subjects.sites_list, "sites.list")
    async def sites(msg: NatsMessage) -> dict:
        try:
            return (await view.sites()).model_dump(mode="json")
        except Exception as e:
            log.exception("sites.failed")
            return {"error": f"internal error: {e}"}

    tasks: list[asyncio.Task] = []

    async def watch_for_lost_sites() -> None:
        while True:
            await asyncio.sleep(settings.heartbeat_interval_s)
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
