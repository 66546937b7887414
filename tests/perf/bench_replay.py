"""How fast `continuum replay` goes: 100,000 jobs through each policy (the research issue's aim: 60 s a policy).

    .venv/bin/python tests/perf/bench_replay.py [--jobs 100000] [--scale 4] [--policy NAME ...]

The jobs are the shipped Philly trace (82,247 jobs), then its first jobs again one trace length later, until
there are `--jobs`. The catalog is the demo's sites with every GPU count multiplied by `--scale` (the demo
has 160 GPUs; Philly's jobs keep about 370 busy on average: at scale 4 the continuum is loaded, not drowned)
and the research tenants (examples/research/tenants.yaml), the trace's users dealt out by seed 0. Prints the
seconds and jobs a second of each policy, with how many jobs waited at the longest line. Figures are in
docs/research.md, "Speed".
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from services.replay.engine import POLICIES, Replay
from services.replay.traces import read, tenant_of
from shared.carbon import default_carbon
from shared.contracts.catalog import Catalog

ROOT = Path(__file__).parents[2]


def trace(n: int):
    philly = read(ROOT / "shared" / "data" / "philly_gpu_jobs.csv")
    span = philly[-1].submit_s + 1
    jobs, lap = [], 0
    while len(jobs) < n:
        jobs += [replace(j, job_id=f"{j.job_id}-{lap}", submit_s=j.submit_s + lap * span) for j in philly]
        lap += 1
    return jobs[:n]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--policy", action="append", choices=POLICIES)
    args = parser.parse_args()
    demo = Catalog.load(None, ROOT / "examples" / "research" / "tenants.yaml")
    sites = {k: s.model_copy(update={"gpus": {t: n * args.scale for t, n in s.gpus.items()}})
             for k, s in demo.sites.items()}
    catalog = demo.model_copy(update={"sites": sites})
    jobs = trace(args.jobs)
    deal = {u: tenant_of(u, list(catalog.tenants)) for u in sorted({j.user for j in jobs})}
    print(f"python {platform.python_version()} on {platform.machine()}, {len(jobs):,} jobs, "
          f"{sum(sum(s.gpus.values()) for s in sites.values())} GPUs (scale {args.scale})")
    print(f"{'policy':>13}  {'seconds':>8}  {'jobs/s':>7}  {'ran':>7}  {'longest line':>12}")
    for name in args.policy or POLICIES:
        replay = Replay(catalog, default_carbon(), name, datetime(2022, 9, 4, tzinfo=UTC), deal)
        longest = 0

        def progress(_done: int, replay: Replay = replay) -> None:
            nonlocal longest
            longest = max(longest, len(replay.waiting))

        began = time.perf_counter()
        outcomes = replay.run(jobs, progress)
        took = time.perf_counter() - began
        ran = sum(o.site is not None for o in outcomes)
        print(f"{name:>13}  {took:8.1f}  {len(jobs) / took:7.0f}  {ran:7,}  {longest:12,}", flush=True)


if __name__ == "__main__":
    main()
