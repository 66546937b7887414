"""How many messages a job makes through nats-server: `continuum up` against a nats-server with its monitoring
port, N jobs submitted (64 at a time) and run to the end, every consumer caught up; the server's own counts
(`/varz` in_msgs, out_msgs) over that time, less what the idle system makes in as long.

    .venv/bin/python tests/perf/messages_per_job.py [--jobs 2000]

The counts include the client's part: its submission and the reply, and the `placed`, `dispatched` and
`usage` events it watches. Figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nats

from bench_throughput import ROOT, SITES, TENANTS, Watch, drained, submit, system_up
from services.runtime import free_port, nats_server_binary, wait_for_port
from shared.contracts.subjects import Subjects


def counts(monitor_port: int) -> dict[str, int]:
    varz = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/varz", timeout=5).read())
    return {"in": varz["in_msgs"], "out": varz["out_msgs"]}


async def run(jobs: int, workdir: Path) -> None:
    (workdir / "sites.yaml").write_text(SITES)
    (workdir / "tenants.yaml").write_text(TENANTS)
    port, monitor_port = free_port(), free_port()
    server = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor_port),
                               "-js", "-sd", str(workdir / "nats")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"nats://127.0.0.1:{port}"
    up = None
    try:
        wait_for_port(port, 10, server)
        env = dict(os.environ, CONTINUUM_NATS_URL=url, CONTINUUM_DATA_DIR=str(workdir / "data"))
        up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--sites", str(workdir / "sites.yaml"),
                               "--tenants", str(workdir / "tenants.yaml")], env=env, cwd=ROOT,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nc = await nats.connect(url)
        try:
            subjects = Subjects()
            await system_up(nc, subjects, up)
            watch = Watch()
            await watch.start(nc, subjects)
            slots = asyncio.Semaphore(64)

            async def one() -> None:
                async with slots:
                    await submit(nc, subjects, watch)
            start, before = time.monotonic(), counts(monitor_port)
            await asyncio.gather(*(one() for _ in range(jobs)))
            await drained(nc.jetstream(), watch)
            took, after = time.monotonic() - start, counts(monitor_port)
            idle_before = counts(monitor_port)  # heartbeats and pings: what the system makes doing nothing
            await asyncio.sleep(took)
            idle_after = counts(monitor_port)
            for way in ("in", "out"):
                work = after[way] - before[way] - (idle_after[way] - idle_before[way])
                print(f"messages {way} of nats-server: {work / jobs:.1f} a job ({jobs} jobs in {took:.1f} s)")
        finally:
            await nc.close()
    finally:
        if up is not None:
            up.send_signal(signal.SIGINT)
            up.wait(60)
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args.jobs, Path(tmp)))


if __name__ == "__main__":
    main()
