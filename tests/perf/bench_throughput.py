"""Continuum's end-to-end throughput and latency, every service its own process, against a bare JetStream
publish-and-consume loop on the same nats-server, in one run.

    .venv/bin/python tests/perf/bench_throughput.py [--seconds 60] [--rates 100,300,1000] [--rate-seconds 10]
                                                    [--jobs-tracked 100000]

1. baseline: nats-py alone publishes to a JetStream stream and consumes from it as many messages a job as
   Continuum stores for one (accepted, placed, dispatch, dispatched, started, succeeded, usage: 7), as fast as
   it can; its messages per second / 7 is the most jobs per second the broker could carry on this machine.
2. sustained: `continuum up` (every service a process, four simulated sites with room for every job, jobs
   of zero runtime); jobs submitted on `continuum.jobs.submit` as fast as they are taken, with at most
   `--window` of them not yet billed; jobs billed per second over `--seconds`, then jobs per second with
   every service caught up (until no durable consumer has a message left), and the CPU each process spent
   per job.
3. latency: jobs offered at fixed rates (`--rates`, each for `--rate-seconds`): p50 and p99 from sending
   the submission to the `placed` and the `dispatched` events.
4. memory: each service's peak RSS (VmHWM) at the end, and with how many jobs in the registry (the
   runs above, then more submissions until `--jobs-tracked`, if given).
Figures and what bounds them: docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import orjson
from nats.js.api import StreamConfig

from services.runtime import EmbeddedNats
from shared.bus import request_json
from shared.contracts.streams import Topology
from shared.contracts.subjects import Subjects

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGY = Topology(Subjects())
MESSAGES_PER_JOB = 7
REQUESTS_IN_FLIGHT = 64
SITE = """  - id: {id}
    kind: {kind}
    country: {country}
    jurisdiction: EU
    carbon_zone: {zone}
    gpus: {{H100: 100000}}
    price_eur_per_gpu_hour: {{H100: {price}}}
"""
SITES = "sites:\n" + "".join(SITE.format(**{"zone": s["country"], **s}) for s in (
    {"id": "hpc-fr", "kind": "public_hpc", "country": "FR", "price": 0.0},
    {"id": "cloud-fr", "kind": "private_cloud", "country": "FR", "price": 2.5},
    {"id": "cloud-nl", "kind": "private_cloud", "country": "NL", "price": 2.5},
    {"id": "cloud-se", "kind": "private_cloud", "country": "SE", "zone": "SE-SE3", "price": 2.5}))
TENANTS = """tenants:
  - id: bench
    allocation_gpu_hours: 100000000
    monthly_budget_eur: 100000000
"""
SPEC = orjson.dumps({"tenant": "bench", "command": ["true"], "resources": {"gpus": 1, "gpu_type": "H100"},
                     "walltime_s": 600})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def baseline(url: str, jobs: int) -> float:
    """Jobs per second a bare JetStream publish-and-consume loop carries (7 messages a job)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH_BASELINE", subjects=["bench.>"]))
    n = jobs * MESSAGES_PER_JOB
    body = SPEC * 2  # about the size of an event
    sub = await js.pull_subscribe("bench.>", durable="bench")
    received = 0

    async def consume() -> None:
        nonlocal received
        while received < n:
            for msg in await sub.fetch(256, timeout=5):
                await msg.ack()
                received += 1

    start = time.perf_counter()
    consumer = asyncio.create_task(consume())
    pending: list[asyncio.Future] = []
    for i in range(n):
        pending.append(asyncio.ensure_future(js.publish(f"bench.{i % 64}", body)))
        if len(pending) >= 256:  # acks awaited in windows, as a client that keeps its messages safe would
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await consumer
    elapsed = time.perf_counter() - start
    await js.delete_stream("BENCH_BASELINE")
    await nc.close()
    return jobs / elapsed


class Watch:
    """When each job was submitted, placed, dispatched and billed (core NATS subscriptions to the events)."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.placed: dict[str, float] = {}
        self.dispatched: dict[str, float] = {}
        self.billed: dict[str, float] = {}
        self.changed = asyncio.Event()

    async def start(self, nc, subjects: Subjects) -> None:
        for kind, seen in (("placed", self.placed), ("dispatched", self.dispatched)):
            await nc.subscribe(subjects.job_event(kind=kind), cb=self._recorder(seen, job_in_subject=True))
        await nc.subscribe(subjects.billing_event(kind="usage"), cb=self._recorder(self.billed, job_in_subject=False))

    def _recorder(self, seen: dict[str, float], job_in_subject: bool):
        async def record(msg) -> None:
            now = time.perf_counter()
            job_id = msg.subject.split(".")[4] if job_in_subject else orjson.loads(msg.data)["data"]["job_id"]
            seen.setdefault(job_id, now)
            self.changed.set()
        return record


async def system_up(nc, subjects: Subjects, up: subprocess.Popen) -> None:
    """Until every site reports and intake answers."""
    while True:
        if up.poll() is not None:
            raise SystemExit(f"continuum up exited with code {up.returncode}")
        try:
            reply = await request_json(nc, subjects.sites_list, {}, timeout=1)
            await request_json(nc, subjects.jobs_get, {"job_id": "probe"}, timeout=1)
            if reply.get("sites") and all(s["state"] == "up" for s in reply["sites"]):
                return
        except RuntimeError:
            pass
        await asyncio.sleep(0.2)


async def submit(nc, subjects: Subjects, watch: Watch) -> None:
    sent = time.perf_counter()
    reply = await request_json(nc, subjects.jobs_submit, orjson.Fragment(SPEC), timeout=30)
    if reply.get("state") != "accepted":
        raise RuntimeError(f"a submission was not accepted: {reply}")
    watch.sent[reply["job_id"]] = sent


async def sustained(nc, subjects: Subjects, watch: Watch, seconds: float, window: int) -> tuple[float, int]:
    """Jobs billed per second over `seconds`, submitting whenever fewer than `window` are unbilled."""
    in_flight: set[asyncio.Task] = set()
    billed_before = len(watch.billed)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        # a pool of submitters: at most REQUESTS_IN_FLIGHT waiting for their reply
        while len(watch.sent) - len(watch.billed) + len(in_flight) < window and len(in_flight) < REQUESTS_IN_FLIGHT:
            task = asyncio.create_task(submit(nc, subjects, watch))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        watch.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.changed.wait(), 0.05)
    elapsed = time.perf_counter() - start
    billed = len(watch.billed) - billed_before
    await asyncio.gather(*in_flight)
    return billed / elapsed, billed


async def backlog(js) -> dict[str, int]:
    """Messages each durable consumer has not yet taken or not yet acknowledged (the registry may run behind
    billing, routing's `metered` behind the usage events)."""
    behind = {}
    for stream in (TOPOLOGY.events_stream, TOPOLOGY.dispatch_stream):
        for info in await js.consumers_info(stream):
            if info.config.durable_name and (n := info.num_pending + info.num_ack_pending):
                behind[info.config.durable_name.removeprefix("continuum-")] = n
    return behind


async def drained(js, watch: Watch, timeout: float = 600) -> float:
    """Until every job submitted so far is billed and every consumer has caught up, so that each measurement
    starts from an idle system; how long that took."""
    start = time.monotonic()
    while len(watch.billed) < len(watch.sent) and time.monotonic() - start < timeout:
        watch.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.changed.wait(), 1.0)
    while await backlog(js) and time.monotonic() - start < timeout:
        await asyncio.sleep(0.1)  # polled: consumers' progress is not announced
    return time.monotonic() - start


async def at_rate(nc, subjects: Subjects, watch: Watch, rate: float, seconds: float) -> dict:
    """Offer `rate` jobs a second for `seconds` (open loop), then wait for every one to be dispatched."""
    await drained(nc.jetstream(), watch)
    before = set(watch.sent)
    tasks = []
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(submit(nc, subjects, watch)))
    await asyncio.gather(*tasks)
    offered_for = time.perf_counter() - start
    ours = [j for j in watch.sent if j not in before]
    deadline = time.monotonic() + 120
    while not all(j in watch.dispatched for j in ours) and time.monotonic() < deadline:
        watch.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.changed.wait(), 1.0)
    placed = [(watch.placed[j] - watch.sent[j]) * 1000 for j in ours if j in watch.placed]
    dispatched = [(watch.dispatched[j] - watch.sent[j]) * 1000 for j in ours if j in watch.dispatched]
    return {"rate": rate, "jobs": len(ours), "achieved": len(ours) / offered_for, "lost": len(ours) - len(dispatched),
            "placed_p50": percentile(placed, 0.5), "placed_p99": percentile(placed, 0.99),
            "dispatched_p50": percentile(dispatched, 0.5), "dispatched_p99": percentile(dispatched, 0.99)}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User and system CPU time each process has used so far."""
    out = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def peak_rss_mb(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        out[name] = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")) / 1024
    return out


async def run(args: argparse.Namespace, workdir: Path) -> None:
    (workdir / "sites.yaml").write_text(SITES)
    (workdir / "tenants.yaml").write_text(TENANTS)
    server = EmbeddedNats(workdir / "nats").start()
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, nats-server on {server.url}", flush=True)
    try:
        server_cpu = cpu_seconds({"nats-server": server.process.pid})["nats-server"]
        base = await baseline(server.url, args.baseline_jobs)
        server_cpu = cpu_seconds({"nats-server": server.process.pid})["nats-server"] - server_cpu
        # the broker's own share: what a message costs it when nothing but the loop runs
        print(f"baseline: bare JetStream publish+consume, {MESSAGES_PER_JOB} messages a job: {base:,.0f} jobs/s; "
              f"nats-server {1000 * server_cpu / args.baseline_jobs:.2f} ms of CPU a job", flush=True)
        env = dict(os.environ, CONTINUUM_NATS_URL=server.url, CONTINUUM_DATA_DIR=str(workdir / "data"))
        up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--sites", str(workdir / "sites.yaml"),
                               "--tenants", str(workdir / "tenants.yaml")], env=env, cwd=ROOT,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subjects = Subjects()
        nc = await nats.connect(server.url, pending_size=256 * 1024 * 1024)
        try:
            await system_up(nc, subjects, up)
            watch = Watch()
            await watch.start(nc, subjects)
            processes = {**json.loads((workdir / "data" / "state.json").read_text())["services"],
                         "nats-server": server.process.pid, "bench client": os.getpid()}
            cpu_before, billed_before = cpu_seconds(processes), len(watch.billed)
            rate, billed = await sustained(nc, subjects, watch, args.seconds, args.window)
            behind = await backlog(nc.jetstream())
            catching_up = await drained(nc.jetstream(), watch)
            done = len(watch.billed) - billed_before  # every job submitted in the run, all of its steps taken
            overall = done / (args.seconds + catching_up)
            cpu = {name: t - cpu_before[name] for name, t in cpu_seconds(processes).items()}
            print(f"sustained: {rate:,.1f} jobs/s submitted, run and billed over {args.seconds:g} s ({billed} jobs)",
                  flush=True)
            print(f"  then {sum(behind.values()):,} messages behind ("
                  + ", ".join(f"{name} {n:,}" for name, n in sorted(behind.items(), key=lambda x: -x[1])[:3])
                  + f"), caught up in {catching_up:.1f} s: {overall:,.1f} jobs/s with every service caught up "
                  f"({done} jobs), efficiency against the baseline {overall / base:.1%}", flush=True)
            # where the machine's time went: what each process spent on a job (2 cores give 2,000 ms a second)
            print("  CPU per job: " + ", ".join(f"{name} {1000 * t / max(done, 1):.2f} ms" for name, t in cpu.items())
                  + f"; total {1000 * sum(cpu.values()) / max(done, 1):.2f} ms", flush=True)
            results = [await at_rate(nc, subjects, watch, r, args.rate_seconds) for r in args.rates]
            print(f"{'offered':>8} {'achieved':>9} {'placed p50':>11} {'p99':>8} {'dispatched p50':>15} {'p99':>8}")
            for r in results:
                print(f"{r['rate']:>6.0f}/s {r['achieved']:>7.0f}/s "
                      f"{r['placed_p50']:>9.1f}ms {r['placed_p99']:>6.0f}ms "
                      f"{r['dispatched_p50']:>13.1f}ms {r['dispatched_p99']:>6.0f}ms"
                      + (f"  ({r['lost']} not dispatched within 120 s)" if r["lost"] else ""), flush=True)
            while len(watch.sent) < args.jobs_tracked:
                await sustained(nc, subjects, watch, 10, args.window)
                print(f"  {len(watch.sent):,} jobs in the registry", flush=True)
            state = json.loads((workdir / "data" / "state.json").read_text())
            memory = peak_rss_mb(state["services"])
            print(f"peak RSS with {len(watch.sent):,} jobs in the registry: "
                  + ", ".join(f"{name} {mb:.0f} MB" for name, mb in memory.items()), flush=True)
        finally:
            await nc.close()
            up.send_signal(signal.SIGINT)
            up.wait(60)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long the sustained run lasts")
    parser.add_argument("--window", type=int, default=2000, help="the most jobs submitted and not yet billed")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[100, 300, 1000])
    parser.add_argument("--rate-seconds", type=float, default=10, help="how long each offered rate lasts")
    parser.add_argument("--baseline-jobs", type=int, default=20000)
    parser.add_argument("--jobs-tracked", type=int, default=0, help="submit until the registry has this many")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
