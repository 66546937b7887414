"""The index of jobs (services/gateway/index.py): how fast it folds the event stream in, and how long a page of
50 jobs takes for each filter, first and deep, on SQLite and (when it is there) PostgreSQL.

    .venv/bin/python tests/perf/bench_jobs_index.py [--jobs 10000 --jobs 100000] [--postgres URL]

Synthetic jobs (seeded), as the stream carries them: eight tenants of uneven size (the largest a third of the
jobs), eight sites, every placement's decision with a candidate for each site; most jobs run to their end,
some are still waiting or running, some fail, are cancelled or refused. The events of jobs that overlap in time
are interleaved, and applied in the follower's batches (256 events). Fill rate: events a second through
`apply` alone (parsing the stream's bodies into JobEvents is measured apart). Pages: `page(limit=50)` in the
process, records decoded; the first page of each query 100 times, then every page of it (up to 300) by token.
docs/performance.md ("The index of jobs") has the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from services.gateway.index import JobsIndex
from shared.contracts.jobs import Candidate, Decision, JobEvent, JobEventData, JobSpec, JobState

T0 = datetime(2026, 1, 5, tzinfo=UTC)
TENANTS = ("cnrs-lab", "inria-ai", "sorbonne", "startup-a", "startup-b", "pasteur", "cea-dam", "ens-ml")
TENANT_WEIGHTS = (33, 20, 14, 10, 8, 7, 5, 3)
SITES = ("jean-zay", "adastra", "scw-par", "ovh-gra", "nebius-fi", "leonardo", "cyfronet", "sigma2")
KINDS = ("train", "eval", "finetune", "infer")
TEAMS = ("vision", "nlp", "speech", "rl", "bio", "climate", "robotics", "infra", "safety", "theory")
# what jobs have become by the end, and how often
OUTCOMES = ((JobState.succeeded, 62), (JobState.failed, 8), (JobState.cancelled, 5), (JobState.rejected, 3),
            (JobState.started, 10), (JobState.queued, 6), (JobState.placed, 3), (JobState.dispatched, 3))
BATCH = 256


def decisions() -> dict[str, Decision]:
    """A placement's decision at each site: a candidate for every catalog site, as routing writes them."""
    rng = random.Random(7)
    made = {}
    for chosen in SITES:
        candidates = [Candidate(site=s, eligible=s == chosen,
                                holds=[] if s == chosen else [rng.choice(("gpus", "gate"))],
                                reasons=[] if s == chosen else [f"{s}: 0 of 8 H100 free"],
                                score=rng.uniform(0, 10),
                                parts={"wait_s": rng.uniform(0, 3600), "cost_eur": rng.uniform(0, 40),
                                       "co2e_kg": rng.uniform(0, 5)}) for s in SITES]
        made[chosen] = Decision(site=chosen, gpu_type="H100", candidates=candidates)
    return made


def job_events(n: int, rng: random.Random, decided: dict[str, Decision]) -> list[tuple[datetime, int, JobEvent]]:
    """One job's events, with their times: submitted every 3 s on average, running for up to two hours."""
    job_id = uuid.UUID(int=rng.getrandbits(128)).hex[:20]
    tenant = rng.choices(TENANTS, TENANT_WEIGHTS)[0]
    site = rng.choice(SITES)
    kind, team = rng.choice(KINDS), rng.choice(TEAMS)
    outcome = rng.choices([o for o, _ in OUTCOMES], [w for _, w in OUTCOMES])[0]
    at = T0 + timedelta(seconds=3 * n + rng.uniform(0, 3))
    spec = JobSpec(tenant=tenant, name=f"{kind}-{team}-{n % 1000}", command=["python", "-m", f"{kind}.main"],
                   resources={"gpus": rng.choice((1, 2, 4, 8)), "gpu_type": "H100"},
                   labels={"team": team, "project": f"p{rng.randint(0, 99)}"})

    def event(state: JobState, after_s: float, service: str, attempt: int | None = None, **data) -> tuple:
        body = JobEventData(job_id=job_id, tenant=tenant, state=state,
                            **({"attempt": attempt} if attempt is not None else {}), **data)
        parts = () if attempt is None else (attempt,)
        when = at + timedelta(seconds=after_s)
        return when, n, JobEvent.of(service, body, *parts, time=when)

    if outcome == JobState.rejected:
        return [event(JobState.rejected, 0, "intake", reason="no site can run it")]
    events = [event(JobState.accepted, 0, "intake", spec=spec)]
    if outcome == JobState.queued or rng.random() < 0.2:
        events.append(event(JobState.queued, 1, "routing", decision=decided[site], reasons=["gpus"]))
    if outcome == JobState.queued:
        return events
    events.append(event(JobState.placed, 30, "routing", 1, site=site, gpu_type="H100", decision=decided[site]))
    if outcome == JobState.cancelled and rng.random() < 0.5:  # before it started
        return [*events, event(JobState.cancelled, 40, "intake", reason="cancelled by the user")]
    for state, after in ((JobState.dispatched, 31), (JobState.started, 60)):
        if outcome == JobState.placed:
            return events
        events.append(event(state, after, f"agent/{site}", 1, site=site))
        if outcome == state:
            return events
    final = {"exit_code": 0} if outcome == JobState.succeeded else \
        {"exit_code": 1} if outcome == JobState.failed else {"reason": "cancelled by the user"}
    return [*events, event(outcome, 60 + rng.uniform(60, 7200), f"agent/{site}", 1, site=site, **final)]


def stream(jobs: int) -> Iterator[tuple[int, JobEvent]]:
    """The stream's job events in time order (a window of 4,000 jobs at a time: longer than any job)."""
    rng, decided = random.Random(42), decisions()
    seq, window = 0, 4000
    for start in range(0, jobs, window):
        events = [e for n in range(start, min(jobs, start + window)) for e in job_events(n, rng, decided)]
        events.sort(key=lambda item: (item[0], item[1]))
        for _, _, event in events:
            seq += 1
            yield seq, event


def fill(index: JobsIndex, jobs: int) -> tuple[int, float, float]:
    """(events, seconds in apply, seconds parsing the bodies of a sample) for `jobs` jobs."""
    applied, spent, batch = 0, 0.0, []
    sample: list[bytes] = []
    for seq, event in stream(jobs):
        batch.append((seq, event))
        if len(sample) < 5000:
            sample.append(event.model_dump_json().encode())
        if len(batch) == BATCH:
            start = time.perf_counter()
            index.apply(batch)
            spent += time.perf_counter() - start
            applied += len(batch)
            batch = []
    if batch:
        start = time.perf_counter()
        index.apply(batch)
        spent += time.perf_counter() - start
        applied += len(batch)
    start = time.perf_counter()
    for body in sample:
        JobEvent.model_validate_json(body)
    return applied, spent, (time.perf_counter() - start) / len(sample)


def queries(jobs: int) -> list[tuple[str, dict]]:
    recent = T0 + timedelta(seconds=3 * jobs * 0.9)  # the last tenth of the jobs
    big, small = TENANTS[0], TENANTS[-1]
    return [
        ("all jobs (operator)", {}),
        (f"tenant (largest, {TENANT_WEIGHTS[0]} %)", {"tenant": big}),
        (f"tenant (smallest, {TENANT_WEIGHTS[-1]} %)", {"tenant": small}),
        ("state started (10 %)", {"state": "started"}),
        ("states queued+placed+dispatched (12 %)", {"state": ["queued", "placed", "dispatched"]}),
        ("site", {"site": "scw-par"}),
        ("since (last 10 %)", {"since": recent}),
        ("name prefix, broad (25 %)", {"name_prefix": "eval-"}),
        ("name prefix, narrow (0.1 %)", {"name_prefix": "eval-nlp-12"}),
        ("tag team=vision (10 %)", {"tag": ("team", "vision")}),
        ("tenant + state started", {"tenant": big, "state": "started"}),
        ("tenant + states ended", {"tenant": big, "state": ["succeeded", "failed", "cancelled"]}),
        ("tenant + site + state failed", {"tenant": big, "site": "scw-par", "state": "failed"}),
        ("tenant + since", {"tenant": big, "since": recent}),
        ("tenant + name prefix", {"tenant": big, "name_prefix": "train-"}),
        ("tenant + tag", {"tenant": big, "tag": ("team", "nlp")}),
        ("smallest tenant + state + tag", {"tenant": small, "state": "succeeded", "tag": ("team", "rl")}),
    ]


def timed(index: JobsIndex, **query) -> tuple[float, list[dict], str | None]:
    start = time.perf_counter()
    records, token = index.page(limit=50, **query)
    return (time.perf_counter() - start) * 1000, records, token


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def measure(index: JobsIndex, jobs: int) -> None:
    print(f"{'query':<40} {'rows':>5} {'first p50':>10} {'p99':>7} {'pages':>6} {'deep p50':>9} {'p99':>7}  (ms)")
    for name, query in queries(jobs):
        firsts = [timed(index, **query)[0] for _ in range(100)]
        _, records, token = timed(index, **query)
        deep, pages = [], 1
        while token and pages < 300:
            start = time.perf_counter()
            _, token = index.page(limit=50, page_token=token, **query)
            deep.append((time.perf_counter() - start) * 1000)
            pages += 1
        deep_text = f"{statistics.median(deep):9.2f} {p99(deep):7.2f}" if deep else f"{'-':>9} {'-':>7}"
        print(f"{name:<40} {len(records):>5} {statistics.median(firsts):10.2f} {p99(firsts):7.2f} "
              f"{pages:>6} {deep_text}")


def run(target: Path | str, label: str, jobs: int, analyze: bool) -> None:
    index = JobsIndex(target)
    try:
        events, spent, parse = fill(index, jobs)
        print(f"\n== {label}, {jobs:,} jobs: {events:,} events applied in {spent:.1f} s: "
              f"{events / spent:,.0f} events/s (and {parse * 1e6:.0f} µs to parse a body into a JobEvent)")
        if analyze:  # as PostgreSQL's autovacuum does after a bulk change
            index._writer.execute("ANALYZE")  # type: ignore[union-attr]
        measure(index, jobs)
    finally:
        index.close()


def postgres_schema(url: str) -> tuple[str, object] | None:
    """A fresh schema in the PostgreSQL at `url` (dropped by the caller), or None without one."""
    try:
        import psycopg

        admin = psycopg.connect(url, autocommit=True, connect_timeout=3)
    except Exception as e:
        print(f"\n(no PostgreSQL at {url}: {str(e).strip()})")
        return None
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}')}", (admin, schema)


def pressure() -> str:
    """The machine's CPU pressure over the last minute (other work on it shows in the p99s)."""
    try:
        return Path("/proc/pressure/cpu").read_text().split()[2].replace("avg60=", "") + " %"
    except (OSError, IndexError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, action="append", help="jobs to fill the index with (repeatable)")
    parser.add_argument("--postgres", default=os.environ.get("CONTINUUM_TEST_POSTGRES_URL", "postgresql:///test"))
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, {datetime.now(UTC):%Y-%m-%d}, CPU pressure {pressure()}")
    for jobs in args.jobs or [10_000]:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp) / "jobs-index.sqlite3", "SQLite", jobs, analyze=False)
        found = None if args.no_postgres else postgres_schema(args.postgres)
        if found:
            url, (admin, schema) = found
            try:
                run(url, "PostgreSQL", jobs, analyze=True)
            finally:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")  # type: ignore[attr-defined]
                admin.close()  # type: ignore[attr-defined]
    print(f"\nCPU pressure at the end: {pressure()} (some tasks waiting for a core, over the last minute)")


if __name__ == "__main__":
    main()
