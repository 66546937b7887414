"""Outages: a site that went down, or whose agent restarted, gives back the jobs it holds; routing places them
again elsewhere."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime

import structlog
from faststream.exceptions import NackMessage

from services.routing import SERVICE, reservations
from services.routing.store import ReservationStore
from shared import telemetry
from shared.contracts.events import utcnow
from shared.contracts.jobs import JobEvent, JobEventData, JobRecord, JobState, StopJob
from shared.contracts.subjects import Subjects
from shared.stores import Documents, EventLog

log = structlog.get_logger()


class Outages:
    def __init__(self, store: ReservationStore, jobs: Documents, sites: Documents, events: EventLog,
                 subjects: Subjects, grace_s: float, clock: Callable[[], datetime] = utcnow) -> None:
        self.store, self.jobs, self.sites, self.events = store, jobs, sites, events
        self.subjects = subjects
        self.grace_s = grace_s  # how long a running job may be out of sight before it is placed again
        self.clock = clock

    async def site_down(self, site_id: str, down_since: datetime, first_look: bool) -> None:
        """Requeue the jobs of a site that went down: those that had not started at once, those running
        there once the grace period is over (unless the site came back first: then `site_up` decides)."""
        status = await self.sites.read(site_id)  # not the local copy: it may lag
        if status and status["state"] == "up" and datetime.fromisoformat(status["last_seen"]) > down_since:
            return
        waited = (self.clock() - down_since).total_seconds()
        # one more look soon in any case: a placement decided just before the site went down may land after
        look_again = 1.0 if first_look else None
        for record, _ in await self.jobs_at(site_id):
            if record.state in (JobState.placed, JobState.dispatched):
                await self.requeue(record, site_id, f"site {site_id} went down before the job started there")
            elif record.state == JobState.started and waited >= self.grace_s:
                await self.requeue(record, site_id, f"site {site_id} has been down for {waited:.0f} s "
                                                    f"(grace {self.grace_s:.0f} s) while the job ran there")
            elif record.state == JobState.started:
                look_again = min(look_again or math.inf, self.grace_s - waited)
            else:  # being placed there right now: look again once its placement is recorded
                look_again = min(look_again or math.inf, 1.0)
        if look_again is not None:
            raise NackMessage(delay=look_again)

    async def site_up(self, site_id: str, since: datetime | None, present: set[str]) -> None:
        """A site reports again: the jobs it was given before its agent (re)started and that it does not report
        having are gone with the old agent (the new one skips their dispatches): place them again."""
        if since is None:
            return
        for record, entered in await self.jobs_at(site_id):
            if record.state in (JobState.dispatched, JobState.started) and entered < since \
                    and record.job_id not in present:
                await self.requeue(record, site_id, f"site {site_id}'s agent restarted and lost the job")

    async def jobs_at(self, site_id: str) -> list[tuple[JobRecord, datetime]]:
        """The jobs whose current attempt holds GPUs at the site, with when they entered their state."""
        found = []
        for job_id, r in reservations.jobs(await self.store.read(site_id)).items():
            current = await self.jobs.read(job_id)
            if not current:
                continue
            record = JobRecord.model_validate(current)
            if record.state.terminal or record.attempt != r.attempt:
                continue  # its GPUs are on their way back
            entered = next((h.time for h in reversed(record.history) if h.state == record.state), self.clock())
            found.append((record, entered))
        return found

    async def requeue(self, record: JobRecord, site_id: str, reason: str) -> None:
        """Back to placement, elsewhere. The site is told first to stop the run without a report if it still
        has it (so that a crash in between cannot leave it running there)."""
        with telemetry.job_span(telemetry.SpanName.REQUEUE, record.traceparent, record.job_id, record.tenant,
                                **{telemetry.Attr.SITE: site_id, telemetry.Attr.REASON: reason}):
            await self.events.publish_command(self.subjects.stop(site_id),
                                              StopJob(job_id=record.job_id, reason=reason, superseded=True,
                                                      attempt=record.attempt),
                                              msg_id=f"{record.job_id}.superseded.{record.attempt}")
            # the id is the attempt being left, as an agent's requeue has: one event whoever sends it
            event = JobEvent.of(SERVICE, JobEventData(
                job_id=record.job_id, tenant=record.tenant, state=JobState.requeued, site=site_id,
                attempt=record.attempt + 1, reason=reason), record.attempt)
            await self.events.publish_event(self.subjects.job_event(record.tenant, record.job_id, "requeued"), event)
        log.warning("job.requeued", job_id=record.job_id, tenant=record.tenant, site=site_id, reason=reason)
