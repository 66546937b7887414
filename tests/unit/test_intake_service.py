"""services/intake/app.py's Intake on in-memory stores (tests/fakes.py): submissions that share an idempotency
key, one at a time and interleaved, and one whose first try stopped between claiming its key and publishing."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from services.intake.app import Intake
from shared.contracts.catalog import Catalog, SiteEntry, TenantEntry
from shared.contracts.jobs import CancelRequest, JobEvent, JobEventData, JobState
from shared.contracts.subjects import Subjects
from tests.fakes import Gate, MemoryDocuments, MemoryEventLog

SUBJECTS = Subjects()
CATALOG = Catalog(
    sites={"cloud": SiteEntry(id="cloud", kind="private_cloud", country="FR", jurisdiction="EU",
                              carbon_g_per_kwh=50.0, gpus={"H100": 8})},
    tenants={"acme": TenantEntry(id="acme", monthly_budget_eur=100.0)})
BODY = orjson.dumps({"tenant": "acme", "command": ["train"], "resources": {"gpus": 1},
                     "idempotency_key": "nightly-2026-12-02"})


@pytest.fixture
def intake():
    registry, keys = MemoryDocuments(), MemoryDocuments()
    log = MemoryEventLog(SUBJECTS)
    service = Intake(CATALOG, registry, keys, MemoryDocuments(), log, SUBJECTS, max_request_bytes=65536)
    return service, registry, keys, log


async def test_one_key_one_job(intake):
    service, registry, _, log = intake
    first = await service.submit(BODY)
    again = await service.submit(BODY)

    assert (first.state, again.state, again.job_id) == ("accepted", "accepted", first.job_id)
    assert log.kinds() == ["accepted"] and list(registry.values) == [first.job_id]


async def test_two_submissions_of_one_key_at_once_are_one_job(intake):
    service, registry, _, log = intake
    log.gates["accepted"] = gate = Gate()
    first = asyncio.create_task(service.submit(BODY))
    await gate.reached.wait()  # it claimed the key and wrote the record; its event is not out yet
    second = await service.submit(BODY)  # finds the key taken by a job not yet published: finishes that one
    gate.open()

    assert (await first).job_id == second.job_id
    assert log.kinds() == ["accepted"] and len(log.duplicates) == 1  # the same event, kept once
    assert list(registry.values) == [second.job_id]


async def test_a_submission_that_stopped_after_claiming_its_key_is_finished_by_the_next(intake):
    service, _, keys, _ = intake
    lost = await service.submit(BODY)
    # as if that first try had stopped right after claiming the key: the claim is in its bucket, nothing else
    registry, log = MemoryDocuments(), MemoryEventLog(SUBJECTS)
    service = Intake(CATALOG, registry, keys, MemoryDocuments(), log, SUBJECTS, max_request_bytes=65536)

    retry = await service.submit(BODY)

    assert retry.job_id == lost.job_id
    assert log.kinds() == ["accepted"]
    assert registry.values[lost.job_id]["state"] == "accepted"


async def test_a_job_at_a_working_site_is_cancelling_until_the_site_stops_it(intake):
    service, registry, _, log = intake
    job = await service.submit(BODY)
    placed = JobEvent.of("routing", JobEventData(job_id=job.job_id, tenant="acme", state=JobState.placed,
                                                 site="cloud", attempt=1), 1)
    await log.publish_event(SUBJECTS.job_event("acme", job.job_id, "placed"), placed)
    await service.apply(placed, seq=2)
    service.sites.values["cloud"] = {"site_id": "cloud", "state": "up"}

    reply = await service.cancel(CancelRequest(job_id=job.job_id, reason="wrong config"))

    assert reply.state == "cancelling"
    assert log.kinds()[-1] == "cancelling" and registry.values[job.job_id]["state"] == "cancelling"
    assert [(subject, order.job_id, order.attempt) for subject, order in log.commands] == [
        (SUBJECTS.stop("cloud"), job.job_id, 1)]
    again = await service.cancel(CancelRequest(job_id=job.job_id, reason="wrong config"))
    assert again.state == "cancelling" and log.kinds().count("cancelling") == 1  # one event, however often asked
