"""What every slot-based backend shares: GPUs by type as numbered slots, a FIFO queue when they are full."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import structlog

from shared.contracts.catalog import SiteEntry
from shared.contracts.events import utcnow
from shared.contracts.jobs import Dispatch
from shared.contracts.sites import GpuCount

log = structlog.get_logger()


@dataclass(frozen=True)
class Outcome:
    """How a run ended: an exit code, or a reason when the process never gave one."""

    exit_code: int | None
    reason: str | None = None
    cancelled: bool = False
    requeue: bool = False  # the site let the job go (its agent stopped): place it again


class Reports(Protocol):
    async def started(self, order: Dispatch, at: datetime) -> None: ...

    async def ended(self, order: Dispatch, started_at: datetime | None, at: datetime, outcome: Outcome) -> None: ...


class Backend(ABC):
    """Runs dispatched jobs on the site's GPUs, first come first served."""

    def __init__(self, site: SiteEntry, reports: Reports) -> None:
        self.site = site
        self.reports = reports
        self.free_slots: dict[str, list[int]] = {t: list(range(n)) for t, n in site.gpus.items()}
        self.queue: deque[Dispatch] = deque()
        self.running: dict[str, asyncio.Task] = {}
        self.known: set[str] = set()
        self.waited_total = 0
        self.stopping = False

    @abstractmethod
    async def run(self, order: Dispatch, slots: list[int]) -> Outcome:
        """Run the job on these GPU slots until it ends; cancelling the task stops the job."""

    def submit(self, order: Dispatch) -> bool:
        """Take the order; False if this job is known already (a redelivered dispatch)."""
        if order.job_id in self.known:
            return False
        self.known.add(order.job_id)
        self.queue.append(order)
        self._start_what_fits()
        if self.queue and self.queue[-1] is order:
            self.waited_total += 1
        return True

    async def cancel(self, job_id: str, reason: str) -> bool:
        """Stop the job wherever it is; False if this backend does not have it."""
        for order in list(self.queue):
            if order.job_id == job_id:
                self.queue.remove(order)
                await self.reports.ended(order, None, utcnow(), Outcome(None, reason, cancelled=True))
                return True
        task = self.running.get(job_id)
        if task is None:
            return False
        task.cancel(reason)
        return True

    def capacity(self) -> dict[str, GpuCount]:
        return {t: GpuCount(total=self.site.gpus[t], free=len(s)) for t, s in self.free_slots.items()}

    async def close(self) -> None:
        """Stop every job and give it back for placement elsewhere: a restart must not cancel users' work."""
        self.stopping = True
        while self.queue:
            order = self.queue.popleft()
            await self.reports.ended(order, None, utcnow(), Outcome(None, "site agent stopped", requeue=True))
        for task in list(self.running.values()):
            task.cancel("site agent stopped")
        await asyncio.gather(*self.running.values(), return_exceptions=True)

    def _start_what_fits(self) -> None:
        # strict FIFO: a big job at the head is not overtaken by small ones behind it
        while self.queue:
            order = self.queue[0]
            need = order.spec.resources.total_gpus
            slots = self.free_slots.get(order.gpu_type, [])
            if need > len(slots):
                return
            self.queue.popleft()
            taken = slots[:need]
            if need:  # a job without GPUs holds no slot
                self.free_slots[order.gpu_type] = slots[need:]
            self.running[order.job_id] = asyncio.create_task(self._run(order, taken), name=order.job_id)

    async def _run(self, order: Dispatch, slots: list[int]) -> None:
        started_at = utcnow()
        try:
            await self.reports.started(order, started_at)
            outcome = await self.run(order, slots)
        except asyncio.CancelledError as e:
            reason = str(e.args[0]) if e.args else "cancelled"
            outcome = Outcome(None, reason, requeue=True) if self.stopping else Outcome(None, reason, cancelled=True)
        except Exception as e:
            log.exception("job.run_failed", job_id=order.job_id, site=self.site.id)
            outcome = Outcome(None, f"{type(e).__name__}: {e}")
        finally:
            if slots:
                self.free_slots[order.gpu_type] = sorted(self.free_slots[order.gpu_type] + slots)
            self.running.pop(order.job_id, None)
        try:
            await self.reports.ended(order, started_at, utcnow(), outcome)
        finally:
            if not self.stopping:
                self._start_what_fits()
