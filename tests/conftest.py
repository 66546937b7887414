"""Fixtures shared by the integration and end-to-end tests: a real nats-server of our own on a free port,
and a plain nats-py client that follows what happens on the event stream."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import nats
import orjson
import pytest

from services.runtime import EmbeddedNats
from shared.contracts.streams import Topology
from shared.contracts.subjects import Subjects

SUBJECTS = Subjects()
TOPOLOGY = Topology(SUBJECTS)
# the PostgreSQL the ledger tests use when it is there (this machine runs one; CI on it runs those tests)
POSTGRES_URL = os.environ.get("CONTINUUM_TEST_POSTGRES_URL", "postgresql:///test")


@pytest.fixture
def postgres_url():
    """A fresh schema in the test PostgreSQL, as a URL whose search_path is that schema; dropped after."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL} (set CONTINUUM_TEST_POSTGRES_URL): {str(e).strip()}")
    schema = f"ledger_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    separator = "&" if "?" in POSTGRES_URL else "?"
    yield f"{POSTGRES_URL}{separator}options={quote(f'-csearch_path={schema}')}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


@pytest.fixture(scope="session")
def slurm_cluster():
    """The one-node Slurm test cluster, installed and started by the project's script (Debian's packages)."""
    script = Path(__file__).resolve().parents[1] / "deploy" / "slurm" / "test-cluster.sh"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "continuum-slurm-start.log"
    with log.open("w") as out:
        code = subprocess.run(["bash", str(script), "start"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                              timeout=600, check=False).returncode
    if code == 77:
        pytest.skip(f"no Slurm test cluster on this machine: {log.read_text().strip()}")
    assert code == 0, f"deploy/slurm/test-cluster.sh start failed: {log.read_text()}"
    subprocess.run(["scancel", "--user", str(os.getuid())], check=False)  # nothing left from an earlier run
    return "gpu"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_target(request, tmp_path):
    """Where a ledger lives: a SQLite file, or a PostgreSQL schema (the same tests run on both)."""
    if request.param == "sqlite":
        return tmp_path / "billing" / "ledger.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def nats_server(tmp_path):
    server = EmbeddedNats(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def nats_cluster(tmp_path):
    """Three nats-servers clustered on loopback, from deploy/nats/cluster/'s files (tests/cluster.py)."""
    from tests.cluster import LoopbackCluster

    cluster = LoopbackCluster(tmp_path)
    cluster.start()
    yield cluster
    cluster.stop()


class EventLog:
    """Every event published while it listens (core NATS), and a way to wait for a condition on them."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.by_job: dict[str, list[dict]] = defaultdict(list)
        self.billed: set[str] = set()
        self._changed = asyncio.Condition()

    async def on_message(self, msg) -> None:
        event = orjson.loads(msg.data)
        self.events.append(event)
        if event["type"] == "continuum.billing.usage":
            self.billed.add(event["data"]["job_id"])
        elif "job_id" in event.get("data", {}):
            self.by_job[event["data"]["job_id"]].append(event)
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, condition: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(condition)
        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None

    def kinds(self, job_id: str) -> list[str]:
        return [e["type"].rsplit(".", 1)[-1] for e in self.by_job[job_id]]


async def listen(nc) -> EventLog:
    log = EventLog()
    await nc.subscribe(SUBJECTS.events_all, cb=log.on_message)
    await nc.flush()
    return log


async def read_stream(nc, subject: str = SUBJECTS.events_all) -> list[tuple[str, dict]]:
    """Every stored message of the event stream on `subject`, in order: what JetStream really kept."""
    js = nc.jetstream()
    info = await js.stream_info(TOPOLOGY.events_stream)
    last = info.state.last_seq
    out: list[tuple[str, dict]] = []
    if info.state.messages == 0:
        return out
    sub = await js.pull_subscribe(subject, durable=None, stream=TOPOLOGY.events_stream)
    try:
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=1.0)
            except nats.errors.TimeoutError:
                break
            for m in msgs:
                out.append((m.subject, orjson.loads(m.data)))
                await m.ack()
            if msgs and msgs[-1].metadata.sequence.stream >= last:
                break
    finally:
        await sub.unsubscribe()
    return out


__all__ = ["SUBJECTS", "TOPOLOGY", "EventLog", "listen", "read_stream"]
