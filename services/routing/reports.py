"""What a site may say about a job: `unacceptable` (pure) says why a site's report must not become a contract
event, given where the job was dispatched; `ReportGate` applies it to the reports stream.

A site agent does not publish job events itself: it reports on `continuum.reports.<site>.<tenant>.<job_id>.<kind>`
(the NATS server lets a site's principal publish only under its own site), with the dispatch attempt it
reports on, and routing, which dispatched the job, publishes the report as the contract event when the job
was dispatched to that very site at that attempt. Anything else changes nothing and is dead-lettered with the
reason: a site cannot end, start or requeue another site's job, nor one it no longer runs.
"""

from __future__ import annotations

import asyncio

import structlog
from faststream.exceptions import NackMessage

from shared.bus import Bus, Unacceptable
from shared.contracts.events import event_id
from shared.contracts.jobs import JobEvent, JobState

log = structlog.get_logger()
# a site's report whose previous report is not an event yet is handed back, for 50 ms, then longer, up to 1 s,
# at most this many times: about 50 s, past twice the ack wait of a replica that died holding the previous one
# (then it goes out all the same: order is worth a wait, not a job's end)
REPORT_WAIT_S = 0.05
REPORT_WAIT_TRIES = 60

# what a site reports: the run's steps and ends, and giving the job back
SITE_KINDS = frozenset({JobState.dispatched, JobState.started, JobState.succeeded, JobState.failed,
                        JobState.cancelled, JobState.requeued})
STEPS = frozenset({JobState.dispatched, JobState.started})


def unacceptable(site: str, tenant: str, job_id: str, kind: str, attempt: int, event: JobEvent,
                 placements: list[tuple[str, int]]) -> str | None:
    """Why the site's report must not become an event; `placements` are the job's (site, attempt), its latest
    first (from the event stream), then its earlier ones (from the registry)."""
    if kind not in SITE_KINDS:
        return f"a site does not report {kind!r}"
    data = event.data
    if (event.subject, event.kind, data.job_id, data.tenant, data.site) != (job_id, kind, job_id, tenant, site):
        return "the report's body does not match its subject (job, tenant, kind and site)"
    # the attempt the registry will read is the one reported on (a requeue names the next): named, not implied
    if not data.gives("attempt") or data.attempt != attempt + (1 if kind == JobState.requeued else 0):
        return "the report's attempt is not the one it reports on"
    # the id a report of this job, kind and attempt has; a cancel the site records for a job it never had has
    # the id intake's own would have, so that the two are one event
    ids = {event_id("job", job_id, kind, job_id, attempt)}
    if kind == JobState.cancelled:
        ids.add(event_id("job", job_id, kind, job_id))
    if event.id not in ids:
        return "the report's id is not that of this job, kind and attempt"
    if not placements:
        return f"job {job_id} of tenant {tenant} was never dispatched"
    latest = placements[0]
    # a run's steps may come late from a site the job left (they change nothing), never its end or its return
    if (site, attempt) == latest or ((site, attempt) in placements and kind in STEPS):
        return None
    where = ", ".join(f"{s} (attempt {a})" for s, a in sorted(set(placements), key=lambda p: p[1]))
    return f"site {site} reported {kind} on job {job_id} at attempt {attempt}, which was dispatched to {where}"


class ReportGate:
    """Routing's side of sites' reports: it dispatched the jobs, so it vouches for what sites say of them."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.lines: dict[str, _Line] = {}  # reports being vouched for, a line per job
        self.vouched: dict[tuple[str, int, str], None] = {}  # the last ones vouched for: (job, attempt, kind)

    async def vouch(self, subject: str, event: JobEvent, attempt: int, after: str | None, tries: int) -> None:
        """A site's report becomes the job's event if the job was dispatched to that site at that attempt; any
        other is dead-lettered with the reason, and changes nothing. A report comes out after the one the site
        sent before it (a replica's reports of a job wait in line here; one whose predecessor another replica
        holds is handed back a moment)."""
        parts = self.bus.subjects.report_of(subject)
        assert parts is not None  # the stream takes no other shape
        site, tenant, job_id, kind = parts
        async with self.lines.setdefault(job_id, _Line()) as line:
            try:
                placements = await self.placements(tenant, job_id, site, attempt)
                problem = unacceptable(site, tenant, job_id, kind, attempt, event, placements)
                if problem:
                    log.warning("report.refused", site=site, job_id=job_id, kind=kind, reason=problem)
                    raise Unacceptable(f"report refused: {problem}")
                if after and (job_id, attempt, after) not in self.vouched and tries < REPORT_WAIT_TRIES:
                    earlier = await self.bus.last_job_event(tenant, job_id, after)
                    if not earlier or earlier.attempt < attempt:
                        raise NackMessage(delay=min(1.0, REPORT_WAIT_S * tries))
                await self.bus.publish_event(self.bus.subjects.job_event(tenant, job_id, kind), event,
                                             self.bus.traceparent())
                self.vouched[(job_id, attempt, kind)] = None
                while len(self.vouched) > 10_000:
                    self.vouched.pop(next(iter(self.vouched)))
            finally:
                if not line.waiting:
                    self.lines.pop(job_id, None)

    async def placements(self, tenant: str, job_id: str, site: str, attempt: int) -> list[tuple[str, int]]:
        """Where the job was dispatched, at which attempts: its latest placement from the event stream, and its
        earlier ones from the registry when the report is not about the latest."""
        placed = await self.bus.last_job_event(tenant, job_id, JobState.placed.value)
        found = [(placed.site, placed.attempt)] if placed and placed.site else []
        if (site, attempt) not in found:
            current, _ = await self.bus.get_json(self.bus.topology.jobs_bucket, job_id)
            if current and current["tenant"] == tenant:
                found += [(h["site"], int(h.get("attempt", 0))) for h in current["history"]
                          if h["state"] == JobState.placed and h.get("site")]
        return found


class _Line:
    """A lock that knows whether anyone waits for it: the reports of one job, vouched for one at a time, in the
    order they came (asyncio's lock serves its waiters first come, first served)."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.waiting = 0

    async def __aenter__(self) -> _Line:
        self.waiting += 1
        await self.lock.acquire()
        self.waiting -= 1
        return self

    async def __aexit__(self, *_: object) -> None:
        self.lock.release()
