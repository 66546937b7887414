"""How far off the wait forecast is: a real GPU job trace replayed on a simulated site.

    .venv/bin/python tests/perf/bench_forecast.py [--gpus 48] [--speedup 5000] [--beat 60]

The trace: one week (6-12 November 2017) of virtual cluster 11cb48 of Microsoft's Philly cluster, 1,329 jobs
(tests/perf/data; see the README's "Data and attribution"). The site: the agents' real simulated backend
with `--gpus` H100, fed every job at its submit time and running it for its duration in the trace, all
`--speedup` times faster than real time. Philly records no requested walltime: each job asks the smallest of
1, 2, 4, 8, 12 hours, 1, 2, 3, 7, 14 or 30 days that covers twice its duration, as users round up.

Every `--beat` trace seconds the site's heartbeat goes to capacity's real SiteTracker, which forecasts each
job that arrived since (from the heartbeat before, as routing saw the site) and learns from each that
started. Each forecast is scored against the wait the job really had: the raw forecast (the queue run out at
full walltime) and the corrected one (the model learned until then). Figures are in trace time.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import platform
import statistics
from datetime import datetime
from pathlib import Path

from services.agent.backends.base import Outcome
from services.agent.backends.simulated import RUNTIME_LABEL, SimulatedBackend
from services.capacity.forecast import estimate
from services.capacity.view import SiteTracker
from shared.contracts.catalog import SiteEntry
from shared.contracts.events import utcnow
from shared.contracts.jobs import Dispatch, JobSpec
from shared.contracts.sites import Heartbeat

TRACE = Path(__file__).parent / "data" / "philly_vc11cb48_2017-11-06_week.csv"
HOUR, DAY = 3600, 86400
WALLTIMES = (HOUR, 2 * HOUR, 4 * HOUR, 8 * HOUR, 12 * HOUR, DAY, 2 * DAY, 3 * DAY, 7 * DAY, 14 * DAY, 30 * DAY)


def walltime_for(duration: float) -> int:
    return next((w for w in WALLTIMES if w >= 2 * duration), WALLTIMES[-1])


def trace(gpus: int) -> list[tuple[float, float, int]]:
    """(submit offset, duration, GPUs) of each job that fits the site, in submit order."""
    with TRACE.open(newline="") as f:
        rows = [(datetime.fromisoformat(r["timestamp"]), float(r["duration"]), int(r["num_gpus"]))
                for r in csv.DictReader(f)]
    start = rows[0][0]
    return [((t - start).total_seconds(), d, n) for t, d, n in rows if n <= gpus]


class Starts:
    """The site's reports: when each job started."""

    def __init__(self) -> None:
        self.at: dict[str, datetime] = {}

    async def started(self, order: Dispatch, at: datetime) -> None:
        self.at[order.job_id] = at

    async def ended(self, order: Dispatch, started_at: datetime | None, at: datetime, outcome: Outcome) -> None:
        pass


async def replay(args) -> dict[str, list[float]]:
    jobs = trace(args.gpus)
    site = SiteEntry(id="replay", kind="private_cloud", country="FR", jurisdiction="EU", carbon_g_per_kwh=0,
                     backend="simulated", gpus={"H100": args.gpus}, price_eur_per_gpu_hour={"H100": 1.0})
    starts = Starts()
    backend = SimulatedBackend(site, starts)
    tracker = SiteTracker(site)
    since = utcnow()
    forecast: dict[str, tuple[float, float]] = {}  # job -> (raw, corrected), in real seconds
    speedup = args.speedup

    def heartbeat() -> Heartbeat:
        # walltimes are in trace seconds; everything else the backend reports is already in real time
        return Heartbeat(site_id=site.id, time=utcnow(), interval_s=args.beat / speedup, gpus=backend.capacity(),
                         queued=len(backend.queue), running=sorted(backend.running), since=since,
                         jobs=[j.model_copy(update={"walltime_s": j.walltime_s / speedup}) for j in backend.jobs()])

    async def beats() -> None:
        while True:
            model = tracker.learner.model()
            for (job_id, _), raw in tracker.observe(heartbeat()).items():
                forecast[job_id] = (raw, estimate(model, raw))
            await asyncio.sleep(args.beat / speedup)

    beating = asyncio.create_task(beats())
    loop = asyncio.get_running_loop()
    arrived: dict[str, datetime] = {}
    t0 = loop.time()
    for i, (offset, duration, gpus) in enumerate(jobs):
        await asyncio.sleep(max(0.0, t0 + offset / speedup - loop.time()))
        spec = JobSpec(tenant="replay", command=["x"], walltime_s=walltime_for(duration),
                       resources={"gpus": gpus, "gpu_type": "H100"}, labels={RUNTIME_LABEL: str(duration / speedup)})
        await backend.submit(Dispatch(job_id=f"job-{i}", tenant="replay", site=site.id, gpu_type="H100", attempt=0,
                                spec=spec))
        arrived[f"job-{i}"] = backend.arrived[f"job-{i}"]
        if i % 200 == 0:
            print(f"  {i}/{len(jobs)} jobs submitted, {len(backend.queue)} queued", flush=True)
    while len(starts.at) < len(jobs):  # the last ones start (how long they run then does not matter)
        await asyncio.sleep(0.05)
    beating.cancel()
    await backend.close()

    out: dict[str, list[float]] = {"raw": [], "corrected": [], "actual": []}
    for job_id, (raw, corrected) in forecast.items():
        actual = (starts.at[job_id] - arrived[job_id]).total_seconds() * speedup
        out["actual"].append(actual)
        out["raw"].append(abs(raw * speedup - actual))
        out["corrected"].append(abs(corrected * speedup - actual))
    out["model"] = [tracker.learner.model()]
    out["jobs"] = [len(jobs)]
    return out


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=48, help="H100 at the site")
    parser.add_argument("--speedup", type=float, default=5000, help="trace seconds per real second")
    parser.add_argument("--beat", type=float, default=60, help="heartbeat interval, trace seconds")
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}; {TRACE.name}, {args.gpus} GPUs, "
          f"x{args.speedup:.0f}, a heartbeat every {args.beat:.0f} s")
    result = asyncio.run(replay(args))
    actual = result["actual"]
    waited = [a for a in actual if a > args.beat]
    print(f"\n{len(actual)} of {result['jobs'][0]} jobs forecast (the others came and went between two "
          f"heartbeats); {len(waited)} waited longer than a heartbeat, "
          f"median {statistics.median(waited or [0]) / 60:.1f} min, p90 {quantile(waited or [0], 0.9) / 60:.1f} min")
    print(f"real wait: mean {statistics.mean(actual) / 60:.1f} min, median {statistics.median(actual) / 60:.1f} min, "
          f"p90 {quantile(actual, 0.9) / 60:.1f} min")
    print(f"learned: {result['model'][0]}")
    print(f"\n{'absolute error (min)':<22} {'median':>8} {'p90':>8}   {'median':>8} {'p90':>8}")
    print(f"{'':<22} {'all jobs':>17}   {'jobs that waited':>17}")
    idx = [i for i, a in enumerate(actual) if a > args.beat]
    for name in ("raw", "corrected"):
        errors = result[name]
        some = [errors[i] for i in idx] or [0.0]
        print(f"{name + ' forecast':<22} {statistics.median(errors) / 60:>8.1f} {quantile(errors, 0.9) / 60:>8.1f}   "
              f"{statistics.median(some) / 60:>8.1f} {quantile(some, 0.9) / 60:>8.1f}")


if __name__ == "__main__":
    main()
