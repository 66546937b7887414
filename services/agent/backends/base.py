"""What every backend shares with the agent: the surface it holds a site by (`SiteBackend`), how a run ends
(`Outcome`, with the outputs it leaves: `with_outputs`), how it is reported (`Reports`) and how a site refuses a
job (`SubmitError`). Then what the
slot-based backends share: GPUs by type as numbered slots, a FIFO queue when they are full (`SlotBackend`)."""

from __future__ import annotations

import asyncio
import contextvars
import heapq
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Collection
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import structlog

from services.agent.staging import stage_out
from shared.contracts.catalog import SiteEntry
from shared.contracts.events import utcnow
from shared.contracts.jobs import Dispatch
from shared.contracts.sites import GpuCount, SiteJob

log = structlog.get_logger()


@dataclass(frozen=True)
class Outcome:
    """How a run ended: an exit code, or a reason when the process never gave one."""

    exit_code: int | None
    reason: str | None = None
    cancelled: bool = False
    requeue: bool = False  # the site let the job go (its agent stopped): place it again


# what a site sets in a job's environment, whatever the job's steps say (a step's env adds to the rest)
SITE_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "CONTINUUM_JOB_ID"})


async def with_outputs(order: Dispatch, root: str, outcome: Outcome) -> Outcome:
    """The job's outputs copied to their URLs once its steps are over (staging.stage_out, in a thread), and how
    the run ended then: a job that succeeded but left one missing fails with the reason (no exit code: its steps
    did their part); one that failed keeps its exit code, whatever it left."""
    problems = await asyncio.to_thread(stage_out, order.spec, root)
    if not problems:
        return outcome
    if outcome.exit_code == 0:
        return Outcome(None, f"cannot stage the job's outputs: {'; '.join(problems)}")
    log.info("job.outputs_missing", job_id=order.job_id, exit_code=outcome.exit_code, problems=problems)
    return outcome


class Reports(Protocol):
    async def started(self, order: Dispatch, at: datetime) -> None: ...

    async def ended(self, order: Dispatch, started_at: datetime | None, at: datetime, outcome: Outcome) -> None: ...

    def left(self, order: Dispatch, at: datetime, outcome: str) -> None:
        """The run ended without a report: the job had moved to another site."""


class SubmitError(Exception):
    """The site refused the job, in its own words. `permanent` when asking again cannot help (the job asks for
    what the site does not have, or names an account, partition or QOS it does not know); otherwise the site's
    scheduler was busy or out of reach, and a later try may go through."""

    def __init__(self, words: str, permanent: bool) -> None:
        super().__init__(words)
        self.permanent = permanent


class SiteBackend(Protocol):
    """How the agent runs a site, whichever backend it is (the slot backends below, or Slurm): the agent holds
    it by nothing else. It reports each job's start and end through `Reports`."""

    @property
    def known(self) -> AbstractSet[str]:
        """The jobs held here, queued or running: a dispatch of one of them is a redelivery."""

    @property
    def running(self) -> Collection[str]:
        """The ids of the jobs running here."""

    @property
    def waited_total(self) -> int:
        """Dispatches that found their GPUs busy since the agent started (the site was over-committed)."""

    async def start(self) -> None:
        """Called once the agent is connected (a backend whose jobs outlive the agent takes them back)."""

    async def submit(self, order: Dispatch) -> bool:
        """Take the order (False if it is held here already: a redelivery); SubmitError if the site refuses it."""

    async def cancel(self, job_id: str, reason: str, superseded: bool = False, attempt: int | None = None) -> bool:
        """Stop the job, its end reported unless `superseded`; False if it is not here (or not at that attempt)."""

    def capacity(self) -> dict[str, GpuCount]:
        """GPUs by catalog type: how many, how many are free, and how many the site's queue waits for."""

    def queued(self) -> int:
        """How many jobs wait in the site's queue (on a shared cluster, others' too)."""

    def jobs(self) -> list[SiteJob]:
        """Every job at the site (on a shared cluster, others' too): queued ones in start order, then running."""

    async def close(self) -> None:
        """Let go of every job, cancelling none: each is placed again, or runs on for the next agent to take."""


class SlotBackend(ABC):
    """Runs dispatched jobs on the site's GPUs, numbered slots of each type, first come first served."""

    def __init__(self, site: SiteEntry, reports: Reports) -> None:
        self.site = site
        self.reports = reports
        # a heap per GPU type: a job takes the lowest-numbered free slots, in O(log n) however large the site
        self.free_slots: dict[str, list[int]] = {t: list(range(n)) for t, n in site.gpus.items()}
        self.queue: deque[Dispatch] = deque()
        self.running: dict[str, asyncio.Task] = {}
        self.known: set[str] = set()
        self.waited_total = 0
        self.stopping = False
        # when each job arrived and started here, for the heartbeat's job list
        self.arrived: dict[str, datetime] = {}
        self.started: dict[str, tuple[Dispatch, datetime]] = {}
        # runs moved to another site while this one was down: they end without a report
        self.superseded: set[str] = set()
        self.stop_reasons: dict[str, str] = {}
        self.watchers: set[asyncio.Task] = set()

    @abstractmethod
    async def run(self, order: Dispatch, slots: list[int]) -> Outcome:
        """Run the job on these GPU slots until it ends; cancelling the task stops the job (its clean-up
        must then finish before the cancellation propagates)."""

    async def start(self) -> None:  # noqa: B027 - a hook that does nothing unless a backend needs it
        """Called once the agent is connected (a backend whose jobs outlive the agent takes them back)."""

    def queued(self) -> int:
        return len(self.queue)

    async def submit(self, order: Dispatch) -> bool:
        """Take the order; False if this job is known already (a redelivered dispatch)."""
        if order.job_id in self.known:
            return False
        self.known.add(order.job_id)
        self.arrived[order.job_id] = utcnow()
        self.queue.append(order)
        self._start_what_fits()
        if self.queue and self.queue[-1] is order:
            self.waited_total += 1
        return True

    async def cancel(self, job_id: str, reason: str, superseded: bool = False, attempt: int | None = None) -> bool:
        """Stop the job wherever it is (without reporting it, if `superseded`); False if it is not here (or
        not at that attempt)."""
        for order in list(self.queue):
            if order.job_id == job_id and attempt in (None, order.attempt):
                self.queue.remove(order)
                self._forget(job_id)
                if not superseded:
                    await self.reports.ended(order, None, utcnow(), Outcome(None, reason, cancelled=True))
                return True
        task = self.running.get(job_id)
        if task is None or attempt not in (None, self.started[job_id][0].attempt):
            return False
        if superseded:
            self.superseded.add(job_id)
        self.stop_reasons[job_id] = reason
        task.cancel(reason)
        return True

    def _forget(self, job_id: str) -> None:
        """The job has left this site: a later dispatch of it (a new attempt) is a new job here."""
        self.known.discard(job_id)
        self.arrived.pop(job_id, None)

    def capacity(self) -> dict[str, GpuCount]:
        wanted: dict[str, int] = {}
        for order in self.queue:
            wanted[order.gpu_type] = wanted.get(order.gpu_type, 0) + order.spec.resources.total_gpus
        return {t: GpuCount(total=n, free=len(self.free_slots[t]), reserved=wanted.get(t, 0))
                for t, n in self.site.gpus.items()}

    def jobs(self) -> list[SiteJob]:
        """Every job here: the queue in start order, then the running ones."""
        def entry(order: Dispatch, started_at: datetime | None) -> SiteJob:
            return SiteJob(job_id=order.job_id, attempt=order.attempt, gpu_type=order.gpu_type,
                           gpus=order.spec.resources.total_gpus, walltime_s=order.spec.walltime_s,
                           queued_at=self.arrived.get(order.job_id, started_at or utcnow()), started_at=started_at)
        return [entry(o, None) for o in self.queue] + [entry(o, at) for o, at in self.started.values()]

    async def close(self) -> None:
        """Stop every job and give it back for placement elsewhere: a restart must not cancel users' work."""
        self.stopping = True
        while self.queue:
            order = self.queue.popleft()
            await self.reports.ended(order, None, utcnow(), Outcome(None, "site agent stopped", requeue=True))
        for job_id, task in list(self.running.items()):
            self.stop_reasons[job_id] = "site agent stopped"
            task.cancel("site agent stopped")
        await asyncio.gather(*self.watchers, return_exceptions=True)

    def _start_what_fits(self) -> None:
        # strict FIFO: a big job at the head is not overtaken by small ones behind it
        while self.queue:
            order = self.queue[0]
            need = order.spec.resources.total_gpus
            slots = self.free_slots.get(order.gpu_type, [])
            if need > len(slots):
                return
            self.queue.popleft()
            taken = [heapq.heappop(slots) for _ in range(need)]  # a job without GPUs holds no slot
            self.started[order.job_id] = (order, utcnow())
            # the run is a task of its own, so that cancelling it (even before it began) still ends in _watch;
            # both start from an empty context, not that of whichever job's end made room for this one (the
            # agent puts each report in its own job's trace)
            run = asyncio.create_task(self.run(order, taken), name=order.job_id, context=contextvars.Context())
            self.running[order.job_id] = run
            watch = asyncio.create_task(self._watch(order, taken, run), name=f"{order.job_id}.watch",
                                        context=contextvars.Context())
            self.watchers.add(watch)
            watch.add_done_callback(self.watchers.discard)

    async def _watch(self, order: Dispatch, slots: list[int], run: asyncio.Task) -> None:
        started_at = self.started[order.job_id][1]
        try:
            await self.reports.started(order, started_at)
            outcome = await run
        except asyncio.CancelledError:
            reason = self.stop_reasons.pop(order.job_id, "cancelled")
            outcome = Outcome(None, reason, requeue=True) if self.stopping else Outcome(None, reason, cancelled=True)
        except Exception as e:
            log.exception("job.run_failed", job_id=order.job_id, site=self.site.id)
            outcome = Outcome(None, f"{type(e).__name__}: {e}")
        finally:
            if not run.done():  # the start could not be reported: the run must not outlive its GPUs
                run.cancel("its start could not be reported")
                await asyncio.gather(run, return_exceptions=True)
            for slot in slots:
                heapq.heappush(self.free_slots[order.gpu_type], slot)
            self.running.pop(order.job_id, None)
            self.started.pop(order.job_id, None)
        try:
            if order.job_id in self.superseded:
                self.superseded.discard(order.job_id)
                self.reports.left(order, utcnow(), "superseded")
                return
            await self.reports.ended(order, started_at, utcnow(), outcome)
        finally:
            self._forget(order.job_id)  # once its end is out, so a redelivered dispatch finds it over
            if not self.stopping:
                self._start_what_fits()
