"""When a job joining a queue starts, if every job before it runs to its walltime. Pure.

The one estimate of a wait that both capacity (a site's own queue, from its heartbeats) and routing's policy
(the jobs waiting in routing's line for a site) run: the queue is served strictly first come, first served,
each job taking its GPUs as soon as enough of its type are free and holding them for its whole walltime. An
upper bound where sites backfill and jobs end early; capacity learns a correction for that (WaitLearner).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Running = tuple[str, int, float]  # GPU type, GPUs, seconds until its walltime is over
Queued = tuple[str, int, float]  # GPU type, GPUs, walltime in seconds


def run_out(free: Mapping[str, int], running: Iterable[Running], queue: Iterable[Queued], gpu_type: str,
            gpus: int, elapsed_s: float = 0.0) -> float:
    """Seconds until a job of `gpus` GPUs of the type, joining the queue now, starts (inf: never, there are
    not that many). `elapsed_s`: how long ago the running jobs' seconds were counted (a caller that keeps
    them while its clock moves, as the replay does, need not count them again)."""
    return drain(free, running, queue, elapsed_s).start(gpu_type, gpus, elapsed_s) - elapsed_s


End = tuple[float, str, int]  # when a job's GPUs come back (seconds, counted as the running jobs were), type, GPUs


@dataclass(frozen=True)
class Drained:
    """A queue once every job in it has started: the GPUs still free, the ends of the jobs holding the others
    (in order: a sorted list, so that a start is read off them without a copy) and when the last one started,
    all counted as the running jobs were.

    A caller may keep it while its clock moves and nothing else changes, and ask it when more jobs behind the
    queue start, if `timeless`: no job of the queue started at the clock it was drained at (each waited for
    an end), so none of it depends on that clock."""

    free: dict[str, int]
    ends: list[End]
    now: float
    timeless: bool
    _starts: dict[tuple[str, int], float] = field(default_factory=dict, compare=False, repr=False)

    def start(self, gpu_type: str, gpus: int, clock_s: float) -> float:
        """When a job of `gpus` GPUs of the type, joining behind the queue at `clock_s`, starts (inf: never)."""
        if (gpu_type, gpus) not in self._starts:  # at the latest of the queue's last start and the ends it needs
            have, at = self.free.get(gpu_type, 0), self.now
            if have < gpus:
                for end, t, n in self.ends:  # the ends in order, as few as it takes
                    if t == gpu_type:
                        have, at = have + n, max(at, end)
                        if have >= gpus:
                            break
            self._starts[(gpu_type, gpus)] = at if have >= gpus else math.inf
        return max(self._starts[(gpu_type, gpus)], clock_s)

    def then(self, queue: Iterable[Queued], clock_s: float) -> Drained:
        """This queue with more jobs behind it, all started: as `drain` of the whole would be at `clock_s`, if
        this one may be kept at that clock (it was drained at it, or it is timeless and nothing changed)."""
        if self.now == math.inf:
            return self
        return _drain(dict(self.free), list(self.ends), queue, max(self.now, clock_s), clock_s, self.timeless)


def holding(free: Mapping[str, int], ends: Iterable[End], clock_s: float = 0.0) -> Drained:
    """Nothing queued: the GPUs free and the running jobs' ends (in order), for a caller that keeps them in order
    as jobs start and end (the replay) and runs its queue on from here (`Drained.then`)."""
    return Drained(dict(free), list(ends), clock_s, True)


def drain(free: Mapping[str, int], running: Iterable[Running], queue: Iterable[Queued],
          clock_s: float = 0.0) -> Drained:
    """Start the queue's jobs in order, each as soon as enough GPUs of its type are free, from `clock_s` (in
    the running jobs' count: one that should have ended already gives its GPUs back at once)."""
    return _drain(dict(free), sorted((left, t, n) for t, n, left in running), queue, clock_s, clock_s, True)


def _drain(free: dict[str, int], ends: list[End], queue: Iterable[Queued], now: float, clock_s: float,
           timeless: bool) -> Drained:
    insort, last = bisect.insort, len(ends)  # bound once: the replay runs out lines of 128 jobs thousands of times
    gone = 0  # the ends before this one have given their GPUs back
    for t, n, walltime in queue:
        have = free.get(t, 0)
        while have < n:
            if gone == last:  # no site has that many: nothing behind it starts either
                return Drained({}, [], math.inf, True)
            at, t_end, n_end = ends[gone]
            gone += 1
            if at > now:
                now = at
            if t_end == t:
                have += n_end
            else:
                free[t_end] = free.get(t_end, 0) + n_end
        if now == clock_s:
            timeless = False
        free[t] = have - n
        insort(ends, (now + walltime, t, n), lo=gone)
        last += 1
    del ends[:gone]
    return Drained(free, ends, now, timeless)
