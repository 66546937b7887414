"""How long a job will wait at a site before it starts. Pure.

The raw forecast runs the site's queue out in its own order (strict first come, first served, as the
agents' backends and a Slurm without backfill do), every running or started job holding its GPUs until its
walltime is over. That is an upper bound: most jobs end well before their walltime, and a site also takes
some time to start a job on free GPUs. `WaitLearner` corrects both from what the site actually did: for
every job that started, the raw forecast when it arrived against the wait it really had.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from shared.contracts.sites import Heartbeat, SiteJob, WaitModel
from shared.queueing import run_out

# how many observed waits the correction is learned from: the latest ones, so it follows the site's load
WINDOW = 200
# the correction's bounds: a raw forecast is never scaled to nothing, nor much beyond its walltime bound
FACTOR_RANGE = (0.05, 1.5)


@dataclass(frozen=True)
class Load:
    """A site at one instant: free GPUs by type, running jobs as (type, GPUs, seconds until their walltime
    ends), and the queue as (type, GPUs, walltime) in start order."""

    free: dict[str, int]
    running: tuple[tuple[str, int, float], ...] = ()
    queue: tuple[tuple[str, int, float], ...] = ()

    @classmethod
    def of(cls, beat: Heartbeat) -> Load:
        running, queue = [], []
        for job in beat.jobs:
            if job.started_at is None:
                queue.append((job.gpu_type, job.gpus, job.walltime_s))
            else:
                elapsed = (beat.time - job.started_at).total_seconds()
                running.append((job.gpu_type, job.gpus, max(0.0, job.walltime_s - elapsed)))
        return cls({t: g.free for t, g in beat.gpus.items()}, tuple(running), tuple(queue))

    def later(self, seconds: float, arrivals: Iterable[SiteJob] = ()) -> Load:
        """The same site `seconds` on (running jobs nearer their end), with jobs that arrived meanwhile queued."""
        running = tuple((t, n, max(0.0, left - seconds)) for t, n, left in self.running)
        queue = self.queue + tuple((j.gpu_type, j.gpus, j.walltime_s) for j in arrivals)
        return Load(self.free, running, queue)


def raw_wait(load: Load, gpu_type: str, gpus: int) -> float:
    """Seconds until a job of `gpus` GPUs of the type, joining the queue now, starts (inf: never, the site
    has not that many)."""
    return run_out(load.free, load.running, load.queue, gpu_type, gpus)


class WaitLearner:
    """Learns a site's WaitModel from (raw forecast at arrival, real wait) pairs."""

    def __init__(self, prior: WaitModel | None = None, window: int = WINDOW) -> None:
        self.prior = prior or WaitModel()
        self.samples: deque[tuple[float, float]] = deque(maxlen=window)

    def observe(self, raw_s: float, actual_s: float) -> None:
        if math.isfinite(raw_s):
            self.samples.append((raw_s, max(0.0, actual_s)))

    def model(self) -> WaitModel:
        # jobs forecast to start at once show the site's own start latency
        immediate = [actual for raw, actual in self.samples if raw == 0]
        latency = statistics.median(immediate) if immediate else self.prior.start_latency_s
        ratios = [(actual - latency) / raw for raw, actual in self.samples if raw > 0]
        factor = statistics.median(ratios) if ratios else self.prior.walltime_factor
        low, high = FACTOR_RANGE
        return WaitModel(start_latency_s=round(latency, 3), walltime_factor=round(min(high, max(low, factor)), 4),
                         samples=len(self.samples))


def estimate(model: WaitModel, raw_s: float) -> float:
    return model.start_latency_s + model.walltime_factor * raw_s if math.isfinite(raw_s) else math.inf
