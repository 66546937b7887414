"""services/routing/placement.py: the races between placement tries, run one step at a time on in-memory stores
(tests/fakes.py) through routing's composition root. Each test parks a try at a chosen step, runs another, then
lets the first go on, and checks the guard that keeps the outcome right."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from faststream.exceptions import NackMessage

from services.routing import reservations
from services.routing.bootstrap import Stores, bootstrap
from shared.contracts.catalog import Catalog, SiteEntry, TenantEntry
from shared.contracts.jobs import JobEvent, JobEventData, JobSpec, JobState, Resources
from shared.contracts.subjects import Subjects
from tests.fakes import Gate, LaggingCopy, MemoryDocuments, MemoryEventLog, NoCarbonData

NOW = datetime(2026, 12, 2, 12, tzinfo=UTC)
SUBJECTS = Subjects()
CATALOG = Catalog(
    sites={"cloud": SiteEntry(id="cloud", kind="private_cloud", country="FR", jurisdiction="EU",
                              carbon_g_per_kwh=50.0, gpus={"H100": 4}, price_eur_per_gpu_hour={"H100": 2.0})},
    tenants={"acme": TenantEntry(id="acme", monthly_budget_eur=10_000)})



def make_world(catalog: Catalog = CATALOG):
    jobs = MemoryDocuments()
    log = MemoryEventLog(SUBJECTS, registry=jobs)
    statuses = {site: {"site_id": site, "state": "up", "carbon_g_per_kwh": 50.0, "last_seen": NOW.isoformat()}
                for site in catalog.sites}
    stores = Stores(reservations=MemoryDocuments(), waiting=MemoryDocuments(), sites=MemoryDocuments(statuses),
                    budgets=MemoryDocuments(), jobs=jobs)
    routing = bootstrap(catalog, NoCarbonData(), stores, log, SUBJECTS, retry_s=1.0, grace_s=120.0, clock=lambda: NOW)
    return routing, stores, log


@pytest.fixture
def world():
    return make_world()


async def submit(log: MemoryEventLog, job_id: str, gpus: int = 1, priority: int = 4) -> JobEvent:
    spec = JobSpec(tenant="acme", command=["train"], resources=Resources(gpus=gpus, gpu_type="H100"),
                   priority=priority, walltime_s=3600)
    event = JobEvent.make("intake", "job", "accepted", job_id, JobEventData(
        job_id=job_id, tenant="acme", state=JobState.accepted, spec=spec), job_id, time=NOW)
    await log.publish_event(SUBJECTS.job_event("acme", job_id, "accepted"), event)
    return event


def holds(stores: Stores, job_id: str) -> bool:
    return reservations.holds(stores.reservations.values.get("cloud"), job_id)


def orders(log: MemoryEventLog, job_id: str) -> int:
    return sum(1 for subject, order in log.commands if subject == SUBJECTS.dispatch("cloud") and order.job_id == job_id)


async def test_a_try_that_finds_its_gpus_announced_by_another_leaves_them_to_the_job(world):
    routing, stores, log = world
    accepted = await submit(log, "j1")
    log.gates["placed"] = gate = Gate()
    first = asyncio.create_task(routing.placement.place(accepted, None, tries=1))
    await gate.reached.wait()  # it has reserved the GPUs and is about to announce the placement
    # a release wakes the job meanwhile: this try finds the GPUs held for this attempt and announces them
    await routing.placement.place_job("j1", "acme", 0, None, woken=True)
    gate.open()
    await first  # its announcement is a duplicate: the other try's stands, on the very GPUs it reserved

    assert len(log.of_kind("placed")) == 1
    assert holds(stores, "j1"), "the losing try gave back the GPUs the winner's placement uses"
    assert orders(log, "j1") == 1


async def test_a_try_of_a_job_placed_meanwhile_takes_no_gpus_even_for_a_moment(world):
    routing, stores, log = world
    accepted = await submit(log, "j1")
    await routing.placement.place(accepted, None, tries=1)
    await routing.store.release("j1", until_metered=True)  # it ran and ended: its GPUs came back
    writes = dict(stores.reservations.writes)

    await routing.placement.place(accepted, None, tries=2)  # redelivered: the stream has its placement

    assert stores.reservations.writes == writes, "a placed job's second try reserved GPUs again"
    assert not holds(stores, "j1")
    assert len(log.of_kind("placed")) == 1 and orders(log, "j1") == 1


async def fill_then_wait(routing, log, stores) -> None:
    """`big` holds every GPU; `urgent` (priority 9) waits for them on the line; then `big` gives them back
    without waking anyone."""
    await routing.placement.place(await submit(log, "big", gpus=4), None)
    with pytest.raises(NackMessage):
        await routing.placement.place(await submit(log, "urgent", gpus=4, priority=9), None)
    assert routing.line.waits("urgent")
    await routing.store.release("big")


async def test_a_lower_priority_yields_the_freed_gpus_to_a_waiting_higher_one(world):
    routing, stores, log = world
    await fill_then_wait(routing, log, stores)

    with pytest.raises(NackMessage):
        await routing.placement.place(await submit(log, "small", gpus=1, priority=1), None)

    assert not holds(stores, "small")
    (queued,) = [e for e in log.of_kind("queued") if e.data.job_id == "small"]
    assert any("yields to job urgent" in reason for reason in queued.data.reasons)
    (cloud,) = queued.data.decision.candidates
    assert cloud.holds == ["line"]  # it waits, and for what: not a site that never could
    await routing.placement.place_job("urgent", "acme", 0, None, woken=True)
    assert holds(stores, "urgent")


async def test_a_line_entry_left_by_a_job_no_longer_waiting_holds_no_one_back(world):
    routing, stores, log = world
    await fill_then_wait(routing, log, stores)
    gone = JobEventData(job_id="urgent", tenant="acme", state=JobState.cancelled)
    cancelled = JobEvent.make("intake", "job", "cancelled", "urgent", gone, "urgent", time=NOW)
    await log.publish_event(SUBJECTS.job_event("acme", "urgent", "cancelled"), cancelled)  # its entry stays a moment

    await routing.placement.place(await submit(log, "small", gpus=1, priority=1), None)

    assert holds(stores, "small")
    assert not routing.line.waits("urgent"), "the stale entry was not cleared"


async def test_a_wake_runs_one_round_at_a_time_and_one_more_for_releases_meanwhile(world):
    routing, stores, log = world
    await routing.placement.place(await submit(log, "big", gpus=4), None)
    with pytest.raises(NackMessage):
        await routing.placement.place(await submit(log, "waiting", gpus=4), None)
    stores.jobs.gates["waiting"] = gate = Gate()
    stores.jobs.reads.clear()

    first = asyncio.create_task(routing.placement.wake())
    await gate.reached.wait()  # the first round is reading the waiting job
    await routing.placement.wake()  # two more releases meanwhile: each returns at once
    await routing.placement.wake()
    gate.open()
    await first

    assert stores.jobs.reads["waiting"] == 2, "rounds ran at once, or the releases meanwhile got no round"
    assert not holds(stores, "waiting")  # `big` still holds every GPU


async def test_a_job_that_yields_to_a_higher_priority_stands_in_no_line_meanwhile():
    twin = CATALOG.sites["cloud"].model_copy(update={"id": "twin", "price_eur_per_gpu_hour": {"H100": 3.0}})
    routing, stores, log = make_world(CATALOG.model_copy(update={"sites": {**CATALOG.sites, "twin": twin}}))
    for blocker in ("big1", "big2"):  # one at each site
        await routing.placement.place(await submit(log, blocker, gpus=4), None)
    with pytest.raises(NackMessage):
        await routing.placement.place(await submit(log, "urgent", gpus=4, priority=9), None)
    assert set(stores.waiting.values["urgent"]["line"]) == {"cloud", "twin"}
    freed, _ = reservations.holder(routing.store.held(), "big1")
    await routing.store.release("big1")

    with pytest.raises(NackMessage):
        await routing.placement.place(await submit(log, "small", gpus=1, priority=1), None)

    decision = log.of_kind("queued")[-1].data.decision
    assert decision.holds == {freed: {"line"}, ({"cloud", "twin"} - {freed}).pop(): {"gpus"}}
    # it would not take the other site's GPUs while `urgent` waits: no job behind it there counts it ahead
    assert stores.waiting.values["small"]["line"] == {}


async def test_a_try_that_lost_to_another_at_another_site_gives_its_gpus_back():
    """Two routing replicas, each with its own local copy of the reservations. The second's copy still shows a
    job that has just given back the first site's GPUs, so the two tries of one job choose different sites;
    the stream keeps the second's placement, and the first gives back what it reserved."""
    twin = CATALOG.sites["cloud"].model_copy(update={"id": "twin", "price_eur_per_gpu_hour": {"H100": 3.0}})
    catalog = CATALOG.model_copy(update={"sites": {**CATALOG.sites, "twin": twin}})
    _, stores, log = make_world(catalog)
    bucket = stores.reservations
    copies = LaggingCopy(bucket), LaggingCopy(bucket)
    first = bootstrap(catalog, NoCarbonData(), replace(stores, reservations=copies[0]), log, SUBJECTS, retry_s=1.0,
                      grace_s=120.0, clock=lambda: NOW)
    second = bootstrap(catalog, NoCarbonData(), replace(stores, reservations=copies[1]), log, SUBJECTS,
                       retry_s=1.0, grace_s=120.0, clock=lambda: NOW)
    await first.placement.place(await submit(log, "old", gpus=4), None)
    assert reservations.holder(bucket.values, "old")[0] == "cloud"  # the cheaper site
    copies[1].catch_up()
    await first.store.release("old")  # the second replica has not seen it yet

    accepted = await submit(log, "j1")
    log.gates["placed"] = gate = Gate()
    losing = asyncio.create_task(first.placement.place(accepted, None, tries=1))
    await gate.reached.wait()  # it reserved at cloud and is about to announce it
    await second.placement.place(accepted, None, tries=2)  # cloud looks full to it: it places j1 at twin
    gate.open()
    await losing

    (placed,) = [e for e in log.of_kind("placed") if e.data.job_id == "j1"]
    assert placed.data.site == "twin"
    assert reservations.holder(bucket.values, "j1")[0] == "twin"
    assert not reservations.holds(bucket.values.get("cloud"), "j1"), "the losing try kept the GPUs it reserved"
    assert [s for s, order in log.commands if order.job_id == "j1"] == [SUBJECTS.dispatch("twin")]
