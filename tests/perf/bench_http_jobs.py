"""`GET /api/v1/jobs` over HTTP, as a client sees it: a page of jobs for each filter, first and deep, with the
gateway as its own process (`continuum service gateway`) on a nats-server whose event stream holds the jobs.

    .venv/bin/python tests/perf/bench_http_jobs.py [--jobs 10000] [--rounds 50]

The jobs are bench_jobs_index.py's synthetic ones (seeded: eight tenants, eight sites, every outcome),
published as the services publish them on the stream `CONTINUUM_EVENTS`; the gateway's index follows the
stream as it does live, and each request is timed from the client (loopback, one connection kept alive):
routing, auth, the index's catch-up check, the query, JSON out. The issue's aim is under 100 ms a page.
Figures: docs/performance.md, "GET /api/v1/jobs over HTTP".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import orjson
from bench_jobs_index import SITES, TENANTS, stream  # beside this script (python puts its folder first)

from services.runtime import EmbeddedNats, free_port
from shared.bus import connect
from shared.contracts.streams import Topology
from shared.contracts.subjects import Subjects
from shared.settings import Settings

SUBJECTS = Subjects()
ROOT = Path(__file__).parents[2]


async def publish(url: str, jobs: int) -> int:
    """Every job's events on the stream, in the order the services would publish them; the last sequence."""
    nc = await connect(Settings(nats_url=url))
    js = nc.jetstream()
    for config in Topology(SUBJECTS).stream_configs():
        await js.add_stream(config)
    pending = []
    for _, event in stream(jobs):
        data = event.data
        subject = SUBJECTS.job_event(data.tenant, data.job_id, event.kind)
        pending.append(js.publish(subject, orjson.dumps(event.model_dump(mode="json", exclude_unset=True)),
                                  headers={"Nats-Msg-Id": event.id}))
        if len(pending) >= 512:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    last = (await js.stream_info(Topology(SUBJECTS).events_stream)).state.last_seq
    await nc.close()
    return last


def queries() -> list[tuple[str, dict]]:
    return [("all", {}), ("tenant", {"tenant": TENANTS[0]}), ("small tenant", {"tenant": TENANTS[-1]}),
            ("state", {"state": "failed"}), ("tenant + state", {"tenant": TENANTS[1], "state": "succeeded"}),
            ("site", {"site": SITES[2]}), ("since", {"since": "2026-01-05T06:00:00Z"}),
            ("running or waiting", {"state": ["started", "queued", "placed"]})]


def timed(client: httpx.Client, params: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    reply = client.get("/api/v1/jobs", params=params)
    elapsed = (time.perf_counter() - start) * 1000
    reply.raise_for_status()
    return elapsed, reply.json()


def p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=50, help="first pages timed per query")
    parser.add_argument("--limit", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nats = EmbeddedNats(Path(tmp) / "nats").start()
        try:
            started = time.perf_counter()
            last = asyncio.run(publish(nats.url, args.jobs))
            print(f"python {platform.python_version()}, {args.jobs:,} jobs: {last:,} events published in "
                  f"{time.perf_counter() - started:.1f} s")
            port = free_port()
            env = dict(os.environ, CONTINUUM_NATS_URL=nats.url, CONTINUUM_DATA_DIR=str(Path(tmp) / "data"),
                       CONTINUUM_HTTP_PORT=str(port), CONTINUUM_LOG_LEVEL="warning")
            env.pop("CONTINUUM_NATS_CREDS", None)
            gateway = subprocess.Popen([sys.executable, "-m", "services.cli", "service", "gateway"], env=env,
                                       cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            try:
                run(f"http://127.0.0.1:{port}", args, last, started=time.perf_counter())
            finally:
                gateway.terminate()
                gateway.wait(15)
        finally:
            nats.stop()


def run(url: str, args, last: int, started: float) -> None:
    with httpx.Client(base_url=url, timeout=30.0) as client:
        while True:  # until the gateway answers and its index holds the whole stream
            try:
                ready = client.get("/readyz")
                if ready.status_code == 200 and ready.json()["index_caught_up_to"] >= last:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # another process's progress: nothing to wait on but a new look
        print(f"gateway ready and its index caught up in {time.perf_counter() - started:.1f} s")
        print(f"{'query':>20}  {'first p50':>9}  {'first p99':>9}  {'deep p50':>8}  {'deep p99':>8}  "
              f"{'pages':>5}  {'jobs':>6}  (ms, {args.limit} a page)")
        for name, query in queries():
            params = {**query, "limit": args.limit}
            first = [timed(client, params)[0] for _ in range(args.rounds)]
            deep, token, seen = [], None, 0
            while True:
                elapsed, page = timed(client, {**params, **({"page_token": token} if token else {})})
                deep.append(elapsed)
                seen += len(page["jobs"])
                token = page.get("next_page_token")
                if not token or len(deep) >= 200:
                    break
            print(f"{name:>20}  {statistics.median(first):9.1f}  {p(first, 0.99):9.1f}  "
                  f"{statistics.median(deep):8.1f}  {p(deep, 0.99):8.1f}  {len(deep):5}  {seen:6}")


if __name__ == "__main__":
    main()
