"""When a job joining a queue starts, if every job before it runs to its walltime. Pure.

The one estimate of a wait that both capacity (a site's own queue, from its heartbeats) and routing's policy
(the jobs waiting in routing's line for a site) run: the queue is served strictly first come, first served,
each job taking its GPUs as soon as enough of its type are free and holding them for its whole walltime. An
upper bound where sites backfill and jobs end early; capacity learns a correction for that (WaitLearner).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping

Running = tuple[str, int, float]  # GPU type, GPUs, seconds until its walltime is over
Queued = tuple[str, int, float]  # GPU type, GPUs, walltime in seconds


def run_out(free: Mapping[str, int], running: Iterable[Running], queue: Iterable[Queued], gpu_type: str,
            gpus: int) -> float:
    """Seconds until a job of `gpus` GPUs of the type, joining the queue now, starts (inf: never, there are
    not that many)."""
    free = dict(free)
    ends = [(left, t, n) for t, n, left in running]
    heapq.heapify(ends)
    now = 0.0
    for t, n, walltime in (*queue, (gpu_type, gpus, None)):
        while free.get(t, 0) < n:
            if not ends:
                return math.inf
            at, t_end, n_end = heapq.heappop(ends)
            now = max(now, at)
            free[t_end] = free.get(t_end, 0) + n_end
        if walltime is None:
            return now
        free[t] -= n
        heapq.heappush(ends, (now + walltime, t, n))
    return now  # unreachable: the loop returns at the job itself
