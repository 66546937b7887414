"""services/gateway/index.py's follower on a real nats-server: the job events the contract's producers publish
reach the index and nothing else does; a follower stopped and started again on the reopened index reads on from
its last sequence, with nothing lost or doubled; one whose consumer is lost makes another where it stood; a body
that is no job event is passed over."""

from __future__ import annotations

import asyncio
from collections import Counter

import nats
import pytest

from services.gateway.index import Follower, JobsIndex
from shared.bus import create_bus
from shared.contracts.events import CloudEvent
from shared.contracts.jobs import JobEvent, JobEventData, JobSpec, JobState
from shared.registry import apply_event
from shared.settings import Settings
from tests.conftest import SUBJECTS, TOPOLOGY

pytestmark = pytest.mark.integration


@pytest.fixture
async def bus(nats_server):
    bus = create_bus(Settings(nats_url=nats_server.url), "gateway")
    await bus.broker.connect()
    await bus.ensure_topology()
    yield bus
    await bus.broker.stop()


@pytest.fixture
def index(tmp_path):
    opened = JobsIndex(tmp_path / "jobs-index.sqlite3")
    yield opened
    opened.close()


class Published:
    """What the stream stored, with its sequences: the job events, and the others between them."""

    def __init__(self, bus) -> None:
        self.bus = bus
        self.jobs: list[tuple[int, JobEvent]] = []

    async def job(self, *events: JobEvent) -> int:
        for event in events:
            ack = await self.bus.publish_event(SUBJECTS.job_event(event.data.tenant, event.data.job_id, event.kind),
                                               event)
            if not ack.duplicate:
                self.jobs.append((ack.seq, event))
        return self.jobs[-1][0]

    async def site(self, site: str) -> int:
        event = CloudEvent.make("capacity", "site", "up", site, {"site_id": site, "state": "up"}, site, len(self.jobs))
        return (await self.bus.publish_event(SUBJECTS.site_event(site, "up"), event)).seq

    def records(self) -> dict[str, dict]:
        records: dict[str, dict] = {}
        for seq, event in self.jobs:
            job_id = event.data.job_id
            records[job_id] = apply_event(records.get(job_id), event, seq) or records[job_id]
        return records


def lifecycle(job_id: str, tenant: str = "acme", site: str = "jean-zay") -> list[JobEvent]:
    """A job's events as intake, routing and a site's agent make them, from accepted to succeeded."""
    spec = JobSpec(tenant=tenant, name=f"train-{job_id}", command=["python", "train.py"], labels={"team": "ml"})
    events = [JobEvent.of("intake", JobEventData(job_id=job_id, tenant=tenant, state=JobState.accepted, spec=spec))]
    events.append(JobEvent.of("routing", JobEventData(job_id=job_id, tenant=tenant, state=JobState.placed, site=site,
                                                      gpu_type="H100", attempt=1), 1))
    for state in (JobState.dispatched, JobState.started, JobState.succeeded):
        events.append(JobEvent.of(f"agent/{site}", JobEventData(job_id=job_id, tenant=tenant, state=state, site=site,
                                                                gpu_type="H100", gpus=1, attempt=1), 1))
    return events


def everything(index: JobsIndex) -> list[dict]:
    records, token = index.page(limit=100)
    while token:
        more, token = index.page(limit=100, page_token=token)
        records += more
    return records


def assert_holds_what_was_published(index: JobsIndex, published: Published) -> None:
    expected = published.records()
    held = {r["job_id"]: r for r in everything(index)}
    assert held == expected
    for record in held.values():  # no event twice in any job
        assert max(Counter(h["event_id"] for h in record["history"]).values()) == 1


async def test_a_follower_restarted_reads_on_with_nothing_lost_or_doubled(bus, tmp_path):
    published = Published(bus)
    path = tmp_path / "jobs-index.sqlite3"
    for n in range(12):  # before the follower starts, with site events between
        await published.job(*lifecycle(f"early-{n}", tenant=("acme", "beta")[n % 2]))
        await published.site("jean-zay")
    index = JobsIndex(path)
    follower = Follower(bus, index, batch=16).start()
    assert await follower.sync(timeout=10)
    assert_holds_what_was_published(index, published)

    # live: each event as it comes
    for n in range(3):
        seq = await published.job(*lifecycle(f"live-{n}"))
        assert await follower.wait_for(seq, timeout=10)
        assert index.get(f"live-{n}")["state"] == "succeeded"
    await follower.stop()
    stopped_at = index.last_seq()
    index.close()

    # while it is stopped: new jobs, one job's step published twice (the stream keeps it once), site events
    for n in range(5):
        await published.job(*lifecycle(f"while-stopped-{n}", tenant="beta"))
        await published.site("scw-par")
    await published.job(lifecycle("while-stopped-0", tenant="beta")[2])

    index = JobsIndex(path)
    assert index.last_seq() == stopped_at
    applied: list[int] = []
    apply = index.apply
    index.apply = lambda batch: applied.extend(seq for seq, _ in batch) or apply(batch)
    follower = Follower(bus, index, batch=16).start()
    try:
        assert await follower.sync(timeout=10)
        assert min(applied) > stopped_at  # read on from where it stood, not from the start
        assert_holds_what_was_published(index, published)
        assert len(everything(index)) == 20
    finally:
        await follower.stop()
        index.close()


async def test_a_follower_whose_consumer_is_lost_makes_another_where_it_stood(bus, index):
    published = Published(bus)
    follower = Follower(bus, index, batch=8, idle_s=0.2).start()
    try:
        assert await follower.wait_for(await published.job(*lifecycle("first")), timeout=10)
        consumers = [c.name for c in await bus.js.consumers_info(TOPOLOGY.events_stream)
                     if c.name.startswith("jobs-index-")]
        assert len(consumers) == 1
        await bus.js.delete_consumer(TOPOLOGY.events_stream, consumers[0])  # as a server restart would
        for n in range(4):
            await published.job(*lifecycle(f"after-{n}"))
        assert await follower.wait_for(published.jobs[-1][0], timeout=10)
        assert_holds_what_was_published(index, published)
    finally:
        await follower.stop()


async def test_what_is_no_job_event_is_passed_over(bus, index, nats_server):
    published = Published(bus)
    nc = await nats.connect(nats_server.url)
    follower = Follower(nc.jetstream(), index, SUBJECTS).start()  # a plain JetStream context does too
    try:
        await nc.jetstream().publish(SUBJECTS.job_event("acme", "garbled", "accepted"), b"{not json",
                                     stream=TOPOLOGY.events_stream)
        seq = await published.job(*lifecycle("fine"))
        site_seq = await published.site("jean-zay")
        assert await follower.wait_for(seq, timeout=10)
        assert index.get("garbled") is None and index.get("fine") is not None
        # caught up with the stream's head although its last event is no job's
        assert await follower.sync(timeout=10)
        assert follower.caught_up_to >= site_seq
        assert not await follower.wait_for(site_seq + 5, timeout=0.3)
        assert_holds_what_was_published(index, published)
    finally:
        await follower.stop()
        await nc.close()


async def test_sync_answers_at_once_when_the_last_events_are_no_jobs(bus, index):
    """A list waits for the index to hold what the stream holds (`sync`); when the stream's last events are a
    site's or a bill's, the consumer says it has nothing more for the index: no waiting for the follower's next
    idle fetch (5 s here, longer than the sync may take)."""
    published = Published(bus)
    follower = Follower(bus, index, idle_s=5.0).start()
    try:
        assert await follower.wait_for(await published.job(*lifecycle("j1")), timeout=10)
        site_seq = await published.site("jean-zay")
        assert await follower.sync(timeout=2.0)
        assert follower.caught_up_to >= site_seq
        assert await follower.wait_for(await published.job(*lifecycle("j2")), timeout=10)  # and on it goes
        await published.site("scw-par")
        assert await follower.sync(timeout=2.0)
        assert_holds_what_was_published(index, published)
    finally:
        await follower.stop()


async def test_a_follower_stopped_mid_batch_finishes_it_first(bus, index):
    """Stopping the follower while a batch is being written lets the write finish: the index may be closed at
    once after `stop`."""
    published = Published(bus)
    started, release = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    apply = index.apply

    def slow_apply(batch):
        loop.call_soon_threadsafe(started.set)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
        return apply(batch)
    index.apply = slow_apply
    await published.job(*lifecycle("j1"))
    follower = Follower(bus, index).start()
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.create_task(follower.stop())
    done, _ = await asyncio.wait({stopping}, timeout=0.3)
    assert not done  # the follower is cancelled, and waits for its batch
    release.set()
    await asyncio.wait_for(stopping, 10)
    assert index.get("j1")["state"] == "succeeded"
