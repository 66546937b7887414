"""The stores a service's domain works against, as ports: `Documents` (a bucket of JSON documents, read from a
local copy and changed by compare-and-set) and `EventLog` (the event stream, which keeps one copy of an event
by its id, and the dispatch stream). On the bus they are a JetStream key-value bucket (`BusDocuments`) and the
`Bus` itself; a test hands a service's composition root in-memory ones (tests/fakes.py), so that races between
tries run one step at a time, deterministically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import orjson
from nats.js.api import PubAck

from shared.bus import Bus, KvMirror, RecentWrites
from shared.contracts.events import CloudEvent
from shared.contracts.jobs import JobEventData

Change = Callable[[dict | None], dict | None]


class Documents(Protocol):
    def cached(self, key: str) -> dict | None:
        """The local copy's value: no round trip, but it may lag the bucket a moment."""

    def cached_all(self) -> dict[str, dict]:
        """Every key's value in the local copy."""

    async def read(self, key: str) -> dict | None:
        """The bucket's value now."""

    async def change(self, key: str, change: Change) -> dict | None:
        """Compare-and-set: `change` applied to the current value until no other writer got in between; a None
        from it leaves the key as it is; what it raises is raised here. The key's value after (None: none)."""

    async def put(self, key: str, value: dict) -> None: ...

    async def delete(self, key: str) -> None: ...


class EventLog(Protocol):
    async def publish_event(self, subject: str, event: CloudEvent[Any], traceparent: str | None = None) -> PubAck:
        """Store the event; the ack says `duplicate` if the stream had an event of that id already."""

    async def last_job_event(self, tenant: str, job_id: str, kind: str) -> JobEventData | None:
        """The data of the job's last event of `kind` in the stream."""

    async def publish_command(self, subject: str, body: Any, msg_id: str) -> None:
        """An order to a site; one of a given `msg_id` is kept."""


class BusDocuments:
    """A JetStream key-value bucket as `Documents`; with `mirrored`, kept in memory by a watch (`start` it); with
    `recent`, what this process last wrote is kept instead (a key it keeps changing needs no read first)."""

    def __init__(self, bus: Bus, bucket: str, mirrored: bool = True, recent: bool = False) -> None:
        self.bus, self.bucket, self.mirrored = bus, bucket, mirrored
        self.mirror: KvMirror | None = None
        self.written = RecentWrites() if recent else None

    async def start(self) -> BusDocuments:
        if self.mirrored:
            self.mirror = await KvMirror(await self.bus.kv(self.bucket)).start()
        return self

    async def stop(self) -> None:
        if self.mirror:
            await self.mirror.stop()

    def cached(self, key: str) -> dict | None:
        if self.mirror is None:
            raise RuntimeError(f"bucket {self.bucket} is not mirrored here")
        return self.mirror.get(key)[0]

    def cached_all(self) -> dict[str, dict]:
        if self.mirror is None:
            raise RuntimeError(f"bucket {self.bucket} is not mirrored here")
        return {key: value for key, (value, _) in self.mirror.values.items()}

    async def read(self, key: str) -> dict | None:
        return (await self.bus.get_json(self.bucket, key))[0]

    async def change(self, key: str, change: Change) -> dict | None:
        return await self.bus.update_json(self.bucket, key, change, self.mirror or self.written)

    async def put(self, key: str, value: dict) -> None:
        await (await self.bus.kv(self.bucket)).put(key, orjson.dumps(value))

    async def delete(self, key: str) -> None:
        await (await self.bus.kv(self.bucket)).delete(key)
