"""services/agent/app.py's SiteAgent with a simulated backend and an in-memory link (tests/fakes.py): what it
reports on a run, and on dispatches it must not run (a job that moved on, one it took before it restarted, one
the site cannot hold)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from services.agent.app import SiteAgent
from shared.contracts.catalog import SiteEntry
from shared.contracts.jobs import Dispatch, JobSpec, Resources
from tests.fakes import MemorySiteLink

T0 = datetime(2026, 12, 2, 12, tzinfo=UTC)
SITE = SiteEntry(id="cloud", kind="private_cloud", country="FR", jurisdiction="EU", carbon_g_per_kwh=50.0,
                 backend="simulated", gpus={"H100": 4})


def order(job_id: str = "j1", gpus: int = 1, attempt: int = 0) -> Dispatch:
    spec = JobSpec(tenant="acme", command=["train"], resources=Resources(gpus=gpus, gpu_type="H100"),
                   labels={"sim.runtime_s": "0"})
    return Dispatch(job_id=job_id, tenant="acme", site="cloud", gpu_type="H100", attempt=attempt, spec=spec)


def record(state: str, attempt: int = 0, site: str | None = None) -> dict:
    return {"job_id": "j1", "tenant": "acme", "state": state, "attempt": attempt, "site": site, "history": []}


@pytest.fixture
async def agent():
    link = MemorySiteLink()
    agent = SiteAgent(SITE, link, heartbeat_interval_s=5.0, clock=lambda: T0)
    await agent.backend.start()
    yield agent, link
    await agent.backend.close()


async def test_a_run_is_reported_step_by_step_each_after_the_one_before(agent):
    agent, link = agent
    link.records["j1"] = record("placed", site="cloud")
    await agent.take(order(), None)
    await asyncio.wait_for(link.ended.wait(), 10)

    assert link.reports == [("j1", "dispatched", 0, None), ("j1", "started", 0, "dispatched"),
                            ("j1", "succeeded", 0, "started")]
    assert agent.heartbeat().gpus["H100"].free == 4  # its GPU back


async def test_a_dispatch_of_a_job_placed_again_since_is_skipped(agent):
    agent, link = agent
    link.records["j1"] = record("placed", attempt=1, site="cloud-nl")
    await agent.take(order(attempt=0), None)

    assert link.reports == []
    assert "j1" not in agent.backend.known


async def test_a_dispatch_this_site_took_before_its_agent_restarted_is_given_back(agent):
    agent, link = agent
    link.records["j1"] = record("started", site="cloud")  # the old agent ran it; this one never had it
    await agent.take(order(), None)

    assert link.reports == [("j1", "requeued", 0, None)]
    (given_back,) = link.events
    assert (given_back.data.attempt, given_back.data.reason) == (1, "site cloud's agent restarted and lost the job")
    assert "j1" not in agent.backend.known


async def test_an_order_for_more_gpus_than_the_site_has_is_refused_for_good(agent):
    agent, link = agent
    link.records["j1"] = record("placed", site="cloud")
    await agent.take(order(gpus=8), None)

    assert link.reports == [("j1", "requeued", 0, None)]
    (refused,) = link.events
    assert refused.data.refusal == "permanent"
    assert refused.data.reason == "site refused: has 4 H100 GPUs, the job needs 8"
    assert agent.heartbeat().gpus["H100"].free == 4


async def test_an_order_whose_files_the_site_cannot_stage_is_refused_for_good(agent):
    # routing never sends one (its policy reads the same catalog), but an agent does not take it on trust
    agent, link = agent
    link.records["j1"] = record("placed", site="cloud")
    spec = order().spec.model_copy(update={"outputs": [{"path": "/out", "url": "file:///srv/out"}]})
    await agent.take(order().model_copy(update={"spec": JobSpec.model_validate(spec.model_dump())}), None)

    (refused,) = link.events
    assert (refused.data.refusal, refused.data.reason) == ("permanent", "site refused: stages no files (outputs.0)")
    assert "j1" not in agent.backend.known
