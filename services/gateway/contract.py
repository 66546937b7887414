"""The gateway's side of the bus: the contract's requests, sent as the HTTP request's principal, and the
event stream, read as that principal may see it. The gateway keeps nothing of its own: scaled by running more.

The NATS server keeps tenants apart for NATS clients; for HTTP clients the gateway sends a tenant's
requests on the same subjects a tenant's account reaches the services by (`<subject>.<tenant>`), so that
the services' own checks answer it: another tenant's job is "not found", as it is on NATS."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.gateway.principals import Principal
from shared.contracts.streams import Topology
from shared.contracts.subjects import Subjects

REQUEST_TIMEOUT_S = 5.0
# how long an event stream's consumer outlives a client gone without a word (the server then removes it)
FOLLOWER_IDLE_S = 30.0


class Unavailable(Exception):
    """The services did not answer (not up yet, or overloaded): worth trying again."""


class Refused(Exception):
    """The services answered with an error: something not found, a bad request, or a failure of theirs."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.not_found = message.startswith(("no job", "unknown tenant"))
        self.bad_request = message.startswith("bad request")


class Contract:
    def __init__(self, nc: Client, subjects: Subjects) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self.topology = Topology(subjects)

    async def ask(self, subject: str, body: Any, principal: Principal | None = None,
                  traceparent: str | None = None) -> dict:
        """The reply to a request, sent on the principal's own subject (None: the plain subject, for what every
        principal may ask alike). Refused when the reply is an error."""
        sent_on = principal.scoped(subject) if principal else subject
        try:
            msg = await self.nc.request(sent_on, orjson.dumps(body), timeout=REQUEST_TIMEOUT_S,
                                        headers={"traceparent": traceparent} if traceparent else None)
        except NoRespondersError:
            raise Unavailable(f"nothing serves {subject} yet: is the system up?") from None
        except NatsTimeout:
            raise Unavailable(f"no answer on {subject} within {REQUEST_TIMEOUT_S:g} s") from None
        reply = orjson.loads(msg.data)
        if isinstance(reply, dict) and "error" in reply:
            raise Refused(str(reply["error"]))
        return reply

    def visible_events(self, principal: Principal) -> list[str]:
        """The event subjects a principal may see: a tenant's own jobs and bills, and every site's events."""
        if principal.tenant is None:
            return [self.subjects.events_all]
        return [*self.subjects.tenant_events(principal.tenant), self.subjects.site_events_all]

    async def events(self, filters: list[str], after: int | None, batch: int = 64,
                     wait_s: float = 15.0) -> AsyncIterator[list[tuple[int, dict]]]:
        """The events on `filters` after stream sequence `after` (None: from now on), in stream order, batch
        after batch as (sequence, CloudEvent), forever. An empty batch first, the moment its consumer exists
        (nothing published from then on is missed: a caller can say the stream is open), and whenever nothing
        came for `wait_s` (a caller's chance to say it is alive). Its consumer lives as long as the caller reads."""
        name = f"gateway-{uuid.uuid4().hex}"
        start = ({"deliver_policy": DeliverPolicy.NEW} if after is None
                 else {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": after + 1})
        stream = self.topology.events_stream
        await self.js.add_consumer(stream, ConsumerConfig(
            name=name, filter_subjects=filters, ack_policy=AckPolicy.NONE, mem_storage=True,
            inactive_threshold=FOLLOWER_IDLE_S, **start))
        sub = await self.js.pull_subscribe_bind(stream=stream, name=name)
        try:
            yield []
            while True:
                try:
                    msgs = await sub.fetch(batch, timeout=wait_s)
                except TimeoutError:  # nats-py's own, or asyncio's from inside fetch
                    yield []
                    continue
                yield [(m.metadata.sequence.stream, orjson.loads(m.data)) for m in msgs]
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            with contextlib.suppress(Exception):  # its inactivity threshold removes it anyway
                await self.js.delete_consumer(stream, name)
