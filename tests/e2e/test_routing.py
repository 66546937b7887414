"""Routing scenarios through the running system: governed overflow, budgets, residency, objectives."""

from __future__ import annotations

import pytest

from shared.bus import request_json
from tests.conftest import SUBJECTS, listen
from tests.e2e.harness import connect_when_up, start_system

pytestmark = pytest.mark.e2e


@pytest.fixture
def system(nats_server, tmp_path):
    yield from start_system(nats_server, tmp_path, "scenario_sites.yaml", "scenario_tenants.yaml")


@pytest.fixture
async def client(system):
    nc = await connect_when_up(system)
    events = await listen(nc)
    yield nc, events
    await nc.close()


def spec(tenant: str, gpus: int = 2, gpu_type: str = "H100", runtime: float = 600, walltime: int = 600, **extra):
    return {"tenant": tenant, "command": ["train"], "resources": {"gpus": gpus, "gpu_type": gpu_type},
            "walltime_s": walltime, "labels": {"sim.runtime_s": str(runtime)}, **extra}


async def submit(client, body: dict) -> str:
    nc, _ = client
    reply = await request_json(nc, SUBJECTS.jobs_submit, body)
    assert reply["state"] == "accepted", reply
    return reply["job_id"]


async def reached(client, job_id: str, kind: str, timeout: float = 30) -> dict:
    """The data of the job's first `kind` event, once it is out."""
    _, events = client
    await events.wait_for(lambda: kind in events.kinds(job_id), timeout, f"{kind} of {job_id}")
    return next(e for e in events.by_job[job_id] if e["type"].endswith("." + kind))["data"]


def reasons_of(data: dict, site: str) -> list[str]:
    return next(c for c in data["decision"]["candidates"] if c["site"] == site)["reasons"]


async def saturate_public(client, tenant: str) -> None:
    """All 8 public H100 held for an hour: the expected public wait is past the tenant's threshold."""
    blocker = await submit(client, spec(tenant, gpus=8, runtime=3600, walltime=3600))
    assert (await reached(client, blocker, "placed"))["site"] == "hpc-fr"


async def test_a_lab_overflows_within_its_residency_and_the_private_sites_share(client):
    await saturate_public(client, "lab")
    jobs = [await submit(client, spec("lab", residency="FR")) for _ in range(3)]
    placed = [await reached(client, j, "placed") for j in jobs[:2]]
    assert {p["site"] for p in placed} == {"cloud-fr"} and all(p["overflow"] for p in placed)
    waiting = await reached(client, jobs[2], "queued")
    # cloud-fr lends overflow half of its 8 H100: the third job waits rather than leave France
    assert reasons_of(waiting, "cloud-fr") == ["overflow share full: overflow jobs hold 4 of 4 H100 GPUs allowed"]
    assert reasons_of(waiting, "cloud-nl") == ["residency FR: site is in NL"]
    assert any("expected in" in r for r in reasons_of(waiting, "hpc-fr"))
    nc, _ = client
    overflow = await request_json(nc, SUBJECTS.routing_overflow, {})
    assert overflow["sites"]["cloud-fr"] == {"jobs": 2, "by_tenant": {"lab": 2}, "gpus_now": 4}
    assert overflow["tenants"] == {"lab": 2}


async def test_overflow_stops_when_the_tenants_budget_is_spent(client):
    await saturate_public(client, "thrifty-lab")
    # each job may cost 1 H100 x 10 s x 2 EUR/h = 0.0056 EUR at cloud-fr and runs 7 s (0.0039 EUR);
    # the budget of 0.01 EUR holds one job's worst case at a time, and two jobs' real cost in all
    cheap = {"gpus": 1, "runtime": 7, "walltime": 10, "objective": "cost"}
    jobs = [await submit(client, spec("thrifty-lab", **cheap)) for _ in range(3)]
    # placed at once and side by side (routing takes a batch of events together): one fits the budget
    _, events = client
    await events.wait_for(lambda: sum("placed" in events.kinds(j) for j in jobs) == 1
                          and sum("queued" in events.kinds(j) for j in jobs) == 2, 30, "one placement, two waits")
    (first,) = [j for j in jobs if "placed" in events.kinds(j)]
    others = [j for j in jobs if j != first]
    assert (await reached(client, first, "placed"))["site"] == "cloud-fr"
    for job_id in others:
        queued = await reached(client, job_id, "queued")
        assert reasons_of(queued, "cloud-fr")[0].startswith("monthly budget spent")
    # once the first is billed, there is room for one more worst case: one of the two waiting jobs goes
    await events.wait_for(lambda: any("placed" in events.kinds(j) for j in others), 60, "a second placement")
    (second,) = [j for j in others if "placed" in events.kinds(j)]
    (third,) = [j for j in others if j != second]
    await events.wait_for(lambda: second in events.billed, 60, "the second job to be billed")
    # two real runs (0.0078 EUR) leave less than a third worst case (0.0056 EUR): no more paid capacity
    late = await submit(client, spec("thrifty-lab", **cheap))
    data = await reached(client, late, "queued")
    assert all(reasons_of(data, s)[0].startswith("monthly budget spent") for s in ("cloud-fr", "cloud-nl"))
    assert "placed" not in events.kinds(third) and "placed" not in events.kinds(late)
    nc, _ = client
    statement = await request_json(nc, SUBJECTS.billing_statement, {"tenant": "thrifty-lab"})
    assert sum(line["amount_eur"] for line in statement["lines"]) <= 0.01


async def test_a_french_job_waits_for_french_capacity(client):
    blocker = await submit(client, spec("media", gpus=8, runtime=5, walltime=60))
    assert (await reached(client, blocker, "placed"))["site"] == "cloud-fr"
    job_id = await submit(client, spec("media", runtime=0.1))
    waiting = await reached(client, job_id, "queued")
    assert reasons_of(waiting, "cloud-nl") == ["residency FR: site is in NL"]
    assert reasons_of(waiting, "cloud-se") == ["residency FR: site is in SE"]
    assert reasons_of(waiting, "hpc-fr") == ["tenant has no public allocation"]
    placed = await reached(client, job_id, "placed", timeout=60)
    assert placed["site"] == "cloud-fr"


@pytest.mark.parametrize(("objective", "site"), [("carbon", "cloud-se"), ("cost", "cloud-nl")])
async def test_the_objective_picks_the_cleanest_or_the_cheapest_site(client, objective, site):
    job_id = await submit(client, spec("startup", gpus=1, gpu_type="L40S", runtime=0.1, objective=objective))
    placed = await reached(client, job_id, "placed")
    assert placed["site"] == site
    scores = {c["site"]: c["score"] for c in placed["decision"]["candidates"] if c["eligible"]}
    assert set(scores) == {"cloud-nl", "cloud-se"} and scores[site] == max(scores.values())


async def test_freed_gpus_go_to_the_higher_priority_first(client):
    blocker = await submit(client, spec("media", gpus=8, runtime=4, walltime=60))
    assert (await reached(client, blocker, "placed"))["site"] == "cloud-fr"
    low = await submit(client, spec("media", gpus=8, runtime=0.5, priority=1))
    await reached(client, low, "queued")
    high = await submit(client, spec("media", gpus=8, runtime=0.5, priority=8))
    await reached(client, high, "queued")
    await reached(client, low, "placed", timeout=60)
    _, events = client
    placed = [e["data"]["job_id"] for e in events.events if e["type"] == "continuum.job.placed"]
    assert placed.index(high) < placed.index(low)  # the low priority came first but waited its turn
