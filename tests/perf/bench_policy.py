"""How long the placement policy takes to decide, for catalogs of 10, 100 and 1,000 sites.

    .venv/bin/python tests/perf/bench_policy.py [--decisions 2000]

Synthetic catalogs (seeded): a tenth public sites, the rest private or partner, in twelve EU countries,
each with two or three GPU types and random load; the jobs mix residencies, GPU types and objectives.
Prints the median and p99 of one `place()` call, which builds every site's candidate with its reasons.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

from services.routing.policy import Holding, SiteView, TenantBudget, place
from shared.contracts.catalog import SiteEntry, TenantEntry
from shared.contracts.jobs import JobSpec

COUNTRIES = ("FR", "DE", "NL", "PL", "IT", "SE", "ES", "BE", "AT", "FI", "DK", "IE")
TYPES = ("H100", "A100", "L40S", "L4")


def catalog(n: int, rng: random.Random) -> list[SiteView]:
    views = []
    for i in range(n):
        types = rng.sample(TYPES, rng.choice((2, 3)))
        gpus = {t: rng.choice((8, 16, 32, 64)) for t in types}
        public = i % 10 == 0
        entry = SiteEntry(id=f"site-{i:04d}", kind="public_hpc" if public else rng.choice(("private_cloud", "partner")),
                          country=rng.choice(COUNTRIES), jurisdiction="EU", carbon_g_per_kwh=rng.uniform(20, 800),
                          gpus=gpus,
                          price_eur_per_gpu_hour={t: 0.0 if public else rng.uniform(0.7, 3.5) for t in types},
                          certifications=rng.sample(["hds", "iso27001", "secnumcloud"], rng.randint(0, 2)),
                          overflow_share=0.5)
        free = {t: rng.randint(0, g) for t, g in gpus.items()}
        holdings = tuple(Holding(t, g - free[t], rng.uniform(0, 7200), rng.random() < 0.3)
                         for t, g in gpus.items() if g > free[t])
        views.append(SiteView(entry=entry, up=rng.random() > 0.05, free=free, carbon_g_per_kwh=entry.carbon_g_per_kwh,
                              holdings=holdings))
    return views


def jobs(k: int, rng: random.Random) -> list[JobSpec]:
    return [JobSpec(tenant="lab", command=["x"], walltime_s=rng.choice((600, 3600, 86400)),
                    resources={"gpus": rng.choice((1, 2, 4, 8)), "gpu_type": rng.choice((*TYPES, "any"))},
                    residency=rng.choice(("EU", "FR", "DE", "any")),
                    objective=rng.choice(("balanced", "cost", "carbon")),
                    certifications=rng.sample(["hds", "secnumcloud"], rng.randint(0, 1)))
            for _ in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=2000)
    args = parser.parse_args()
    tenant = TenantEntry(id="lab", allocation_gpu_hours=10_000, monthly_budget_eur=10_000, overflow_after_wait_s=1800)
    budget = TenantBudget(allocation_left_h=5_000, budget_left_eur=5_000)
    print(f"python {platform.python_version()} on {platform.machine()}, {args.decisions} decisions per size")
    print(f"{'sites':>6} {'median ms':>10} {'p99 ms':>8}")
    for n in (10, 100, 1000):
        rng = random.Random(n)
        views, specs = catalog(n, rng), jobs(args.decisions, rng)
        times = []
        for spec in specs:
            start = time.perf_counter()
            place(spec, tenant, views, budget)
            times.append((time.perf_counter() - start) * 1000)
        times.sort()
        print(f"{n:>6} {statistics.median(times):>10.3f} {times[int(len(times) * 0.99)]:>8.3f}")


if __name__ == "__main__":
    main()
