"""The bus against a real nats-server: concurrent changes to one key are grouped into few writes, none is
lost (within a process or across two), and each caller gets its own outcome; the messages a consumer fetches
together are handled each on its own (acked, handed back, retried, dead-lettered); a responder takes its
request as its model, and the bus answers a body that is not one, and a handler that fails."""

from __future__ import annotations

import asyncio
from collections import Counter

import orjson
import pytest
from faststream.exceptions import NackMessage
from nats.js.api import ConsumerConfig, DeliverPolicy
from structlog.testing import capture_logs

from shared.bus import create_bus, request_json
from shared.contracts.events import CloudEvent
from shared.contracts.jobs import JobEvent, JobEventData, JobRef, JobState
from shared.settings import Settings

BUCKET = "test_counters"


@pytest.fixture
async def buses(nats_server):
    made = []
    for _ in range(2):  # two processes' worth: each its own connection
        bus = create_bus(Settings(nats_url=nats_server.url), "test")
        await bus.broker.connect()
        made.append(bus)
    yield made
    for bus in made:
        await bus.broker.stop()


def add(n: int):
    return lambda doc: {"count": (doc or {}).get("count", 0) + n}


async def revision(bus, key: str) -> int:
    return (await (await bus.kv(BUCKET)).get(key)).revision


async def test_concurrent_changes_to_one_key_share_writes_and_none_is_lost(buses):
    bus = buses[0]
    results = await asyncio.gather(*(bus.update_json(BUCKET, "site", add(1)) for _ in range(50)))
    value, _ = await bus.get_json(BUCKET, "site")
    assert value == {"count": 50}
    # each caller sees the value its own change left, in the order the changes came
    assert sorted(r["count"] for r in results) == list(range(1, 51))
    # one bucket, one key: its revision counts the writes made; the first alone, the other 49 grouped
    assert await revision(bus, "site") <= 3


async def test_two_writers_conflict_and_both_changes_land(buses):
    await asyncio.gather(*(bus.update_json(BUCKET, "site", add(1)) for bus in buses for _ in range(40)))
    value, _ = await buses[1].get_json(BUCKET, "site")
    assert value == {"count": 80}


async def test_a_failing_change_fails_its_caller_only(buses):
    bus = buses[0]

    def refuse(doc):
        raise ValueError("no room")

    outcomes = await asyncio.gather(bus.update_json(BUCKET, "site", add(2)),
                                    bus.update_json(BUCKET, "site", refuse),
                                    bus.update_json(BUCKET, "site", lambda doc: None),  # leaves it as it is
                                    bus.update_json(BUCKET, "site", add(3)),
                                    return_exceptions=True)
    assert outcomes[0] == {"count": 2}
    assert isinstance(outcomes[1], ValueError)
    assert outcomes[2] == {"count": 2}
    assert outcomes[3] == {"count": 5}
    assert (await bus.get_json(BUCKET, "site"))[0] == {"count": 5}


async def dead_letters(bus):
    """Connect the bus, make its streams, and read what it dead-letters."""
    await bus.broker.connect()
    await bus.ensure_topology()
    return await bus.js.pull_subscribe(bus.subjects.dead_letter("test"), durable=None,
                                       stream=bus.topology.dead_letter_stream)


def without_job_id(kind: str) -> CloudEvent:
    """A job event whose data lacks the job's id: no JobEvent."""
    return CloudEvent.make("test", "job", kind, "j0", {"tenant": "t", "state": kind}, "j0")


async def test_each_message_of_a_fetch_has_its_own_outcome(nats_server):
    bus = create_bus(Settings(nats_url=nats_server.url, max_deliveries=2, retry_backoff_s=0.05), "test")
    subjects, topology = bus.subjects, bus.topology
    handled: Counter[str] = Counter()
    done = asyncio.Event()

    @bus.consumer(subjects.job_event(kind="succeeded"), topology.events_stream, "probe", batch=32)
    async def probe(event: CloudEvent) -> None:
        handled[event.subject] += 1
        if event.subject == "fails" or (event.subject == "waits" and handled["waits"] == 1):
            if event.subject == "waits":
                raise NackMessage(delay=0.05)  # not yet: again later, and not counted as a failure
            raise RuntimeError("this one cannot be handled")
        if handled["waits"] == 2 and all(handled[f"ok{i}"] for i in range(8)):
            done.set()

    dead = await dead_letters(bus)
    for name in [*(f"ok{i}" for i in range(8)), "fails", "waits"]:
        event = CloudEvent.make("test", "job", "succeeded", name, {"job_id": name, "tenant": "t"}, name)
        await bus.publish_event(subjects.job_event("t", name, "succeeded"), event)
    await bus.broker.publish(b"{not json", subjects.job_event("t", "garbled", "succeeded"),
                             stream=topology.events_stream)
    await bus.start_handling()
    try:
        await asyncio.wait_for(done.wait(), 10)
        letters = []
        while len(letters) < 2:  # a fetch returns what is there already
            letters += await dead.fetch(2 - len(letters), timeout=10)
        letters.sort(key=lambda m: m.headers["Continuum-Reason"])
        # the failing one tried max_deliveries times, the garbled one failed to decode: each dead-lettered alone
        assert [m.headers["Continuum-Tries"] for m in letters] == ["2", "2"]
        assert "RuntimeError: this one cannot be handled" in letters[0].headers["Continuum-Reason"]
        assert "ValidationError" in letters[1].headers["Continuum-Reason"]
        assert letters[1].data == b"{not json"
        await bus.stop_handling()
        # the others were handled once each and acked: nothing of them is pending in the consumer
        assert all(handled[f"ok{i}"] == 1 for i in range(8)) and handled["fails"] == 2
        async def settled():  # the server takes acks in on its own time
            while (info := await bus.js.consumer_info(topology.events_stream, topology.durable("test", "probe"))
                   ).num_ack_pending:
                await asyncio.sleep(0.05)
            return info
        assert (await asyncio.wait_for(settled(), 5)).num_pending == 0
    finally:
        await bus.stop_handling()
        await bus.broker.stop()


async def test_an_event_whose_data_is_not_its_kinds_is_dead_lettered_and_never_handled(nats_server):
    """A consumer that takes a typed event has the bus validate its data where it comes in: a job event without
    a job_id never reaches the handler, and goes to the dead-letter stream with the reason (as a body that is
    no JSON does: after its tries, even from a consumer whose messages are otherwise never dead-lettered)."""
    bus = create_bus(Settings(nats_url=nats_server.url, max_deliveries=2, retry_backoff_s=0.05), "test")
    subjects, topology = bus.subjects, bus.topology
    seen: list[str] = []
    handled = asyncio.Event()

    @bus.consumer(subjects.job_event(kind="succeeded"), topology.events_stream, "typed", dead_letter=False)
    async def typed(event: JobEvent) -> None:
        seen.append(event.data.job_id)
        handled.set()

    dead = await dead_letters(bus)
    no_job = without_job_id("succeeded")
    await bus.publish_event(subjects.job_event("t", "j0", "succeeded"), no_job)
    good = JobEvent.make("test", "job", "succeeded", "j1",
                         JobEventData(job_id="j1", tenant="t", state=JobState.succeeded), "j1")
    await bus.publish_event(subjects.job_event("t", "j1", "succeeded"), good)
    await bus.start_handling()
    try:
        (letter,) = await dead.fetch(1, timeout=10)
        await asyncio.wait_for(handled.wait(), 10)
        assert letter.headers["Continuum-Tries"] == "2"
        assert letter.headers["Continuum-Reason"].startswith("ValidationError")
        assert "data.job_id" in letter.headers["Continuum-Reason"]
        assert orjson.loads(letter.data) == orjson.loads(no_job.model_dump_json())  # the original body
        assert seen == ["j1"]
    finally:
        await bus.stop_handling()
        await bus.broker.stop()


async def test_a_malformed_body_is_dead_lettered_at_once_with_the_consumers_reason(nats_server):
    """`malformed`: a body no retry will mend (a site's report, say) is refused on its first delivery."""
    bus = create_bus(Settings(nats_url=nats_server.url, max_deliveries=5, retry_backoff_s=0.05), "test")
    subjects, topology = bus.subjects, bus.topology

    @bus.consumer(subjects.job_event(kind="started"), topology.events_stream, "strict", dead_letter=False,
                  malformed="refused: not a job event")
    async def strict(event: JobEvent) -> None:
        raise AssertionError("a malformed event reached its handler")

    dead = await dead_letters(bus)
    no_job = without_job_id("started")
    await bus.publish_event(subjects.job_event("t", "j0", "started"), no_job)
    await bus.start_handling()
    try:
        (letter,) = await dead.fetch(1, timeout=10)
        assert letter.headers["Continuum-Tries"] == "1"
        assert letter.headers["Continuum-Reason"] == "refused: not a job event: data.job_id: Field required"
    finally:
        await bus.stop_handling()
        await bus.broker.stop()


async def test_a_consumer_without_dead_letters_retries_until_the_message_is_handled(nats_server):
    bus = create_bus(Settings(nats_url=nats_server.url, max_deliveries=2, retry_backoff_s=0.05), "test")
    subjects, topology = bus.subjects, bus.topology
    tries: list[int] = []
    done = asyncio.Event()

    @bus.consumer(subjects.job_event(kind="accepted"), topology.events_stream, "patient", dead_letter=False)
    async def patient(event: CloudEvent) -> None:
        tries.append(bus.message().metadata.num_delivered)
        if len(tries) < 4:  # past max_deliveries: a consumer that dead-letters would have given up
            raise RuntimeError("not yet")
        done.set()

    await bus.broker.connect()
    await bus.ensure_topology()
    event = CloudEvent.make("test", "job", "accepted", "j1", {"job_id": "j1", "tenant": "t"}, "j1")
    await bus.publish_event(subjects.job_event("t", "j1", "accepted"), event)
    await bus.start_handling()
    try:
        await asyncio.wait_for(done.wait(), 10)
        assert tries == [1, 2, 3, 4]
        info = await bus.js.stream_info(topology.dead_letter_stream)
        assert info.state.messages == 0
    finally:
        await bus.stop_handling()
        await bus.broker.stop()


async def test_a_durable_an_older_version_made_takes_this_versions_filter(nats_server):
    """A consumer of several filters (an older registry's) becomes one of every job event when the service
    starts; one whose change the server refuses (its delivery policy) is kept as it is, and still serves."""
    bus = create_bus(Settings(nats_url=nats_server.url), "test")
    subjects, topology = bus.subjects, bus.topology
    seen: list[str] = []
    both = asyncio.Event()
    await bus.broker.connect()
    await bus.ensure_topology()
    older, newer = topology.durable("test", "fold"), topology.durable("test", "late")
    await bus.js.add_consumer(topology.events_stream, ConsumerConfig(
        durable_name=older, filter_subjects=[subjects.job_event(kind="placed"), subjects.job_event(kind="started")]))
    await bus.js.add_consumer(topology.events_stream, ConsumerConfig(
        durable_name=newer, filter_subject=subjects.job_events_all, deliver_policy=DeliverPolicy.NEW))

    @bus.consumer(subjects.job_events_all, topology.events_stream, "fold")
    async def fold(event: CloudEvent) -> None:
        seen.append(event.kind)
        if len(seen) == 2:
            both.set()

    @bus.consumer(subjects.job_events_all, topology.events_stream, "late")  # asks for every event, from the first
    async def late(event: CloudEvent) -> None:
        pass

    await bus.start_handling()
    try:
        info = await bus.js.consumer_info(topology.events_stream, older)
        assert info.config.filter_subject == subjects.job_events_all and not info.config.filter_subjects
        assert (await bus.js.consumer_info(topology.events_stream, newer)).config.deliver_policy == DeliverPolicy.NEW
        for kind in ("accepted", "succeeded"):  # kinds the older filters did not take
            await bus.publish_event(subjects.job_event("t", "j1", kind),
                                    CloudEvent.make("test", "job", kind, "j1", {"job_id": "j1", "tenant": "t"}, "j1"))
        await asyncio.wait_for(both.wait(), 10)
        assert seen == ["accepted", "succeeded"]
    finally:
        await bus.stop_handling()
        await bus.broker.stop()


@pytest.fixture
async def serving(nats_server):
    """A bus of its own: the test registers its responders, then starts handling."""
    bus = create_bus(Settings(nats_url=nats_server.url), "test")
    await bus.broker.connect()
    yield bus
    await bus.stop_handling()
    await bus.broker.stop()


async def test_a_responder_takes_its_request_as_its_model(serving):
    bus, subject = serving, serving.subjects.jobs_get
    taken: list[tuple[JobRef, str | None]] = []

    @bus.responder(subject, "jobs.get", tenants=True)
    async def get(ref: JobRef) -> JobRef:
        taken.append((ref, bus.tenant()))
        return JobRef(job_id=ref.job_id.upper())  # a model is answered as its JSON

    await bus.start_handling()
    assert await request_json(bus.nc, subject, {"job_id": "j1"}) == {"job_id": "J1"}
    assert await request_json(bus.nc, f"{subject}.lab", {"job_id": "j2"}) == {"job_id": "J2"}
    assert taken == [(JobRef(job_id="j1"), None), (JobRef(job_id="j2"), "lab")]


async def test_a_body_that_is_not_the_request_is_answered_why_and_the_handler_is_not_called(serving):
    bus, subject = serving, serving.subjects.jobs_get
    called: list[JobRef] = []

    @bus.responder(subject, "jobs.get")
    async def get(ref: JobRef) -> dict:
        called.append(ref)
        return {}

    await bus.start_handling()

    async def reply(body: bytes) -> dict:
        return orjson.loads((await bus.nc.request(subject, body, timeout=5)).data)
    assert await reply(b'{"job_id": "a b"}') == {
        "error": "bad request: job_id: String should match pattern '^[A-Za-z0-9_-]+$'"}
    assert await reply(b'{"job_id": "j1", "site": "x"}') == {
        "error": "bad request: site: Extra inputs are not permitted"}
    assert await reply(b"{}") == {"error": "bad request: job_id: Field required"}
    assert (await reply(b"{not json"))["error"].startswith("bad request: body: Invalid JSON: ")
    assert called == []


async def test_a_failing_handler_is_answered_an_internal_error_and_the_next_request_is_served(serving):
    bus, subject = serving, serving.subjects.jobs_get

    @bus.responder(subject, "jobs.get", concurrency=1)  # the failed request must give its one slot back
    async def get(ref: JobRef) -> dict:
        if ref.job_id == "broken":
            raise RuntimeError("the registry is away")
        return {"job_id": ref.job_id}

    @bus.responder(bus.subjects.sites_list, "sites.list")  # no request: a handler without a parameter
    async def sites() -> dict:
        raise KeyError("lab")

    await bus.start_handling()
    with capture_logs() as logs:
        assert await request_json(bus.nc, subject, {"job_id": "broken"}) == {
            "error": "internal error: the registry is away"}
        assert await request_json(bus.nc, bus.subjects.sites_list, {}) == {"error": "internal error: 'lab'"}
    assert await request_json(bus.nc, subject, {"job_id": "j1"}) == {"job_id": "j1"}
    # each failure logged once, by the bus, with the request's subject
    assert [(e["event"], e["subject"]) for e in logs if e["log_level"] == "error"] == [
        ("request.failed", subject), ("request.failed", bus.subjects.sites_list)]
