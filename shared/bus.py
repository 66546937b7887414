"""The broker factory and what every service does on the bus: publish events, keep state in JetStream
key-value buckets, and never drop a message that failed.

No broker exists at import time: a service's `create_app(settings)` calls `create_bus(settings, service)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ssl
import typing
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
import structlog
from faststream import FastStream
from faststream.exceptions import NackMessage
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.security import NatsCredentials, NatsNKey
from faststream.security import BaseSecurity
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import (
    APIError,
    BadRequestError,
    KeyNotFoundError,
    KeyValueError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from pydantic import BaseModel, TypeAdapter, ValidationError

from shared import health
from shared.contracts.events import CloudEvent
from shared.contracts.jobs import JobEvent, JobEventData
from shared.contracts.streams import CLUSTER_REPLICAS, Topology, consumer_config
from shared.contracts.subjects import Subjects, inbox_prefix
from shared.settings import Settings
from shared.telemetry import TRACEPARENT, current_traceparent, dead_lettered

log = structlog.get_logger()


def dumps(value: Any) -> bytes:
    if hasattr(value, "model_dump_json"):
        return value.model_dump_json().encode()
    return orjson.dumps(value)


class Unacceptable(Exception):
    """A message that must never be acted on (a site's report on a job it was not given, say): a consumer's
    handler raises it and the message goes to the dead-letter stream at once, with this reason."""


@dataclass
class Bus:
    """One service's handle on NATS: its broker, the names of things, and state in KV buckets."""

    settings: Settings
    service: str
    broker: NatsBroker
    subjects: Subjects
    topology: Topology
    _buckets: dict[str, KeyValue] = field(default_factory=dict)
    _queued: dict[tuple[str, str], list[_Pending]] = field(default_factory=dict)  # changes waiting for a write
    _writing: set[asyncio.Task] = field(default_factory=set)  # the writes on their way (the loop keeps weak refs)
    _consumers: list[_Consumer] = field(default_factory=list)
    _responders: list[_Responder] = field(default_factory=list)
    # from the end of the service's start (consumers and responders bound, its hooks run) until it stops
    serving: bool = False
    _replicas: int | None = None  # of every stream and bucket, once known (replicas())
    # set while the AsyncAPI document is built: consumers are then FastStream subscribers
    documenting: ClassVar[bool] = False

    @property
    def js(self):
        return self.broker.config.connection_state.stream

    @property
    def nc(self):
        """The plain NATS connection (core requests and subscriptions)."""
        return self.broker.config.connection_state.connection

    @property
    def declares(self) -> bool:
        """Whether this process makes streams, buckets and consumers: a site's agent may only use those the
        services made for it."""
        return not (self.settings.principal or "").startswith("site-")

    def replicas(self) -> int:
        """The copies JetStream keeps of every stream and bucket: CONTINUUM_STREAM_REPLICAS, else what the server
        this process is connected to reports of its cluster (`replicas_for`)."""
        if self._replicas is None:
            info = getattr(self.nc, "_server_info", None) or {}
            self._replicas = self.settings.stream_replicas or replicas_for(info)
            log.info("bus.replicas", replicas=self._replicas, cluster=info.get("cluster"),
                     advertised=len(set(info.get("connect_urls") or ())),
                     set_by="CONTINUUM_STREAM_REPLICAS" if self.settings.stream_replicas else "the server's INFO")
        return self._replicas

    def _replicas_over(self, current: int | None) -> int:
        """The replicas for a stream that has `current`: this process's, but never fewer than it has unless
        CONTINUUM_STREAM_REPLICAS says so. A service that starts while a server of the cluster is away sees fewer
        servers than there are; it must not thin out the copies the others made."""
        if self.settings.stream_replicas is None:
            return max(self.replicas(), current or 1)
        return self.replicas()

    async def ensure_topology(self) -> None:
        """Create or update every stream and bucket, with `replicas()` copies each; each service does it at start,
        so any may start first. A stream or bucket made with another replica count is brought to this one (NATS
        2.10 and later move the copies while it serves)."""
        try:
            for config in self.topology.stream_configs(self.replicas()):
                try:
                    await self.js.add_stream(config)
                except BadRequestError:  # it exists, made by an older version or with other replicas
                    current = (await self.js.stream_info(config.name)).config
                    await self.js.update_stream(dataclasses.replace(
                        config, num_replicas=self._replicas_over(current.num_replicas)))
            for bucket in self.topology.buckets:
                await self.kv(bucket)
                current = (await self.js.stream_info(self.topology.bucket_stream(bucket))).config
                wanted = self._replicas_over(current.num_replicas)
                if current.num_replicas != wanted:
                    await self.js.update_stream(dataclasses.replace(current, num_replicas=wanted))
        except APIError as e:
            if e.err_code not in REPLICAS_REFUSED:
                raise
            raise RuntimeError(f"JetStream refused {self.replicas()} replicas ({e.description}): set "
                               "CONTINUUM_STREAM_REPLICAS to what the cluster can keep") from e

    async def kv(self, bucket: str) -> KeyValue:
        if bucket not in self._buckets:
            try:
                self._buckets[bucket] = await self.js.key_value(bucket)
            except (NotFoundError, KeyValueError):
                try:
                    self._buckets[bucket] = await self.js.create_key_value(
                        self.topology.bucket_config(bucket, self.replicas()))
                except BadRequestError:  # another service created it meanwhile
                    self._buckets[bucket] = await self.js.key_value(bucket)
        return self._buckets[bucket]

    def consumer(self, subject: str, stream: str, role: str, batch: int = 64, dead_letter: bool = True,
                 malformed: str | None = None, **config: Any):
        """A durable JetStream consumer of this service, shared by its replicas, with explicit acks.

        The handler takes the message's body as its one parameter's type (or no parameter: `message()`).
        The messages of a fetch are handled concurrently, each on its own: acked when its handler returns,
        handed back with the delay a NackMessage asks for, and when it fails retried with backoff, then
        dead-lettered with its reason. Without `dead_letter` (a consumer whose messages wait by being handed
        back: JetStream counts those rounds as deliveries too), a failing message is retried for as long as it
        fails, with a backoff of up to 30 s. A body that is not of the handler's type is retried, then
        dead-lettered, as any failure; with `malformed`, dead-lettered at once, with that reason first (a site's
        report, say, which a retry will not mend).

        The pull loop is the bus's own (see `_pull`), not a FastStream subscriber: FastStream's per-message
        path costs a middleware stack and a dependency solve for every message (a fifth of a busy service's
        time), its batch mode waits for a full batch and acks or retries it as a whole, and its loop retries a
        failed fetch at once, without end. The AsyncAPI document is built from the same handlers as FastStream
        subscribers (`documenting`), which describe each message as it is on the wire.
        """
        def register(handler: Callable[..., Awaitable[None]]):
            durable, settings = self.topology.durable(self.service, role), consumer_config(**config)
            if self.documenting:
                self.broker.subscriber(subject, stream=JStream(stream, declare=False), durable=durable,
                                       pull_sub=PullSub(batch_size=batch), config=settings, title=role)(handler)
            else:
                self._consumers.append(_Consumer(subject, stream, durable, settings, batch, handler,
                                                 _payload(handler), dead_letter, malformed))
            return handler
        return register

    def not_ready(self) -> str | None:
        """Why this service cannot do its work now, None when it can: its readiness (`shared/health.py`)."""
        if not self.serving:
            return "starting: consumers and responders not bound yet"
        nc = self.nc
        if nc.is_connected:
            return None
        return "NATS connection lost: reconnecting" if nc.is_reconnecting else "not connected to NATS"

    async def mark_serving(self) -> None:
        self.serving = True
        log.info("service.ready", service=self.service)

    async def start_handling(self) -> None:
        """Subscribe every consumer and responder."""
        for consumer in self._consumers:
            if self.declares:
                await self.declare(consumer.stream, consumer.durable, consumer.subject, consumer.config)
            else:
                await self._wait_for(consumer)
            consumer.subscription = await self.js.pull_subscribe_bind(durable=consumer.durable,
                                                                      stream=consumer.stream)
            consumer.task = asyncio.create_task(self._pull(consumer), name=f"pull-{consumer.durable}")
        for responder in self._responders:
            for subject in responder.subjects:
                responder.subscriptions.append(await self.nc.subscribe(
                    subject, queue=self.service, cb=functools.partial(self._take_request, responder)))

    async def _wait_for(self, consumer: _Consumer) -> None:
        """A consumer the services declare (a site's orders): wait until they have."""
        waited = 0
        while True:
            try:
                await self.js.consumer_info(consumer.stream, consumer.durable)
                return
            except NotFoundError:
                if waited == 0:
                    log.info("consumer.waiting", consumer=consumer.durable, reason="declared by the services")
                waited += 1
                await asyncio.sleep(min(2.0, 0.1 * waited))

    async def declare(self, stream: str, durable: str, subject: str, config: ConsumerConfig) -> None:
        """Create the durable, or bring one that exists to this code's config (its filter changed, say): binding
        alone would keep what an older version made. A change the server refuses leaves the durable as it is."""
        config = dataclasses.replace(config, name=durable, durable_name=durable,
                                     filter_subject=None if config.filter_subjects else subject)
        try:
            await self.js.add_consumer(stream, config=config)
        except APIError as e:
            log.warning("consumer.kept", consumer=durable, reason=str(e))

    async def stop_handling(self, grace_s: float = 10.0) -> None:
        """Stop taking messages and requests; those in hand are finished first (for at most `grace_s`)."""
        self.serving = False
        for responder in self._responders:
            for subscription in responder.subscriptions:
                await subscription.unsubscribe()
            responder.subscriptions.clear()
        tasks = [c.task for c in self._consumers if c.task]
        for task in tasks:  # out of its fetch: it then waits for the messages it has
            task.cancel()
        tasks += [t for r in self._responders for t in r.in_flight]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for task in late:  # and those too
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for consumer in self._consumers:  # a subscription left open would hold up the connection's drain
            if consumer.subscription:
                await consumer.subscription.unsubscribe()
                consumer.subscription = None

    async def _pull(self, consumer: _Consumer) -> None:
        """Fetch and hand each message to its own task, up to `batch` at once; fetch again once half of them are
        done, so that a slow message does not hold up the ones behind it (a fetch at a time, handled whole,
        would), while a fetch still brings many."""
        in_flight: set[asyncio.Task] = set()
        room = asyncio.Event()
        failures = 0

        def done(task: asyncio.Task) -> None:
            in_flight.discard(task)
            if len(in_flight) <= consumer.batch // 2:
                room.set()
        try:
            while True:
                if len(in_flight) > consumer.batch // 2:
                    room.clear()
                    await room.wait()
                try:  # what is there, as soon as there is any
                    messages = await consumer.subscription.fetch(consumer.batch - len(in_flight), timeout=5.0)
                except TimeoutError:  # nothing came
                    continue
                except Exception as e:  # the server is away: try again, less and less often, until it is back
                    failures += 1
                    log.warning("fetch.failed", consumer=consumer.durable, tries=failures, reason=repr(e))
                    await asyncio.sleep(min(5.0, 0.05 * 2 ** failures))
                    continue
                failures = 0
                for msg in messages:
                    task = asyncio.create_task(self._handle(consumer, msg))
                    in_flight.add(task)
                    task.add_done_callback(done)
        finally:  # stopping: the messages in hand are finished (cancelled too if the stop cannot wait)
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _handle(self, consumer: _Consumer, msg: Msg) -> None:
        """One message of a fetch: its handler's outcome decides its ack."""
        handling = _handling.set(msg)
        dead_letter = True  # a message that does not decode never will
        try:
            try:
                body = consumer.body.validate_json(msg.data) if consumer.body else None
            except ValidationError as e:
                if consumer.malformed is None:
                    raise
                raise Unacceptable(f"{consumer.malformed}: {_problems(e)}"[:1000]) from None
            dead_letter = consumer.dead_letter
            await (consumer.handler(body) if consumer.body else consumer.handler())
        except NackMessage as nack:  # the handler asks for it again later
            await msg.nak(delay=nack.extra_options.get("delay"))
        except Unacceptable as refusal:
            await self.dead_letter(msg, str(refusal))
        except asyncio.CancelledError:
            raise  # the service stops: unacknowledged, the message comes again
        except Exception as exc:
            await self._retry_or_dead_letter(msg, exc, dead_letter)
        else:
            await msg.ack()
        finally:
            _handling.reset(handling)

    async def _retry_or_dead_letter(self, msg: Msg, exc: Exception, dead_letter: bool) -> None:
        """A failed message is retried with backoff; after the last try it goes to the dead-letter stream with
        its reason (dropping it, as FastStream would, would lose the job's step), unless it is never to be."""
        tries = msg.metadata.num_delivered
        reason = f"{type(exc).__name__}: {exc}"
        if not dead_letter or tries < self.settings.max_deliveries:
            delay = self.settings.retry_backoff_s * 2 ** (tries - 1) if dead_letter \
                else min(30.0, self.settings.retry_backoff_s * 2 ** min(tries, 6))
            log.warning("message.retry", subject=msg.subject, tries=tries, delay_s=delay, reason=reason)
            await msg.nak(delay=delay)
            return
        await self.dead_letter(msg, reason)

    async def dead_letter(self, msg: Msg, reason: str) -> None:
        """Into the dead-letter stream with the reason, out of its own."""
        tries = msg.metadata.num_delivered
        headers = dict(msg.headers or {})
        headers.pop("Nats-Msg-Id", None)
        headers.update({"Continuum-Reason": reason[:2000], "Continuum-Subject": msg.subject,
                        "Continuum-Service": self.service, "Continuum-Tries": str(tries)})
        await self.js.publish(self.subjects.dead_letter(self.service), msg.data,
                              stream=self.topology.dead_letter_stream, headers=headers)
        dead_lettered.add(1, {"service": self.service})
        log.error("message.dead_lettered", subject=msg.subject, tries=tries, reason=reason)
        await msg.ack()

    def message(self) -> Msg:
        """The NATS message (or request) being handled: its `data`, `headers`, `subject`, JetStream `metadata`."""
        return _handling.get()

    def traceparent(self) -> str | None:
        """The trace context the message being handled carries."""
        return (self.message().headers or {}).get(TRACEPARENT)

    def responder(self, subject: str, title: str, concurrency: int = 64, tenants: bool = False):
        """A request/reply handler: it takes the request as its one parameter's type (a pydantic model), or no
        parameter (the request is `message()`), and returns the reply, a model or a dict.

            @bus.responder(subjects.jobs_get, "jobs.get", tenants=True)
            async def get(ref: JobRef) -> JobRecord | dict: ...

        A body that is not the request is answered `{"error": "bad request: <field>: <problem>; ..."}` without
        calling the handler; what the handler raises is logged and answered `{"error": "internal error: ..."}`.
        Replicas share requests in the service's queue group; each serves up to `concurrency` at once (one at a
        time, a submission's two round trips would queue every other). With `tenants`, it also serves
        `<subject>.<tenant>`, where a tenant's requests come (`tenant()` says whose). Served by the bus, as
        consumers are; FastStream's subscriber documents it, with the request's schema."""
        def register(handler: Callable[..., Awaitable[BaseModel | dict]]):
            subjects = [subject, f"{subject}.*"] if tenants else [subject]
            if self.documenting:  # the tenant's subject as a channel of its own
                for each, name in zip(subjects, (title, f"{title}.tenant"), strict=False):
                    self.broker.subscriber(each, queue=self.service, title=name)(handler)
            else:
                self._responders.append(_Responder(subject, subjects, handler, _payload(handler),
                                                   asyncio.Semaphore(concurrency)))
            return handler
        return register

    def tenant(self) -> str | None:
        """The tenant the request being handled came from, as the NATS server vouches for it (its account put
        its name in the subject: docs/security.md); None for the plain subject (the operator, a service, or
        anyone on an open server, where the body's tenant is all there is)."""
        return _requester.get()

    async def _take_request(self, responder: _Responder, msg: Msg) -> None:
        # nats-py waits for this before it hands over the next request: it only starts the work
        await responder.slots.acquire()
        task = asyncio.create_task(self._answer(responder, msg))
        responder.in_flight.add(task)
        def done(task: asyncio.Task) -> None:
            responder.in_flight.discard(task)
            responder.slots.release()

        task.add_done_callback(done)

    async def _answer(self, responder: _Responder, msg: Msg) -> None:
        handling = _handling.set(msg)
        requester = _requester.set(Subjects.on_behalf_of(msg.subject, responder.subject))
        try:
            reply = await responder.serve(msg.data)
        except Exception as e:  # a request is answered, whatever happens
            log.exception("request.failed", subject=msg.subject)
            reply = {"error": f"internal error: {e}"}
        finally:
            _handling.reset(handling)
            _requester.reset(requester)
        if msg.reply:
            await msg.respond(dumps(reply))

    def document_events(self, subject: str, envelope: type[CloudEvent[Any]], description: str) -> None:
        """Declare, for the AsyncAPI document, events this service publishes (subjects with wildcards), in their
        typed envelope (JobEvent, say)."""
        self.broker.publisher(subject, schema=envelope, title=subject, description=description)

    async def publish_event(self, subject: str, event: CloudEvent[Any], traceparent: str | None = None):
        """Publish to the event stream; the event id is the Nats-Msg-Id, so a redone step is not doubled (the
        ack returned says `duplicate`)."""
        return await self.js.publish(subject, event.model_dump_json().encode(), stream=self.topology.events_stream,
                                     headers=_headers(event.id, traceparent))

    async def publish_report(self, subject: str, event: CloudEvent[Any], attempt: int, after: str | None) -> None:
        """A site's report on a job it was dispatched, at the dispatch's attempt, and the kind of its report
        before this one on that attempt: routing makes it the event, after that one. A report has no
        Nats-Msg-Id: the stream of reports is shared by sites, and a site that named its report with another
        site's id would have that one dropped. A report sent twice is one event all the same (the event's id)."""
        headers = {ATTEMPT_HEADER: str(attempt)}
        if context := current_traceparent():
            headers[TRACEPARENT] = context
        if after:
            headers[AFTER_HEADER] = after
        await self.js.publish(subject, event.model_dump_json().encode(), stream=self.topology.reports_stream,
                              headers=headers)

    async def publish_command(self, subject: str, body: Any, msg_id: str) -> None:
        """An order to a site, in the trace of the span in progress."""
        await self.js.publish(subject, dumps(body), stream=self.topology.dispatch_stream,
                              headers=_headers(msg_id, None))

    async def last_job_event(self, tenant: str, job_id: str, kind: str) -> JobEventData | None:
        """The data of the job's last event of `kind` in the event stream (the registry may not show it yet)."""
        try:
            msg = await self.js.get_last_msg(self.topology.events_stream,
                                             self.subjects.job_event(tenant, job_id, kind))
        except NotFoundError:
            return None
        return JobEvent.model_validate_json(msg.data).data

    async def read_events(self, filters: list[str], after_seq: int, limit: int) -> tuple[list[dict], int]:
        """Up to `limit` stored events on `filters` after a stream sequence, in order, as {"seq", "subject",
        "event"}; and the stream's last sequence. Read by a consumer of its own, gone after the read."""
        last = (await self.js.stream_info(self.topology.events_stream)).state.last_seq
        if after_seq >= last:
            return [], last
        name = f"history-{uuid.uuid4().hex}"
        await self.js.add_consumer(self.topology.events_stream, ConsumerConfig(
            name=name, filter_subjects=filters, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after_seq + 1, ack_policy=AckPolicy.NONE, mem_storage=True, inactive_threshold=30.0))
        sub = await self.js.pull_subscribe_bind(stream=self.topology.events_stream, name=name)
        found: list[dict] = []
        try:
            while len(found) < limit:
                try:
                    msgs = await sub.fetch(limit - len(found), timeout=0.5)
                except TimeoutError:  # nats-py's own, or asyncio's from inside fetch
                    break  # nothing more on these subjects
                found += [{"seq": m.metadata.sequence.stream, "subject": m.subject, "event": orjson.loads(m.data)}
                          for m in msgs]
                if found[-1]["seq"] >= last:
                    break
        finally:
            await sub.unsubscribe()
            with contextlib.suppress(Exception):  # its inactivity threshold removes it anyway
                await self.js.delete_consumer(self.topology.events_stream, name)
        return found, last

    async def get_json(self, bucket: str, key: str) -> tuple[dict | None, int | None]:
        kv = await self.kv(bucket)
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None, None
        if entry.value is None or (entry.operation is not None and entry.operation != "PUT"):
            return None, entry.revision
        return orjson.loads(entry.value), entry.revision

    async def get_many(self, bucket: str, keys: Iterable[str]) -> dict[str, dict]:
        """The values of known keys (direct gets: listing a bucket's keys costs a consumer each time)."""
        out = {}
        for key in keys:
            value, _ = await self.get_json(bucket, key)
            if value is not None:
                out[key] = value
        return out

    async def update_json(self, bucket: str, key: str, change: Callable[[dict | None], dict | None],
                          mirror: KvMirror | RecentWrites | None = None) -> dict | None:
        """Compare-and-set: apply `change` to the current value until no other writer got in between.

        `change` returns the new value, or None to leave the key as it is; what it raises is raised here.
        Concurrent replicas each retry on a conflict against the value the other wrote, so no update is lost.
        With a mirror (a KvMirror, or RecentWrites), the first try reads it when it has the key: a stale copy
        only costs a retry against the bucket itself, and a value a stale copy already holds is in the newer
        one too.

        Changes this process makes to one key at once (the handlers of a fetched batch run concurrently) go
        in one write, in the order they came: a group commit. Sixty placements on one site then cost one
        write of its document, not sixty writes and the conflicts between them.
        """
        pending = _Pending(change, asyncio.get_running_loop().create_future())
        queue = self._queued.setdefault((bucket, key), [])
        queue.append(pending)
        if len(queue) == 1:  # no write of this key is on its way: start one, which takes what queues meanwhile
            task = asyncio.create_task(self._write_queued(bucket, key, mirror), name=f"update-{bucket}-{key}")
            self._writing.add(task)
            task.add_done_callback(self._writing.discard)
        return await pending.done

    async def _write_queued(self, bucket: str, key: str, mirror: KvMirror | RecentWrites | None) -> None:
        queue = self._queued[(bucket, key)]
        try:
            while queue:
                taken = len(queue)
                batch = [p for p in queue[:taken] if not p.done.done()]  # less those whose callers gave up
                try:
                    await self._commit(bucket, key, batch, mirror)
                except Exception as e:  # the bucket failed us: every change of the batch fails with it
                    for p in batch:
                        if not p.done.done():
                            p.done.set_exception(e)
                del queue[:taken]
        finally:  # emptied, or cancelled (the service stops): nothing is left waiting
            for p in queue:
                p.done.cancel()
            del self._queued[(bucket, key)]

    async def _commit(self, bucket: str, key: str, batch: list[_Pending], mirror) -> None:
        if not batch:
            return
        kv = await self.kv(bucket)
        current, revision = mirror.get(key) if mirror else (None, None)
        if revision is None:
            current, revision = await self.get_json(bucket, key)
        while True:
            value = current
            outcomes: list[tuple[dict | None, Exception | None]] = []
            for p in batch:
                try:
                    new = p.change(value)
                    value = value if new is None else new
                    outcomes.append((value, None))
                except Exception as e:
                    outcomes.append((None, e))
            try:
                if value is not current:
                    data = orjson.dumps(value)
                    revision = await (kv.create(key, data) if revision is None else kv.update(key, data, last=revision))
                    if mirror:
                        mirror.remember(key, value, revision)
            except KeyWrongLastSequenceError:
                # someone else wrote first: read again and redo
                current, revision = await self.get_json(bucket, key)
                continue
            for p, (result, error) in zip(batch, outcomes, strict=True):
                if not p.done.done():
                    p.done.set_exception(error) if error else p.done.set_result(result)
            return


@dataclass
class _Pending:
    change: Callable[[dict | None], dict | None]
    done: asyncio.Future


@dataclass
class _Consumer:
    subject: str
    stream: str
    durable: str
    config: Any
    batch: int
    handler: Callable[..., Awaitable[None]]
    body: TypeAdapter | None
    dead_letter: bool
    malformed: str | None  # the reason a body not of the handler's type is dead-lettered with at once
    subscription: Any = None  # nats-py's pull subscription, once started
    task: asyncio.Task | None = None


@dataclass
class _Responder:
    subject: str
    subjects: list[str]  # the subject, and `<subject>.*` for one that serves tenants
    handler: Callable[..., Awaitable[BaseModel | dict]]
    body: TypeAdapter | None
    slots: asyncio.Semaphore  # requests served at once
    subscriptions: list[Any] = field(default_factory=list)
    in_flight: set[asyncio.Task] = field(default_factory=set)

    async def serve(self, data: bytes) -> BaseModel | dict:
        """The handler's reply to a request; to a body that is not its request, the reply that says why."""
        if self.body is None:
            return await self.handler()
        try:
            request = self.body.validate_json(data)
        except ValidationError as e:  # the requester's mistake, not the handler's: it is not called
            return _bad_request(e)
        return await self.handler(request)


# the message the handler running in this task is handling, and the tenant whose account sent the request
_handling: ContextVar[Msg] = ContextVar("handling")
_requester: ContextVar[str | None] = ContextVar("requester", default=None)
# the dispatch attempt a site's report is about (routing checks that the job was dispatched there at it)
ATTEMPT_HEADER = "Continuum-Attempt"
AFTER_HEADER = "Continuum-After"


def _headers(msg_id: str, traceparent: str | None) -> dict[str, str]:
    """The message id, and the trace context: the traceparent given, else the span in progress (the next hop
    is its child)."""
    headers = {"Nats-Msg-Id": msg_id}
    if context := traceparent or current_traceparent():
        headers[TRACEPARENT] = context
    return headers


class RecentWrites:
    """What this process last wrote to the keys of a bucket, with their revisions: the next compare-and-set of a
    key it keeps writing (a job's record, event after event) needs no read first."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.values: OrderedDict[str, tuple[dict, int]] = OrderedDict()

    def get(self, key: str) -> tuple[dict | None, int | None]:
        return self.values.get(key, (None, None))

    def remember(self, key: str, value: dict, revision: int) -> None:
        self.values[key] = (value, revision)
        self.values.move_to_end(key)
        if len(self.values) > self.size:
            self.values.popitem(last=False)


class KvMirror:
    """A bucket kept in memory by a watch: reads cost no round trip; writes still compare-and-set."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.values: dict[str, tuple[dict, int]] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> KvMirror:
        watcher = await self.kv.watchall()
        self._task = asyncio.create_task(self._follow(watcher), name="kv-mirror")
        await asyncio.wait_for(self._ready.wait(), 30)
        return self

    async def _follow(self, watcher) -> None:
        async for entry in watcher:
            if entry is None:  # caught up with what the bucket held
                self._ready.set()
            elif entry.value is None or entry.operation in ("DEL", "PURGE"):
                self.values.pop(entry.key, None)
            else:
                old = self.values.get(entry.key)
                if old is None or old[1] < entry.revision:
                    self.values[entry.key] = (orjson.loads(entry.value), entry.revision)

    def get(self, key: str) -> tuple[dict | None, int | None]:
        value = self.values.get(key)
        return value if value else (None, None)

    def remember(self, key: str, value: dict, revision: int) -> None:
        """This process's own write, seen before the watch brings it back: the next read is not stale."""
        old = self.values.get(key)
        if old is None or old[1] < revision:
            self.values[key] = (value, revision)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()


# JetStream's error codes for replicas it cannot place: no suitable peers (fewer servers than replicas, or some away),
# insufficient resources, "replicas > 1 not supported in non-clustered mode"
REPLICAS_REFUSED = frozenset({10005, 10023, 10074})


def replicas_for(info: dict | None) -> int:
    """The replicas of every stream and bucket when CONTINUUM_STREAM_REPLICAS is unset, from the INFO the server sent
    on connecting (nats-py keeps it as `_server_info`). A server alone names no `cluster`: 1. A server of a cluster
    advertises, in `connect_urls`, the client URL of each server of the cluster it is routed to, its own among them:
    three or more, 3 (CLUSTER_REPLICAS). A cluster that advertises none (`no_advertise`), or a server that advertises
    several addresses of its own, is not counted right: set CONTINUUM_STREAM_REPLICAS there (docs/deploy.md)."""
    if not info or not info.get("cluster"):
        return 1
    servers = set(info.get("connect_urls") or ())
    return CLUSTER_REPLICAS if len(servers) >= CLUSTER_REPLICAS else 1


def connect_options(settings: Settings) -> dict[str, Any]:
    """How this process reaches NATS, as nats-py's `connect` takes it: the servers (a comma-separated list is a
    cluster), its principal's credentials, the CA that signed the server's certificate, and its own inbox."""
    if not settings.nats_url:
        raise ValueError("CONTINUUM_NATS_URL is not set and no running system was found (start one: continuum up)")
    servers = [url.strip() for url in settings.nats_url.split(",") if url.strip()]
    options: dict[str, Any] = {"servers": servers}
    if settings.nats_creds:
        if not settings.nats_creds.is_file():
            raise ValueError(f"CONTINUUM_NATS_CREDS: no file {settings.nats_creds}")
        key = "nkeys_seed" if settings.nats_creds.suffix == ".nk" else "user_credentials"
        options[key] = str(settings.nats_creds)
        if settings.principal:
            options["inbox_prefix"] = inbox_prefix(settings.principal)
    if settings.nats_ca or any(url.startswith("tls://") for url in servers):
        options["tls"] = ssl.create_default_context(cafile=str(settings.nats_ca) if settings.nats_ca else None)
    return options


async def connect(settings: Settings, **options: Any):
    """A plain nats-py client (the command line, tests) as this process's principal."""
    import nats

    return await nats.connect(**connect_options(settings), **options)


def create_bus(settings: Settings, service: str) -> Bus:
    """The broker factory: a NATS broker, and the names this deployment uses."""
    subjects = Subjects(settings.prefix)
    topology = Topology(subjects)
    options = connect_options(settings)
    # FastStream takes credentials and the TLS context as its security
    tls = options.pop("tls", None)
    if seed := options.pop("nkeys_seed", None):
        options["security"] = NatsNKey(seed, ssl_context=tls)
    elif creds := options.pop("user_credentials", None):
        options["security"] = NatsCredentials.from_file(creds, ssl_context=tls)
    elif tls:
        options["security"] = BaseSecurity(ssl_context=tls)
    broker = NatsBroker(
        **options,
        name=f"continuum-{service}",  # how nats-server's monitoring (/connz) names the connection
        logger=None,
        graceful_timeout=10.0,
        max_reconnect_attempts=-1,
    )
    return Bus(settings, service, broker, subjects, topology)


Hook = Callable[[], Awaitable[None]]


def create_app(bus: Bus, *, on_startup: tuple[Hook, ...] = (), after_startup: tuple[Hook, ...] = (),
               on_shutdown: tuple[Hook, ...] = ()) -> FastStream:
    # handlers stop first, and finish the messages in hand while what they use is still there; the service is
    # ready once all of it started (FastStream's own subscribers, capacity's heartbeats, start with the broker)
    app = FastStream(bus.broker, logger=None, after_startup=[*after_startup, bus.mark_serving],
                     on_shutdown=[bus.stop_handling, *on_shutdown])
    health.require("bus", bus.not_ready)

    @app.on_startup
    async def _topology() -> None:
        # streams must exist before the subscribers bind to them at broker start
        await bus.broker.connect()
        if bus.declares:
            await bus.ensure_topology()

    for hook in on_startup:  # after the topology: a hook may read a bucket
        app.on_startup(hook)
    app.on_startup(bus.start_handling)  # last: a handler may need what a hook set up (routing's mirrors)
    return app


def _payload(handler: Callable[..., Any]) -> TypeAdapter | None:
    """What a consumer's or responder's handler takes a message's body as: the type of its one parameter, if it
    takes one. Its annotations may be strings (`from __future__ import annotations`): resolved as Python would."""
    if not handler.__code__.co_argcount:
        return None
    return TypeAdapter(typing.get_type_hints(handler)[handler.__code__.co_varnames[0]])


def _bad_request(error: ValidationError) -> dict:
    """The reply to a request that is not what its responder takes: every problem, where it is."""
    return {"error": f"bad request: {_problems(error)}"}


def _problems(error: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())


async def request_json(bus_or_nc: Any, subject: str, body: Any, timeout: float = 5.0) -> dict:
    """A request from a plain client (CLI, tests): JSON in, JSON out, with a readable error."""
    try:
        reply = await bus_or_nc.request(subject, dumps(body), timeout=timeout)
    except NoRespondersError as e:
        raise RuntimeError(f"nothing serves {subject}: is the system up, and may these credentials send it? (a "
                           "tenant's reach only what a tenant may ask)") from e
    except NatsTimeout as e:
        raise RuntimeError(f"no reply on {subject} within {timeout} s") from e
    return orjson.loads(reply.data)
