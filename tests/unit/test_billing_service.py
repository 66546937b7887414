"""services/billing/app.py's Billing on in-memory stores (tests/fakes.py) and a real SQLite ledger: a final event
metered twice, a late report of an attempt the job left, and budget events announced once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.billing.app import Billing
from services.billing.ledger import Ledger
from shared.contracts.catalog import Catalog, SiteEntry, TenantEntry
from shared.contracts.jobs import JobEvent, JobEventData, JobState
from shared.contracts.subjects import Subjects
from tests.fakes import MemoryDocuments, MemoryEventLog, NoCarbonData

T0 = datetime(2026, 12, 2, 12, tzinfo=UTC)
SUBJECTS = Subjects()
# 1 H100 for an hour at 2 EUR: a tenant with 5 EUR a month reaches 80 % on its second hour, 100 % on its third
CATALOG = Catalog(
    sites={"cloud": SiteEntry(id="cloud", kind="private_cloud", country="FR", jurisdiction="EU",
                              carbon_g_per_kwh=50.0, gpus={"H100": 8}, price_eur_per_gpu_hour={"H100": 2.0},
                              gpu_watts={"H100": 700.0})},
    tenants={"acme": TenantEntry(id="acme", monthly_budget_eur=5.0)})



@pytest.fixture
def billing(tmp_path):
    jobs, log = MemoryDocuments(), MemoryEventLog(SUBJECTS)
    service = Billing(CATALOG, NoCarbonData(), jobs, MemoryDocuments(), log, SUBJECTS,
                      clock=lambda: T0 + timedelta(days=1))
    service.ledger = Ledger(tmp_path / "ledger.db")
    yield service, jobs, log
    service.ledger.close()


def succeeded(job_id: str, attempt: int = 0, hours: float = 1.0) -> JobEvent:
    data = JobEventData(job_id=job_id, tenant="acme", state=JobState.succeeded, site="cloud", gpu_type="H100",
                        gpus=1, attempt=attempt, started_at=T0, ended_at=T0 + timedelta(hours=hours), exit_code=0)
    return JobEvent.make("agent/cloud", "job", "succeeded", job_id, data, job_id, attempt)



async def test_a_run_metered_twice_is_billed_once(billing):
    service, _, log = billing
    await service.meter(succeeded("j1"), None)
    await service.meter(succeeded("j1"), None)  # redelivered

    (line,) = service.ledger.lines("acme")
    assert (line.job_id, line.amount_eur, line.gpu_hours) == ("j1", 2.0, 1.0)
    assert log.kinds() == ["usage"]


async def test_a_late_report_of_an_attempt_the_job_left_is_not_billed(billing):
    service, jobs, log = billing
    jobs.values["j1"] = {"job_id": "j1", "tenant": "acme", "state": "started", "attempt": 1, "history": []}

    await service.meter(succeeded("j1", attempt=0), None)

    assert service.ledger.lines("acme") == []
    assert log.kinds() == []


async def test_budget_events_are_announced_once_and_routing_told_where_the_tenant_stands(billing):
    service, _, log = billing
    for job_id in ("j1", "j2", "j3"):
        await service.meter(succeeded(job_id), None)
    await service.account("acme")  # once more: nothing new to announce

    # each job's budget events come before its usage event: the account is settled first
    assert log.kinds() == ["usage", "budget_warning", "usage", "budget_exhausted", "usage"]
    # not even sent again: the stream keeps an id out for its dedupe window only, the ledger for good
    assert [e.kind for e in log.duplicates] == []
    assert service.standings.values["acme"]["spent_eur"] == pytest.approx(6.0)
