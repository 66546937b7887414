"""Running the system as a user does, for end-to-end tests: `continuum up` as a subprocess, on the test's own
open nats-server (v1: no credentials) or on the one `up` starts itself by default (TLS, a principal for each
party), and a plain nats-py client that waits for what the contract promises, as the operator."""

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

from shared.bus import connect, request_json
from shared.settings import Settings
from tests.conftest import SUBJECTS

CATALOG = Path(__file__).parent / "catalog"
FINAL = {"succeeded", "failed", "cancelled", "rejected"}
FAST = {"CONTINUUM_HEARTBEAT_INTERVAL_S": "0.5", "CONTINUUM_PLACEMENT_RETRY_S": "0.2",
        "CONTINUUM_MAX_DELIVERIES": "3", "CONTINUUM_RETRY_BACKOFF_S": "0.1"}


class RunningSystem:
    def __init__(self, process: subprocess.Popen, data_dir: Path, env: dict, url: str | None) -> None:
        self.process, self.data_dir, self.env, self._url = process, data_dir, env, url
        self.extra: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """The test's server, or the one `up` started (from its state file: once it has written it)."""
        return self._url or json.loads((self.data_dir / "state.json").read_text())["nats_url"]

    def client(self, **settings) -> Settings:
        """How to reach the system as the operator: on the embedded default, with the credentials `up` keeps."""
        return operator(self.data_dir, self._url, **settings)

    def started(self, timeout: float = 60.0) -> None:
        """Until `up` has its server (the state file says where): what a process started beside it needs."""
        deadline = time.monotonic() + timeout
        while not (self._url or (self.data_dir / "state.json").exists()):
            assert self.process.poll() is None, "continuum up exited"
            assert time.monotonic() < deadline, "continuum up wrote no state file"
            time.sleep(0.05)  # another process's file: nothing to wait on but a new look

    def add_replica(self, service: str) -> None:
        """One more process of a service, beside the one `up` runs."""
        self.started()
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "logs" / f"{service}-{len(self.extra) + 2}.log", "ab")  # noqa: SIM115
        self.extra.append(subprocess.Popen([sys.executable, "-m", "services.cli", "service", service], env=self.env,
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=log))

    def start_agent(self, site: str) -> subprocess.Popen:
        """The agent of one site, as its own process (for a site `up` was told runs its agent elsewhere)."""
        self.started()
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


def operator(data_dir: Path, own_url: str | None, **settings) -> Settings:
    """How to reach the system of `data_dir` as the operator: on the test's own server (`own_url`), with no
    credentials; on the embedded default, where its state file says, with the credentials `up` keeps."""
    if own_url:
        return Settings(nats_url=own_url, **settings)
    auth = data_dir / "auth"
    return Settings(nats_url=json.loads((data_dir / "state.json").read_text())["nats_url"],
                    nats_creds=auth / "creds" / "operator.nk", nats_ca=auth / "tls" / "ca.pem", **settings)


def system_env(nats_server, tmp_path, sites: str = "sites.yaml", tenants: str = "tenants.yaml",
               **settings: str) -> dict[str, str]:
    """The environment `continuum` runs in for a test: its data directory under `tmp_path`, a test catalog,
    fast timings (and more CONTINUUM_* settings), on `nats_server` (None: the server `up` starts itself)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CONTINUUM_NATS_URL", "CONTINUUM_NATS_CREDS",
                                                              "CONTINUUM_NATS_CA")}
    env.update(CONTINUUM_DATA_DIR=str(tmp_path / "data"), **FAST, CONTINUUM_SITES_FILE=str(CATALOG / sites),
               CONTINUUM_TENANTS_FILE=str(CATALOG / tenants), **settings)
    if nats_server is not None:
        env["CONTINUUM_NATS_URL"] = nats_server.url
    return env


def start_system(nats_server, tmp_path, sites: str = "sites.yaml", tenants: str = "tenants.yaml",
                 args: tuple[str, ...] = (), **settings: str):
    """`continuum up` with a test catalog (and more `up` arguments, CONTINUUM_* settings), on `nats_server` (None:
    the server `up` starts itself, secure by default); yields the running system and stops it."""
    data_dir = tmp_path / "data"
    env = system_env(nats_server, tmp_path, sites, tenants, **settings)
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--sites", str(CATALOG / sites),
         "--tenants", str(CATALOG / tenants), *args],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    system = RunningSystem(process, data_dir, env, nats_server.url if nats_server is not None else None)
    yield system
    system.stop_extra()
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


async def connect_when_up(system: RunningSystem, timeout: float = 60.0, client: Settings | None = None):
    """A client (as the operator, unless `client` says otherwise), once every site of the catalog is up and every
    service answers its requests."""
    deadline = time.monotonic() + timeout
    await asyncio.to_thread(system.started, timeout)
    nc = await connect(client or system.client())
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


