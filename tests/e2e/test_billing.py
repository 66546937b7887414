"""Billing through the running system: budget events, no paid overflow once the budget is spent until a
top-up, and a ledger that a replay of the whole event stream rebuilds identically, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import sys

import pytest

from services.billing.app import billing_on
from services.billing.ledger import Ledger
from shared.bus import create_bus, request_json
from shared.carbon import default_carbon
from shared.contracts.catalog import Catalog
from shared.contracts.jobs import JobEvent
from tests.conftest import SUBJECTS, listen, read_stream
from tests.e2e.harness import CATALOG, connect_when_up, start_system

pytestmark = pytest.mark.e2e
FINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture
def system(nats_server, tmp_path):
    yield from start_system(nats_server, tmp_path, "billing_sites.yaml", "billing_tenants.yaml")


@pytest.fixture
def system_on_any_ledger(nats_server, tmp_path, ledger_target):
    """The system with its billing ledger in SQLite or in PostgreSQL."""
    ledger = {"CONTINUUM_LEDGER_URL": ledger_target} if isinstance(ledger_target, str) else \
        {"CONTINUUM_LEDGER_PATH": str(ledger_target)}
    yield from start_system(nats_server, tmp_path, "billing_sites.yaml", "billing_tenants.yaml", **ledger)


def spec(gpus: int = 1, runtime: float = 4, walltime: int = 4) -> dict:
    return {"tenant": "pocket-lab", "command": ["train"], "resources": {"gpus": gpus, "gpu_type": "H100"},
            "walltime_s": walltime, "labels": {"sim.runtime_s": str(runtime)}}


async def submit(nc, body: dict) -> str:
    reply = await request_json(nc, SUBJECTS.jobs_submit, body)
    assert reply["state"] == "accepted", reply
    return reply["job_id"]


def first(events, job_id: str, kind: str) -> dict:
    return next(e for e in events.by_job[job_id] if e["type"].endswith("." + kind))["data"]


def budget_events(events) -> list[tuple[str, str, float]]:
    return [(e["type"].rsplit(".", 1)[-1], e["data"]["budget"], e["data"]["limit"]) for e in events.events
            if e["type"] in ("continuum.billing.budget_warning", "continuum.billing.budget_exhausted")]


async def test_a_spent_budget_stops_paid_overflow_until_a_top_up(system_on_any_ledger):
    system = system_on_any_ledger
    nc = await connect_when_up(system)
    events = await listen(nc)
    # the public site full for an hour: past the tenant's 60 s threshold, its jobs overflow
    blocker = await submit(nc, spec(gpus=8, runtime=3600, walltime=3600))
    await events.wait_for(lambda: "placed" in events.kinds(blocker), 20, "the blocker placed")
    paid = [await submit(nc, spec()) for _ in range(2)]  # each may cost, and costs, 1.00 EUR
    await events.wait_for(lambda: all(j in events.billed for j in paid), 30, "two paid jobs billed")
    assert all(first(events, j, "placed")["site"] == "cloud-fr" and first(events, j, "placed")["overflow"]
               for j in paid)
    await events.wait_for(lambda: len(budget_events(events)) >= 2, 10, "budget events")
    assert budget_events(events) == [("budget_warning", "monthly_eur", 2.0), ("budget_exhausted", "monthly_eur", 2.0)]
    exhausted = next(e for e in events.events if e["type"] == "continuum.billing.budget_exhausted")["data"]
    assert exhausted["tenant"] == "pocket-lab" and exhausted["used"] >= 2.0 and exhausted["share"] >= 1.0

    # the next overflow-eligible job is not sent to the paid site: it waits, saying why
    late = await submit(nc, spec())
    await events.wait_for(lambda: "queued" in events.kinds(late), 20, "the late job queued")
    reasons = {c["site"]: c["reasons"] for c in first(events, late, "queued")["decision"]["candidates"]}
    assert reasons["cloud-fr"][0].startswith("monthly budget spent")

    # a top-up (from the command line) makes room for it
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "topup", "pocket-lab", "--eur", "2", "--reason", "test",
        env=system.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()
    assert "monthly_eur" in output.decode() and "4.000" in output.decode()
    await events.wait_for(lambda: late in events.billed, 30, "the late job placed after the top-up and billed")
    assert first(events, late, "placed")["site"] == "cloud-fr"
    # 3.00 of 4.00 EUR: under 80 % of the new limit, no new event
    assert len(budget_events(events)) == 2
    statement = await request_json(nc, SUBJECTS.billing_statement, {"tenant": "pocket-lab"})
    lines = statement["lines"]
    assert {line["job_id"] for line in lines} == {*paid, late} and lines[-1]["job_id"] == late
    assert all(line["amount_eur"] == pytest.approx(line["seconds"] / 4, abs=1e-3) for line in lines)  # 1 EUR / 4 s
    assert statement["totals"]["amount_eur"] == pytest.approx(sum(line["amount_eur"] for line in lines))
    await nc.close()


async def test_replaying_the_event_stream_twice_rebuilds_the_same_ledger(system, ledger_target):
    nc = await connect_when_up(system)
    events = await listen(nc)
    jobs = [await submit(nc, spec(runtime=0.2 * (i % 3), walltime=10)) for i in range(12)]
    jobs.append(await submit(nc, spec(runtime=30, walltime=5)))  # past its walltime: failed, billed
    await events.wait_for(lambda: all(j in events.billed for j in jobs), 40, "every job billed")
    live = (await request_json(nc, SUBJECTS.billing_statement, {"tenant": "pocket-lab"}))["lines"]

    # a fresh billing service (its own ledger) fed every stored event, twice, as a redelivery storm would
    stored = [JobEvent.model_validate(e) for s, e in await read_stream(nc) if s.rsplit(".", 1)[-1] in FINAL]
    assert len(stored) == len(jobs)
    settings = system.client(sites_file=CATALOG / "billing_sites.yaml", tenants_file=CATALOG / "billing_tenants.yaml")
    bus = create_bus(settings, "billing")
    await bus.broker.connect()
    billing = billing_on(bus, Catalog.load(settings.sites_file, settings.tenants_file), default_carbon())
    billing.ledger = Ledger(ledger_target)
    try:
        for _ in range(2):
            for event in stored:
                await billing.meter(event, None)
        rebuilt = [line.model_dump(mode="json") for line in billing.ledger.all_lines()]
    finally:
        billing.ledger.close()
        await bus.broker.stop()
    assert len(rebuilt) == len(jobs)
    assert sorted(rebuilt, key=lambda x: x["job_id"]) == sorted(live, key=lambda x: x["job_id"])
    await nc.close()
