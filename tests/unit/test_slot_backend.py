"""services/agent/backends/base.py: slots, the queue, stops, and what the heartbeat lists, on the simulated
backend (real asyncio tasks, no bus)."""

from __future__ import annotations

import asyncio

import pytest

from services.agent.backends.simulated import SimulatedBackend
from shared.contracts.catalog import SiteEntry
from shared.contracts.jobs import Dispatch, JobSpec
from tests.fakes import MemoryReports as Reports

SITE = SiteEntry(id="sim", kind="private_cloud", country="FR", jurisdiction="EU", carbon_g_per_kwh=1,
                 backend="simulated", gpus={"H100": 2}, price_eur_per_gpu_hour={"H100": 1.0})


def order(job_id: str, gpus: int = 1, runtime: float = 600, attempt: int = 0) -> Dispatch:
    spec = JobSpec(tenant="acme", command=["x"], resources={"gpus": gpus, "gpu_type": "H100"},
                   labels={"sim.runtime_s": str(runtime)})
    return Dispatch(job_id=job_id, tenant="acme", site="sim", gpu_type="H100", attempt=attempt, spec=spec)


async def test_the_heartbeat_lists_queued_then_running_jobs_and_reserved_gpus():
    backend = SimulatedBackend(SITE, Reports())
    await backend.submit(order("a", gpus=2))
    await backend.submit(order("b", gpus=1))
    await asyncio.sleep(0)  # let a's run begin
    jobs = backend.jobs()
    assert [(j.job_id, j.started_at is not None) for j in jobs] == [("b", False), ("a", True)]
    assert backend.capacity()["H100"].model_dump() == {"total": 2, "free": 0, "reserved": 1}
    await backend.close()


async def test_a_job_cancelled_before_its_run_began_gives_its_gpus_back():
    reports = Reports()
    backend = SimulatedBackend(SITE, reports)
    await backend.submit(order("a", gpus=2))
    assert await backend.cancel("a", "user asked")  # at once, before the run's first step
    outcome = await reports.outcome("a")
    assert outcome.cancelled and outcome.reason == "user asked"
    assert backend.capacity()["H100"].free == 2 and backend.running == {}


async def test_a_superseded_stop_ends_the_run_without_a_report_and_the_job_can_come_back():
    reports = Reports()
    backend = SimulatedBackend(SITE, reports)
    await backend.submit(order("a", attempt=0))
    await asyncio.sleep(0)
    assert not await backend.cancel("a", "moved", superseded=True, attempt=1)  # not the attempt it runs
    assert await backend.cancel("a", "moved", superseded=True, attempt=0)
    while backend.running:
        await asyncio.sleep(0.01)
    assert [k for k, *_ in reports.log] == ["started", "left"]  # no end reported: it left for another site
    assert backend.capacity()["H100"].free == 2
    # placed here again later (a new attempt): a new job for this site, not a redelivery
    assert await backend.submit(order("a", runtime=0, attempt=2)) is True
    assert (await reports.outcome("a")).exit_code == 0


async def test_a_run_whose_start_cannot_be_reported_does_not_outlive_its_gpus():
    reports = Reports(fail_start=True)
    backend = SimulatedBackend(SITE, reports)
    await backend.submit(order("a", gpus=2))
    outcome = await reports.outcome("a")
    assert outcome.exit_code is None and "no NATS" in outcome.reason
    assert backend.running == {} and backend.capacity()["H100"].free == 2


@pytest.mark.parametrize("runtime", [0.0, 0.05])
async def test_a_redelivered_dispatch_of_a_job_it_has_is_ignored(runtime):
    backend = SimulatedBackend(SITE, Reports())
    assert await backend.submit(order("a", runtime=runtime)) is True
    assert await backend.submit(order("a", runtime=runtime)) is False
    await backend.close()
