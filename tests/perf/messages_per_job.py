"""How many messages a job makes through nats-server: `continuum up` against a nats-server with its monitoring
port, N jobs submitted (`--concurrency` at a time) and run to the end, every consumer caught up; the server's
own counts (`/varz` in_msgs, out_msgs) over that time, less what the idle system makes in as long; what each
service's connection sent and got (`/connz`); what each stream stored (`/jsz`).

    .venv/bin/python tests/perf/messages_per_job.py [--jobs 2000] [--concurrency 64]

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

from services.runtime import free_port, nats_server_binary, wait_for_port
from shared.contracts.subjects import Subjects

from bench_throughput import ROOT, SITES, TENANTS, Watch, drained, submit, system_up


def counts(monitor_port: int) -> dict[str, int]:
    varz = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/varz", timeout=5).read())
    return {"in": varz["in_msgs"], "out": varz["out_msgs"]}


def stored(monitor_port: int) -> dict[str, int]:
    """Messages each stream (key-value buckets included) has stored so far."""
    jsz = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/jsz?streams=true", timeout=5).read())
    return {s["name"]: s["state"]["last_seq"] for a in jsz.get("account_details", [])
            for s in a.get("stream_detail", [])}


def by_connection(monitor_port: int) -> dict[str, tuple[int, int]]:
    """Messages each client connection sent the server (in) and was sent (out), by connection name (each
    service names its own; replicas add up)."""
    connz = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/connz?limit=1024", timeout=5).read())
    out: dict[str, tuple[int, int]] = {}
    for c in connz["connections"]:
        name = c.get("name") or "bench client"
        sent, got = out.get(name, (0, 0))
        out[name] = (sent + c["in_msgs"], got + c["out_msgs"])
    return out


async def run(jobs: int, concurrency: int, workdir: Path) -> None:
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
            slots = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with slots:
                    await submit(nc, subjects, watch)
            start, before, conns_before = time.monotonic(), counts(monitor_port), by_connection(monitor_port)
            stored_before = stored(monitor_port)
            await asyncio.gather(*(one() for _ in range(jobs)))
            await drained(nc.jetstream(), watch)
            took, after, conns_after = time.monotonic() - start, counts(monitor_port), by_connection(monitor_port)
            stored_after = stored(monitor_port)
            idle_before = counts(monitor_port)  # heartbeats and pings: what the system makes doing nothing
            await asyncio.sleep(took)
            idle_after = counts(monitor_port)
            for way in ("in", "out"):
                work = after[way] - before[way] - (idle_after[way] - idle_before[way])
                print(f"messages {way} of nats-server: {work / jobs:.1f} a job ({jobs} jobs in {took:.1f} s)")
            # the server's own (JetStream's internal traffic) is the difference with what clients sent and got
            print("by connection, a job (sent to the server / sent by it; the idle traffic included):")
            for name, (sent, got) in sorted(conns_after.items()):
                sent0, got0 = conns_before.get(name, (0, 0))
                print(f"  {name:>20}: {(sent - sent0) / jobs:5.1f} / {(got - got0) / jobs:5.1f}")
            print("stored a job, by stream (writes, for a bucket): " + ", ".join(
                f"{name} {(n - stored_before.get(name, 0)) / jobs:.2f}" for name, n in sorted(stored_after.items())
                if n > stored_before.get(name, 0)))
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
    parser.add_argument("--concurrency", type=int, default=64, help="submissions waiting for their reply at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(args.jobs, args.concurrency, Path(tmp)))


if __name__ == "__main__":
    main()
