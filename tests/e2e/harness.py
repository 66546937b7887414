"""Running the system as a user does, for end-to-end tests: `continuum up` as a subprocess on the test's own
nats-server, and a plain nats-py client that waits for what the contract promises."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nats

from shared.bus import request_json
from tests.conftest import SUBJECTS

CATALOG = Path(__file__).parent / "catalog"
FINAL = {"succeeded", "failed", "cancelled", "rejected"}
FAST = {"CONTINUUM_HEARTBEAT_INTERVAL_S": "0.5", "CONTINUUM_PLACEMENT_RETRY_S": "0.2",
        "CONTINUUM_MAX_DELIVERIES": "3", "CONTINUUM_RETRY_BACKOFF_S": "0.1"}


class RunningSystem:
    def __init__(self, process: subprocess.Popen, data_dir: Path, url: str, env: dict) -> None:
        self.process, self.data_dir, self.url, self.env = process, data_dir, url, env
        self.extra: list[subprocess.Popen] = []

    def add_replica(self, service: str) -> None:
        """One more process of a service, beside the one `up` runs."""
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "logs" / f"{service}-{len(self.extra) + 2}.log", "ab")  # noqa: SIM115
        self.extra.append(subprocess.Popen([sys.executable, "-m", "services.cli", "service", service], env=self.env,
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=log))

    def start_agent(self, site: str) -> subprocess.Popen:
        """The agent of one site, as its own process (for a site `up` was told runs its agent elsewhere)."""
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "logs" / f"agent-{site}-{len(self.extra)}.log", "ab")  # noqa: SIM115
        process = subprocess.Popen([sys.executable, "-m", "services.cli", "service", "agent", "--site", site],
                                   env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.extra.append(process)
        return process

    def stop_extra(self) -> None:
        for process in self.extra:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)

    def pid(self, service: str) -> int:
        return json.loads((self.data_dir / "state.json").read_text())["services"][service]


def start_system(nats_server, tmp_path, sites: str = "sites.yaml", tenants: str = "tenants.yaml",
                 args: tuple[str, ...] = (), **settings: str):
    """`continuum up` with a test catalog (and more `up` arguments, CONTINUUM_* settings); yields the running
    system and stops it."""
    data_dir = tmp_path / "data"
    env = dict(os.environ, CONTINUUM_NATS_URL=nats_server.url, CONTINUUM_DATA_DIR=str(data_dir), **FAST,
               CONTINUUM_SITES_FILE=str(CATALOG / sites), CONTINUUM_TENANTS_FILE=str(CATALOG / tenants), **settings)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--sites", str(CATALOG / sites),
         "--tenants", str(CATALOG / tenants), *args],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    system = RunningSystem(process, data_dir, nats_server.url, env)
    yield system
    system.stop_extra()
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


async def connect_when_up(system: RunningSystem, timeout: float = 60.0):
    """A client, once every site of the catalog is up and every service answers its requests."""
    nc = await nats.connect(system.url)
    deadline = time.monotonic() + timeout
    answering = set()
    # a request each service answers (an error reply is an answer): intake, routing and billing may start
    # after the agents and capacity have
    probes = {SUBJECTS.jobs_get: {"job_id": "probe"}, SUBJECTS.routing_overflow: {},
              SUBJECTS.billing_statement: {"tenant": "probe"}}
    while time.monotonic() < deadline:
        assert system.process.poll() is None, "continuum up exited"
        try:
            for subject, body in probes.items():
                if subject not in answering:
                    await request_json(nc, subject, body, timeout=1.0)
                    answering.add(subject)
            reply = await request_json(nc, SUBJECTS.sites_list, {}, timeout=1.0)
            if reply.get("sites") and all(s["state"] == "up" for s in reply["sites"]):
                return nc
        except RuntimeError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"the system did not come up (answering: {sorted(answering)})")


async def record_when(nc, job_id: str, state: str, timeout: float = 30.0) -> dict:
    """The job's record once the registry (a read model that follows the event stream) shows `state`."""
    deadline = time.monotonic() + timeout
    while True:
        record = await request_json(nc, SUBJECTS.jobs_get, {"job_id": job_id})
        if record.get("state") == state or time.monotonic() > deadline:
            return record
        await asyncio.sleep(0.05)


async def wait_all_final(events, job_ids: list[str], timeout: float) -> None:
    def done() -> bool:
        return all(j in events.billed for j in job_ids)
    try:
        await events.wait_for(done, timeout, f"{len(job_ids)} jobs to finish and be billed")
    except AssertionError:
        stuck = Counter(events.kinds(j)[-1] if events.kinds(j) else "none" for j in job_ids if j not in events.billed)
        raise AssertionError(f"jobs not billed, by last event: {dict(stuck)}") from None


