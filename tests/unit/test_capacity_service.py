"""services/capacity/app.py's CapacityView on in-memory stores (tests/fakes.py): what heartbeats that come late,
twice (every replica sees every beat) or not at all make of a site's status and its events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.capacity.app import CapacityView
from services.capacity.view import MISSED_BEATS_DOWN
from shared.contracts.catalog import Catalog, SiteEntry, TenantEntry
from shared.contracts.sites import GpuCount, Heartbeat
from shared.contracts.subjects import Subjects
from tests.fakes import MemoryDocuments, MemoryEventLog, NoCarbonData

T0 = datetime(2026, 12, 2, 12, tzinfo=UTC)
INTERVAL_S = 5.0
CATALOG = Catalog(
    sites={"cloud": SiteEntry(id="cloud", kind="private_cloud", country="FR", jurisdiction="EU",
                              carbon_g_per_kwh=50.0, gpus={"H100": 8})},
    tenants={"acme": TenantEntry(id="acme")})



class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def beat(at: datetime, free: int = 8) -> Heartbeat:
    return Heartbeat(site_id="cloud", time=at, interval_s=INTERVAL_S, gpus={"H100": GpuCount(total=8, free=free)},
                     since=T0)


def replica(statuses: MemoryDocuments, log: MemoryEventLog, clock: Clock) -> CapacityView:
    return CapacityView(CATALOG, NoCarbonData(), statuses, log, Subjects(), INTERVAL_S, clock)



async def test_a_heartbeat_that_comes_late_changes_nothing():
    statuses, log, clock = MemoryDocuments(), MemoryEventLog(Subjects()), Clock()
    view = replica(statuses, log, clock)
    await view.heartbeat(beat(T0 + timedelta(seconds=10), free=2))
    await view.heartbeat(beat(T0 + timedelta(seconds=5), free=8))  # older, delivered after

    status = statuses.values["cloud"]
    assert status["last_seen"] == (T0 + timedelta(seconds=10)).isoformat().replace("+00:00", "Z")
    assert status["gpus"]["H100"]["free"] == 2
    assert log.kinds() == ["up"]


async def test_two_replicas_seeing_one_heartbeat_tell_of_its_change_once():
    statuses, log, clock = MemoryDocuments(), MemoryEventLog(Subjects()), Clock()
    first, second = replica(statuses, log, clock), replica(statuses, log, clock)
    await first.heartbeat(beat(T0))
    await second.heartbeat(beat(T0))

    assert log.kinds() == ["up"]
    assert statuses.writes["cloud"] == 1


async def test_a_silent_site_goes_down_once_and_comes_back_up():
    statuses, log, clock = MemoryDocuments(), MemoryEventLog(Subjects()), Clock()
    view = replica(statuses, log, clock)
    await view.heartbeat(beat(T0))
    clock.now = T0 + timedelta(seconds=MISSED_BEATS_DOWN * INTERVAL_S)
    await view.sweep()
    assert log.kinds() == ["up"], "down before its third missed heartbeat"

    clock.now += timedelta(seconds=1)
    await view.sweep()
    await view.sweep()  # already down: said once
    assert log.kinds() == ["up", "down"]
    assert statuses.values["cloud"]["state"] == "down"

    await view.heartbeat(beat(clock.now))
    assert log.kinds() == ["up", "down", "up"]
    assert [s.state for s in (await view.sites()).sites] == ["up"]
