"""Several policies' replays side by side, a process each: one replay is one core's work, and a lab's
experiment asks for five. Each replay is the one it would be alone (deterministic), in whatever order they end.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime
from functools import partial
from multiprocessing import get_context
from queue import Empty, Queue

from services.replay.engine import Outcome, replay
from services.replay.traces import TraceJob
from shared.carbon import default_carbon
from shared.contracts.catalog import Catalog

Progress = Callable[[str, int], None]  # a policy, and how many of its jobs are dealt with
PROGRESS_EVERY_S = 0.2  # how often the progress of the replays running elsewhere is read


def replay_policies(jobs: list[TraceJob], catalog: Catalog, policies: list[str], start: datetime,
                    tenants: dict[str, str], gpu_type: str = "any", workers: int | None = None,
                    progress: Progress | None = None) -> dict[str, list[Outcome]]:
    """Every job's outcome under each policy, by policy in the order given. `workers`: how many replays run at
    once (default: one a core), each in its own process."""
    progress = progress or (lambda _policy, _done: None)
    workers = min(len(policies), workers or os.cpu_count() or 1)
    if workers <= 1:
        results = {}
        for name in policies:
            results[name] = replay(jobs, catalog, default_carbon(), name, start, tenants, partial(progress, name),
                                   gpu_type)
            progress(name, len(jobs))
        return results
    context = get_context("spawn")  # not fork: the caller may run threads (a progress bar's)
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
        ended = manager.Queue()
        running = {name: pool.submit(_replay, jobs, catalog, name, start, tenants, gpu_type, ended)
                   for name in policies}
        pending = set(running.values())
        while pending:
            done, pending = wait(pending, timeout=PROGRESS_EVERY_S, return_when=FIRST_COMPLETED)
            while True:
                try:
                    progress(*ended.get_nowait())
                except Empty:
                    break
            for name, future in running.items():
                if future in done:
                    progress(name, len(jobs))  # all dealt with, the jobs that never ran too
        return {name: future.result() for name, future in running.items()}


def _replay(jobs: list[TraceJob], catalog: Catalog, policy: str, start: datetime, tenants: dict[str, str],
            gpu_type: str, ended: Queue) -> list[Outcome]:
    return replay(jobs, catalog, default_carbon(), policy, start, tenants,
                  lambda done: ended.put((policy, done)), gpu_type)
