"""The bus's compare-and-set against a real nats-server: concurrent changes to one key are grouped into few
writes, none is lost (within a process or across two), and each caller gets its own outcome."""

from __future__ import annotations

import asyncio

import pytest

from shared.bus import create_bus
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
