"""In-memory stores for a service's composition root (shared/stores.py's ports), so that races between
placement tries run one step at a time: a test parks a try at a chosen step (`Gate`), runs another try, then
lets the first go on. They keep the guarantees the real ones give that the races turn on: compare-and-set
changes, and an event log that keeps one event of an id (JetStream's Nats-Msg-Id) and says `duplicate`."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from nats.js.api import PubAck

from services.agent.backends.base import Outcome
from shared.contracts.events import CloudEvent
from shared.contracts.jobs import Dispatch, JobEvent, JobEventData
from shared.contracts.subjects import Subjects
from shared.registry import apply_event
from shared.stores import Change


class NoCarbonData:
    """The carbon data of a catalog whose sites all have a fixed intensity: never asked."""

    def intensity(self, zone: str, when: datetime) -> float:
        raise AssertionError("every site of the test's catalog has a fixed intensity")


class Gate:
    """Parks whoever passes it until it is opened; `reached` says someone waits there."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self._open = asyncio.Event()

    async def pass_(self) -> None:
        self.reached.set()
        await self._open.wait()

    def open(self) -> None:
        self._open.set()


class MemoryDocuments:
    """A bucket whose local copy is the bucket itself (a copy never lags here)."""

    def __init__(self, values: dict[str, dict] | None = None) -> None:
        self.values: dict[str, dict] = dict(values or {})
        self.reads: dict[str, int] = {}
        self.writes: dict[str, int] = {}
        self.gates: dict[str, Gate] = {}  # key -> a gate its next read waits at

    def cached(self, key: str) -> dict | None:
        return self.values.get(key)

    def cached_all(self) -> dict[str, dict]:
        return dict(self.values)

    async def read(self, key: str) -> dict | None:
        self.reads[key] = self.reads.get(key, 0) + 1
        if gate := self.gates.pop(key, None):
            await gate.pass_()
        return self.values.get(key)

    async def change(self, key: str, change: Change) -> dict | None:
        new = change(self.values.get(key))  # what it raises is raised here, and nothing is written
        if new is not None:
            self.values[key] = new
            self.writes[key] = self.writes.get(key, 0) + 1
        return self.values.get(key)

    async def put(self, key: str, value: dict) -> None:
        self.values[key] = value

    async def delete(self, key: str) -> None:
        self.values.pop(key, None)


class LaggingCopy:
    """One replica's local copy of a shared in-memory bucket, as a watch keeps it: it has this replica's own
    writes at once (the bus remembers them) and other replicas' only once it catches up."""

    def __init__(self, bucket: MemoryDocuments) -> None:
        self.bucket = bucket
        self.copy = dict(bucket.values)

    def catch_up(self) -> None:
        self.copy = dict(self.bucket.values)

    def cached(self, key: str) -> dict | None:
        return self.copy.get(key)

    def cached_all(self) -> dict[str, dict]:
        return dict(self.copy)

    async def read(self, key: str) -> dict | None:
        return await self.bucket.read(key)

    async def change(self, key: str, change: Change) -> dict | None:
        value = await self.bucket.change(key, change)
        if value is not None:
            self.copy[key] = value
        return value

    async def put(self, key: str, value: dict) -> None:
        await self.bucket.put(key, value)
        self.copy[key] = value

    async def delete(self, key: str) -> None:
        await self.bucket.delete(key)
        self.copy.pop(key, None)


class MemoryEventLog:
    """The event stream and the dispatch stream. `registry`, if given, folds each new job event at once (the
    registry service's part; leave it out to have the registry lag the stream)."""

    def __init__(self, subjects: Subjects, registry: MemoryDocuments | None = None) -> None:
        self.subjects = subjects
        self.registry = registry
        self.events: list[tuple[str, CloudEvent]] = []
        self.commands: list[tuple[str, Any]] = []
        self._ids: set[str] = set()
        self.duplicates: list[CloudEvent] = []  # kept out by their id (JetStream does so for 15 minutes only)
        self._command_ids: set[str] = set()
        self.gates: dict[str, Gate] = {}  # event kind -> a gate the next publisher of that kind waits at

    async def publish_event(self, subject: str, event: CloudEvent, traceparent: str | None = None) -> PubAck:
        if gate := self.gates.pop(event.kind, None):
            await gate.pass_()
        if event.id in self._ids:
            self.duplicates.append(event)
            return PubAck(stream="events", seq=len(self.events), duplicate=True)
        self._ids.add(event.id)
        self.events.append((subject, event))
        if self.registry is not None and isinstance(event, JobEvent):
            job_id = event.data.job_id
            if new := apply_event(self.registry.values.get(job_id), event, len(self.events)):
                self.registry.values[job_id] = new
        return PubAck(stream="events", seq=len(self.events))

    async def last_job_event(self, tenant: str, job_id: str, kind: str) -> JobEventData | None:
        subject = self.subjects.job_event(tenant, job_id, kind)
        # read back from JSON, as the stream gives it (what was left out is absent, not the object's own)
        return next((JobEventData.model_validate_json(event.data.model_dump_json())
                     for s, event in reversed(self.events) if s == subject), None)

    async def publish_command(self, subject: str, body: Any, msg_id: str) -> None:
        if msg_id not in self._command_ids:
            self._command_ids.add(msg_id)
            self.commands.append((subject, body))

    def kinds(self) -> list[str]:
        """The kind of each event kept, in order."""
        return [event.kind for _, event in self.events]

    def of_kind(self, kind: str) -> list[JobEvent]:
        """The job events of a kind."""
        return [event for _, event in self.events if event.kind == kind and isinstance(event, JobEvent)]


class MemorySiteLink:
    """A site agent's link (services/agent/app.py's SiteLink): the records intake would answer with, and the
    reports the agent sends, in order, each with the kind of the one before it on its attempt."""

    def __init__(self, records: dict[str, dict] | None = None) -> None:
        self.records = dict(records or {})
        self.reports: list[tuple[str, str, int, str | None]] = []  # (job id, kind, attempt, after)
        self.events: list[JobEvent] = []  # the reports themselves
        self.ended = asyncio.Event()  # set by a report that ends a run here

    async def job_record(self, job_id: str) -> dict | None:
        return self.records.get(job_id)

    async def report(self, tenant: str, job_id: str, event: JobEvent, attempt: int, after: str | None) -> None:
        self.reports.append((job_id, event.kind, attempt, after))
        self.events.append(event)
        if event.kind not in ("dispatched", "started"):
            self.ended.set()


class MemoryReports:
    """What a site backend reports (services/agent/backends/base.py's Reports), in order: (kind, job id, attempt,
    the outcome of an end); `fail_start` makes a start impossible to report, as with the bus out of reach."""

    def __init__(self, fail_start: bool = False) -> None:
        self.log: list[tuple[str, str, int, Outcome | None]] = []
        self.fail_start = fail_start
        self.changed = asyncio.Event()

    async def started(self, order: Dispatch, at: datetime) -> None:
        if self.fail_start:
            raise ConnectionError("no NATS")
        self.log.append(("started", order.job_id, order.attempt, None))

    async def ended(self, order: Dispatch, started_at: datetime | None, at: datetime, outcome: Outcome) -> None:
        self.log.append(("ended", order.job_id, order.attempt, outcome))
        self.changed.set()

    def left(self, order: Dispatch, at: datetime, outcome: str) -> None:
        self.log.append(("left", order.job_id, order.attempt, None))
        self.changed.set()

    async def outcome(self, job_id: str, timeout_s: float = 5.0) -> Outcome:
        """How the job's run ended, once it has (its last end, if it ran more than once)."""
        async with asyncio.timeout(timeout_s):
            while True:
                found = [o for kind, j, _, o in self.log if kind == "ended" and j == job_id and o is not None]
                if found:
                    return found[-1]
                self.changed.clear()
                await self.changed.wait()
