"""Continuum's Slurm path against plain sbatch, on the same Slurm cluster, in one run.

    .venv/bin/python tests/perf/bench_slurm.py [--jobs 64] [--runtime 10]

Starts the one-node test cluster (deploy/slurm/test-cluster.sh, 8 H100), then:
1. direct: `sbatch` called once per job in a loop, as a script submitting a batch would (each job
   `sleep RUNTIME`, 1 H100, 1 minute), until Slurm has accepted every job; then until every one has ended;
2. Continuum: `continuum up` (every service its own process, an embedded nats-server) with the cluster as
   its only site, the same jobs submitted on `continuum.jobs.submit` as fast as replies come, until every
   job is `dispatched` (accepted by Slurm through the agent's sbatch), then `succeeded`.
Prints jobs per second for both and the ratio (Continuum / direct).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import orjson

from services.runtime import EmbeddedNats
from shared.bus import request_json
from shared.contracts.subjects import Subjects

ROOT = Path(__file__).resolve().parents[2]
SITES = """sites:
  - id: hpc-slurm
    kind: public_hpc
    country: FR
    jurisdiction: EU
    carbon_zone: FR
    backend: slurm
    slurm: {partition: gpu}
    gpus: {H100: 8}
"""
TENANTS = """tenants:
  - id: bench
    allocation_gpu_hours: 1000000
"""


def slurm_idle() -> None:
    """Wait until Slurm has no job left in the partition."""
    while subprocess.run(["squeue", "-h", "-p", "gpu", "-t", "PENDING,RUNNING,COMPLETING"], capture_output=True,
                         text=True, check=False).stdout.strip():
        time.sleep(0.2)


def direct(n: int, runtime: float) -> tuple[float, float]:
    start = time.perf_counter()
    for i in range(n):
        subprocess.run(["sbatch", "--parsable", "--partition=gpu", "--gres=gpu:h100:1", "--time=1",
                        f"--job-name=direct-{i}", "--output=/dev/null", "--wrap", f"sleep {runtime}"],
                       check=True, capture_output=True)
    accepted = time.perf_counter() - start
    slurm_idle()
    return accepted, time.perf_counter() - start


async def through_continuum(n: int, runtime: float, workdir: Path) -> tuple[float, float]:
    (workdir / "sites.yaml").write_text(SITES)
    (workdir / "tenants.yaml").write_text(TENANTS)
    server = EmbeddedNats(workdir / "nats").start()
    env = dict(os.environ, CONTINUUM_NATS_URL=server.url, CONTINUUM_DATA_DIR=str(workdir / "data"))
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--sites", str(workdir / "sites.yaml"),
                           "--tenants", str(workdir / "tenants.yaml")], env=env, cwd=ROOT,
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subjects = Subjects()
    nc = await nats.connect(server.url)
    try:
        while True:  # the site reports
            try:
                reply = await request_json(nc, subjects.sites_list, {}, timeout=1)
                if reply.get("sites") and reply["sites"][0]["state"] == "up":
                    break
            except RuntimeError:
                pass
            await asyncio.sleep(0.2)
        dispatched, ended = set(), {}
        done = asyncio.Event()

        async def on_event(msg) -> None:
            kind = msg.subject.rsplit(".", 1)[-1]
            job_id = orjson.loads(msg.data)["data"]["job_id"]
            if kind == "dispatched":
                dispatched.add(job_id)
            else:
                ended[job_id] = kind
            if len(dispatched) >= n and accepted_at[0] is None:
                accepted_at[0] = time.perf_counter()
            if len(ended) >= n:
                done.set()

        accepted_at: list[float | None] = [None]
        await nc.subscribe(subjects.job_event(kind="dispatched"), cb=on_event)
        for kind in ("succeeded", "failed", "cancelled"):
            await nc.subscribe(subjects.job_event(kind=kind), cb=on_event)
        spec = {"tenant": "bench", "command": ["sleep", str(runtime)], "resources": {"gpus": 1, "gpu_type": "H100"},
                "walltime_s": 60}
        start = time.perf_counter()
        for _ in range(n):
            reply = await request_json(nc, subjects.jobs_submit, spec)
            assert reply["state"] == "accepted", reply
        await asyncio.wait_for(done.wait(), 600)
        unsuccessful = {k: sum(1 for v in ended.values() if v == k) for k in ("failed", "cancelled")}
        assert not any(unsuccessful.values()), f"not every job succeeded: {unsuccessful}"
        return accepted_at[0] - start, time.perf_counter() - start
    finally:
        await nc.close()
        up.send_signal(2)
        up.wait(60)
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--runtime", type=float, default=10, help="seconds each job sleeps")
    args = parser.parse_args()
    subprocess.run(["bash", str(ROOT / "deploy/slurm/test-cluster.sh"), "start"], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    slurm_idle()
    n = args.jobs
    print(f"{n} jobs (sleep {args.runtime:g}, 1 H100, 1 min) on the one-node test cluster, {os.cpu_count()} cores",
          flush=True)
    d_accept, d_end = direct(n, args.runtime)
    with tempfile.TemporaryDirectory() as tmp:
        c_accept, c_end = asyncio.run(through_continuum(n, args.runtime, Path(tmp)))
    print(f"{'':<28} {'accepted by Slurm':>20} {'all ended':>14}")
    print(f"{'direct sbatch loop':<28} {n / d_accept:>14.1f} jobs/s {n / d_end:>8.1f} jobs/s")
    print(f"{'through Continuum':<28} {n / c_accept:>14.1f} jobs/s {n / c_end:>8.1f} jobs/s")
    print(f"{'ratio (Continuum / direct)':<28} {d_accept / c_accept:>19.0%} {d_end / c_end:>13.0%}")


if __name__ == "__main__":
    main()
