"""The typed event payloads (shared/contracts): each kind of event the services make is, in JSON, what it was
when its data was a dict built key by key (the contract did not change: the dicts below are what that code
wrote); it reads back as it was written, so routing passes a site's report on unchanged; and an event whose
data is not what its envelope says is refused where it comes in, by the bus."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from pydantic import ValidationError

from shared.bus import _payload
from shared.contracts.billing import BudgetEvent, BudgetStatus, UsageEvent, UsageLine
from shared.contracts.events import CloudEvent
from shared.contracts.jobs import (
    Candidate,
    Decision,
    FieldError,
    JobEvent,
    JobEventData,
    JobSpec,
    JobState,
)
from shared.contracts.sites import GpuCount, SiteEvent, SiteStatus, WaitModel

T = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SPEC = JobSpec(tenant="lab", name="train", command=["python", "train.py"], residency="EU",
               deadline=T + timedelta(days=1), labels={"sim.runtime_s": "5"})
PLACED = Decision(site="cloud-nl", gpu_type="H100", overflow=True, candidates=[
    Candidate(site="cloud-nl", eligible=True, score=0.42, parts={"wait_s": 0.0, "cost_eur": 12.5, "co2e_kg": 0.3}),
    Candidate(site="jean-zay", eligible=False, reasons=["no H100 free (expected in 600 s)"], holds=["gpus"])])
WAITING = Decision(site=None, candidates=[Candidate(site="jean-zay", eligible=False, reasons=["busy"],
                                                   holds=["gpus"])],
                   wait_until=T + timedelta(hours=2))
NEVER = Decision(site=None, impossible=True,
                 candidates=[Candidate(site="jean-zay", eligible=False, reasons=["no L4"])])

SPEC_JSON = {"tenant": "lab", "name": "train", "command": ["python", "train.py"], "image": None,
             "resources": {"gpus": 1, "gpu_type": "any", "cpus": None, "memory_gb": None, "nodes": 1},
             "walltime_s": 3600, "residency": "EU", "certifications": [], "overflow": "allowed",
             "objective": "balanced", "priority": 4, "deadline": "2025-03-02T12:00:00Z", "budget_eur": None,
             "idempotency_key": None, "labels": {"sim.runtime_s": "5"}}
PLACED_JSON = {"site": "cloud-nl", "gpu_type": "H100", "overflow": True, "candidates": [
    {"site": "cloud-nl", "eligible": True, "reasons": [], "holds": [], "score": 0.42,
     "parts": {"wait_s": 0.0, "cost_eur": 12.5, "co2e_kg": 0.3}},
    {"site": "jean-zay", "eligible": False, "reasons": ["no H100 free (expected in 600 s)"], "holds": ["gpus"],
     "score": None, "parts": {}}], "impossible": False, "wait_until": None}
WAITING_JSON = {"site": None, "gpu_type": None, "overflow": False, "candidates": [
    {"site": "jean-zay", "eligible": False, "reasons": ["busy"], "holds": ["gpus"], "score": None, "parts": {}}],
    "impossible": False, "wait_until": "2025-03-01T14:00:00Z"}
NEVER_JSON = {"site": None, "gpu_type": None, "overflow": False, "candidates": [
    {"site": "jean-zay", "eligible": False, "reasons": ["no L4"], "holds": [], "score": None, "parts": {}}],
    "impossible": True, "wait_until": None}
JOB = {"job_id": "j1", "tenant": "lab"}
AGENT = {"site": "cloud-nl", "gpu_type": "H100", "gpus": 8}


def data(state: JobState, **fields) -> JobEventData:
    return JobEventData(job_id="j1", tenant=fields.pop("tenant", "lab"), state=state, **fields)


# each producer's event as the code makes it now, and its data as the dict-building code wrote it
JOB_EVENTS = {
    "intake rejected": (
        data(JobState.rejected, tenant="_invalid", reason="resources.gpus: too many",
             errors=[FieldError(loc=["resources", "gpus"], msg="Input should be less than or equal to 4096")]),
        {"job_id": "j1", "tenant": "_invalid", "state": "rejected",
         "errors": [{"loc": ["resources", "gpus"], "msg": "Input should be less than or equal to 4096"}],
         "reason": "resources.gpus: too many"}),
    "intake accepted": (
        data(JobState.accepted, spec=SPEC, traceparent=TRACEPARENT),
        {**JOB, "state": "accepted", "spec": SPEC_JSON, "traceparent": TRACEPARENT}),
    "intake cancelled, not at a site": (
        data(JobState.cancelled, site=None, reason="cancelled by the user"),
        {**JOB, "state": "cancelled", "reason": "cancelled by the user"}),
    "intake cancelled, its site down": (
        data(JobState.cancelled, site="cloud-nl", reason="cancelled by the user"),
        {**JOB, "state": "cancelled", "site": "cloud-nl", "reason": "cancelled by the user"}),
    "routing queued": (
        data(JobState.queued, attempt=0, decision=WAITING, reasons=WAITING.reasons),
        {**JOB, "state": "queued", "attempt": 0, "decision": WAITING_JSON, "reasons": ["jean-zay: busy"]}),
    "routing placed": (
        data(JobState.placed, attempt=1, decision=PLACED, site="cloud-nl", gpu_type="H100", overflow=True,
             reservation="9f1c"),
        {**JOB, "state": "placed", "site": "cloud-nl", "attempt": 1, "decision": PLACED_JSON, "gpu_type": "H100",
         "overflow": True, "reservation": "9f1c"}),
    "routing rejected": (
        data(JobState.rejected, attempt=0, decision=NEVER, reasons=NEVER.reasons,
             reason="no site in the catalog can ever run this job"),
        {**JOB, "state": "rejected", "attempt": 0, "decision": NEVER_JSON, "reasons": ["jean-zay: no L4"],
         "reason": "no site in the catalog can ever run this job"}),
    "routing failed, given up": (
        data(JobState.failed, attempt=4, decision=None, reasons=[], reason="lost 4 times"),
        {**JOB, "state": "failed", "attempt": 4, "reasons": [], "reason": "lost 4 times"}),
    "routing requeued, its site down": (
        data(JobState.requeued, site="cloud-nl", attempt=2,
             reason="site cloud-nl went down before the job started there"),
        {**JOB, "state": "requeued", "site": "cloud-nl", "attempt": 2,
         "reason": "site cloud-nl went down before the job started there"}),
    "agent dispatched": (
        data(JobState.dispatched, **AGENT, attempt=1),
        {**JOB, "state": "dispatched", **AGENT, "attempt": 1}),
    "agent started": (
        data(JobState.started, **AGENT, started_at=T, attempt=1),
        {**JOB, "state": "started", **AGENT, "started_at": "2025-03-01T12:00:00+00:00", "attempt": 1}),
    "agent succeeded": (
        data(JobState.succeeded, **AGENT, exit_code=0, reason=None, started_at=T,
             ended_at=T + timedelta(seconds=90.5), attempt=1),
        {**JOB, "state": "succeeded", **AGENT, "exit_code": 0, "started_at": "2025-03-01T12:00:00+00:00",
         "ended_at": "2025-03-01T12:01:30.500000+00:00", "attempt": 1}),
    "agent cancelled, never started": (
        data(JobState.cancelled, **AGENT, exit_code=None, reason="cancelled by the user", started_at=None,
             ended_at=T, attempt=1),
        {**JOB, "state": "cancelled", **AGENT, "reason": "cancelled by the user",
         "ended_at": "2025-03-01T12:00:00+00:00", "attempt": 1}),
    "agent requeued, refused": (
        data(JobState.requeued, **AGENT, attempt=2, reason="site refused: sbatch: invalid account",
             refusal="permanent"),
        {**JOB, "state": "requeued", **AGENT, "attempt": 2, "reason": "site refused: sbatch: invalid account",
         "refusal": "permanent"}),
    "agent cancelled, a stop for a job it never had": (
        data(JobState.cancelled, site="cloud-nl", reason="cancelled by the user", attempt=1),
        {**JOB, "state": "cancelled", "site": "cloud-nl", "reason": "cancelled by the user", "attempt": 1}),
}


def wire(event: CloudEvent) -> dict:
    return orjson.loads(event.model_dump_json())


@pytest.mark.parametrize(("made", "written"), JOB_EVENTS.values(), ids=list(JOB_EVENTS))
def test_each_job_event_is_on_the_wire_as_it_was(made: JobEventData, written: dict):
    event = JobEvent.make("test", "job", made.state.value, made.job_id, made, made.job_id, 1, time=T)
    assert wire(event)["data"] == written
    assert wire(event)["id"] == CloudEvent.make("test", "job", made.state.value, "j1", written, "j1", 1).id


@pytest.mark.parametrize(("made", "written"), JOB_EVENTS.values(), ids=list(JOB_EVENTS))
def test_a_job_event_read_is_written_again_unchanged(made: JobEventData, written: dict):
    """What a consumer validated and publishes again (routing, a site's report) is what came in."""
    sent = JobEvent.make("test", "job", made.state.value, made.job_id, written, made.job_id, time=T)
    raw = orjson.dumps(wire(sent))
    read = JobEvent.model_validate_json(raw)
    assert orjson.loads(read.model_dump_json()) == orjson.loads(raw)
    assert read.model_dump_json() == JobEvent.model_validate_json(read.model_dump_json()).model_dump_json()


def test_a_job_event_keeps_what_this_code_does_not_know_and_tells_an_attempt_given_from_none():
    newer = {**JOB, "state": "started", "site": "cloud-nl", "node": "gpu-12", "started_at": "2025-03-01T13:00:00+01:00"}
    read = JobEvent.model_validate_json(orjson.dumps(wire(CloudEvent.make("a", "job", "started", "j1", newer, "j1"))))
    assert wire(read)["data"] == newer  # its offset too
    assert read.data.attempt == 0 and not read.data.gives("attempt") and read.data.reasons == []
    assert data(JobState.started, attempt=0).gives("attempt") and not data(JobState.started, site=None).gives("site")


def test_site_and_billing_events_are_on_the_wire_as_they_were():
    status = SiteStatus(site_id="cloud-nl", kind="private_cloud", country="NL", state="up",
                        gpus={"H100": GpuCount(total=64, free=8, reserved=2)}, queued=1, est_wait_s=30.0,
                        est_wait_s_by_type={"H100": 30.0}, wait_model=WaitModel(samples=3),
                        carbon_g_per_kwh=320.5, price_eur_per_gpu_hour={"H100": 2.9}, last_seen=T, running=5,
                        since=T - timedelta(days=1), jobs=["j1"])
    assert wire(SiteEvent.make("capacity", "site", "up", "cloud-nl", status, T))["data"] == {
        "site_id": "cloud-nl", "kind": "private_cloud", "country": "NL", "state": "up", "saturated": False,
        "gpus": {"H100": {"total": 64, "free": 8, "reserved": 2}}, "queued": 1, "est_wait_s": 30.0,
        "est_wait_s_by_type": {"H100": 30.0},
        "wait_model": {"start_latency_s": 0.0, "walltime_factor": 1.0, "samples": 3}, "carbon_g_per_kwh": 320.5,
        "price_eur_per_gpu_hour": {"H100": 2.9}, "last_seen": "2025-03-01T12:00:00Z", "running": 5,
        "since": "2025-02-28T12:00:00Z", "down_since": None, "jobs": ["j1"]}
    line = UsageLine(job_id="j1", tenant="lab", site="cloud-nl", gpu_type="H100", gpus=8, started_at=T,
                     ended_at=T + timedelta(seconds=90.5), state="succeeded", seconds=90.5, gpu_hours=0.2011,
                     amount_eur=0.58, allocation_hours=0.0, energy_kwh=0.17, co2e_kg=0.05)
    assert wire(UsageEvent.make("billing", "billing", "usage", "lab", line, "j1"))["data"] == {
        "job_id": "j1", "tenant": "lab", "site": "cloud-nl", "gpu_type": "H100", "gpus": 8,
        "started_at": "2025-03-01T12:00:00Z", "ended_at": "2025-03-01T12:01:30.500000Z", "state": "succeeded",
        "seconds": 90.5, "gpu_hours": 0.2011, "amount_eur": 0.58, "allocation_hours": 0.0, "energy_kwh": 0.17,
        "co2e_kg": 0.05}
    budget = BudgetStatus(tenant="lab", budget="monthly_eur", period="2025-03", used=80.0, limit=100.0, share=0.8)
    assert wire(BudgetEvent.make("billing", "billing", "budget_warning", "lab", budget))["data"] == {
        "tenant": "lab", "budget": "monthly_eur", "period": "2025-03", "used": 80.0, "limit": 100.0, "share": 0.8}


async def _takes_job_events(event: JobEvent) -> None: ...


async def _takes_site_events(event: SiteEvent) -> None: ...


async def _takes_any_event(event: CloudEvent) -> None: ...


def test_an_event_whose_data_is_not_its_kinds_is_refused_where_it_comes_in():
    """The bus decodes a consumer's message as its handler's parameter: a malformed one never reaches it (and
    is dead-lettered after its tries: tests/integration/test_bus.py)."""
    def raw(data: dict, area: str = "job") -> bytes:
        return orjson.dumps(wire(CloudEvent.make("a", area, "succeeded", "j1", data, "j1")))
    no_job = raw({"tenant": "lab", "state": "succeeded", "site": "cloud-nl"})
    with pytest.raises(ValidationError) as refused:
        _payload(_takes_job_events).validate_json(no_job)
    assert [e["loc"] for e in refused.value.errors()] == [("data", "job_id")]
    with pytest.raises(ValidationError):
        _payload(_takes_job_events).validate_json(raw({**JOB, "state": "exploded"}))
    with pytest.raises(ValidationError):
        _payload(_takes_job_events).validate_json(raw({**JOB, "state": "failed", "exit_code": "segfault"}))
    with pytest.raises(ValidationError):
        _payload(_takes_site_events).validate_json(raw({"state": "down"}, "site"))
    # the untyped envelope takes any JSON object: the typed one is what refuses it
    assert _payload(_takes_any_event).validate_json(no_job).data["tenant"] == "lab"
    assert _payload(_takes_job_events).validate_json(raw({**JOB, "state": "succeeded"})).data.job_id == "j1"
