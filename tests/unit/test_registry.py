"""shared/registry.py: apply_event folds a job's events into its JobRecord."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest

from shared.contracts.jobs import (
    Candidate,
    Decision,
    JobEvent,
    JobEventData,
    JobRecord,
    JobState,
)
from shared.registry import apply_event

JOB = "job-1"
TENANT = "cnrs-lab"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SPEC = {"tenant": TENANT, "command": ["python", "train.py"], "residency": "EU"}


def event(state: JobState, *id_parts, minute: int = 0, site: str | None = None, **extra):
    data = JobEventData(job_id=JOB, tenant=TENANT, state=state, site=site, **extra)
    return JobEvent.make("test", "job", state.value, JOB, data, JOB, *id_parts, time=T0 + timedelta(minutes=minute))


def decision(site: str) -> dict:
    return Decision(site=site, gpu_type="H100", candidates=[Candidate(site=site, eligible=True, score=3.0)]).model_dump(
        mode="json")


def fold(*steps) -> dict:
    """Apply (event, seq) pairs in the order given; every one must change the record."""
    record = None
    for ev, seq in steps:
        record = apply_event(record, ev, seq)
        assert record is not None
    return record


@pytest.fixture
def accepted():
    return event(JobState.accepted, spec=SPEC)


def test_first_event_creates_the_record(accepted):
    record = JobRecord.model_validate(apply_event(None, accepted, 1))
    assert record.job_id == JOB
    assert record.tenant == TENANT
    assert record.state == JobState.accepted
    assert record.spec is not None and record.spec.command == ["python", "train.py"]
    assert [(h.state, h.event_id, h.seq) for h in record.history] == [(JobState.accepted, accepted.id, 1)]
    assert record.site is None


def test_the_record_is_json_ready(accepted):
    record = apply_event(None, accepted, 1)
    assert isinstance(record, dict)
    assert record["state"] == "accepted"
    assert isinstance(record["history"][0]["time"], str)


def test_applying_the_same_event_twice_changes_nothing(accepted):
    record = apply_event(None, accepted, 1)
    assert apply_event(record, accepted, 1) is None
    # even when it comes back at another stream position (a redelivery)
    assert apply_event(record, accepted, 7) is None


def test_the_same_placed_event_twice_returns_none_the_second_time(accepted):
    placed = event(JobState.placed, 1, site="jean-zay", attempt=1, decision=decision("jean-zay"))
    record = fold((accepted, 1), (placed, 2))
    assert apply_event(record, placed, 2) is None
    assert len(record["history"]) == 2


def test_placed_sets_site_and_decision(accepted):
    placed = event(JobState.placed, 1, minute=1, site="jean-zay", attempt=1, decision=decision("jean-zay"))
    record = JobRecord.model_validate(fold((accepted, 1), (placed, 2)))
    assert record.state == JobState.placed
    assert record.site == "jean-zay"
    assert record.decision is not None
    assert record.decision.site == "jean-zay"
    assert record.decision.gpu_type == "H100"
    assert record.attempt == 1


def test_requeued_clears_site(accepted):
    placed = event(JobState.placed, 1, minute=1, site="scw-par", attempt=1, decision=decision("scw-par"))
    requeued = event(JobState.requeued, 1, minute=2, attempt=1, reason="site lost the job")
    record = JobRecord.model_validate(fold((accepted, 1), (placed, 2), (requeued, 3)))
    assert record.state == JobState.requeued
    assert record.site is None
    assert record.reasons == ["site lost the job"]


def test_a_requeued_job_placed_again_gets_the_new_site(accepted):
    steps = [
        (accepted, 1),
        (event(JobState.placed, 1, minute=1, site="scw-par", attempt=1, decision=decision("scw-par")), 2),
        (event(JobState.requeued, 1, minute=2, attempt=1), 3),
        (event(JobState.placed, 2, minute=3, site="scw-ams", attempt=2, decision=decision("scw-ams")), 4),
    ]
    record = JobRecord.model_validate(fold(*steps))
    assert record.state == JobState.placed
    assert record.site == "scw-ams"
    assert record.decision.site == "scw-ams"
    assert record.attempt == 2


def test_failed_sets_exit_code(accepted):
    steps = [
        (accepted, 1),
        (event(JobState.placed, 1, minute=1, site="scw-par", attempt=1), 2),
        (event(JobState.started, 1, minute=2, site="scw-par", attempt=1), 3),
        (event(JobState.failed, 1, minute=3, site="scw-par", attempt=1, exit_code=137, reason="exit 137"), 4),
    ]
    record = JobRecord.model_validate(fold(*steps))
    assert record.state == JobState.failed
    assert record.exit_code == 137
    assert record.history[-1].model_extra["exit_code"] == 137


def test_succeeded_sets_exit_code_zero(accepted):
    record = JobRecord.model_validate(fold((accepted, 1), (event(JobState.succeeded, 1, minute=5, exit_code=0), 2)))
    assert record.state == JobState.succeeded
    assert record.exit_code == 0


def test_terminal_state_is_final_even_if_a_later_started_arrives(accepted):
    steps = [
        (accepted, 1),
        (event(JobState.placed, 1, minute=1, site="scw-par", attempt=1), 2),
        (event(JobState.cancelled, minute=2, reason="cancelled by the user"), 3),
        (event(JobState.started, 1, minute=3, site="scw-par", attempt=1), 4),
    ]
    record = JobRecord.model_validate(fold(*steps))
    assert record.state == JobState.cancelled
    # the late event is kept in the history all the same
    assert [h.state for h in record.history] == [JobState.accepted, JobState.placed, JobState.cancelled,
                                                 JobState.started]


def test_first_terminal_state_wins_over_a_later_terminal_one(accepted):
    steps = [
        (accepted, 1),
        (event(JobState.cancelled, minute=1), 2),
        (event(JobState.failed, 1, minute=2, exit_code=1), 3),
    ]
    assert fold(*steps)["state"] == "cancelled"


def test_out_of_order_seq_does_not_move_the_state_backwards(accepted):
    placed = event(JobState.placed, 1, minute=2, site="jean-zay", attempt=1, decision=decision("jean-zay"))
    queued = event(JobState.queued, minute=1, reasons=["jean-zay: needs 8 H100 GPUs now, 0 free"])
    # stream order: accepted 1, queued 2, placed 3; the queued event is delivered last
    record = JobRecord.model_validate(fold((accepted, 1), (placed, 3), (queued, 2)))
    assert record.state == JobState.placed
    assert record.site == "jean-zay"
    assert record.decision.site == "jean-zay"
    assert [h.seq for h in record.history] == [1, 2, 3]


def test_a_late_older_placement_does_not_replace_the_newer_site(accepted):
    old = event(JobState.placed, 1, minute=1, site="scw-par", attempt=1, decision=decision("scw-par"))
    new = event(JobState.placed, 2, minute=3, site="scw-ams", attempt=2, decision=decision("scw-ams"))
    record = JobRecord.model_validate(fold((accepted, 1), (new, 5), (old, 2)))
    assert record.site == "scw-ams"
    assert record.decision.site == "scw-ams"
    assert record.attempt == 2


def test_attempt_never_goes_down(accepted):
    record = fold(
        (accepted, 1),
        (event(JobState.placed, 2, site="a", attempt=2), 2),
        (event(JobState.dispatched, 1, site="a", attempt=1), 3),
    )
    assert record["attempt"] == 2


def test_traceparent_is_kept_from_the_first_event_that_has_one():
    first = event(JobState.accepted, spec=SPEC, traceparent="00-aaaa-bbbb-01")
    second = event(JobState.placed, 1, site="a", traceparent="00-cccc-dddd-01")
    assert fold((first, 1), (second, 2))["traceparent"] == "00-aaaa-bbbb-01"


def test_exit_code_stays_with_the_terminal_state(accepted):
    steps = [
        (accepted, 1),
        (event(JobState.succeeded, 1, minute=5, exit_code=0), 2),
        (event(JobState.failed, 1, minute=6, exit_code=137), 3),
    ]
    record = fold(*steps)
    assert record["state"] == "succeeded"
    assert record["exit_code"] == 0


def test_events_applied_in_any_order_give_the_same_record():
    """A consumer may apply a batch concurrently: the record must not depend on the order."""
    import itertools

    decision = {"site": "s1", "gpu_type": "H100", "overflow": False,
                "candidates": [{"site": "s1", "eligible": True, "reasons": [], "score": 1.0, "parts": {}}]}
    kinds = [("accepted", {"spec": None}), ("placed", {"site": "s1", "decision": decision}),
             ("dispatched", {"site": "s1"}), ("started", {"site": "s1"}), ("failed", {"site": "s1", "exit_code": 4})]
    events = [(JobEvent.make("t", "job", k, "j1", JobEventData(job_id="j1", tenant="t", state=k, **d), "j1"), seq)
              for seq, (k, d) in enumerate(kinds, start=1)]
    results = []
    for order in itertools.permutations(events):
        record = None
        for event, seq in order:
            record = apply_event(record, event, seq) or record
        results.append(record)
    first = results[0]
    assert first["state"] == "failed" and first["site"] == "s1" and first["exit_code"] == 4
    assert first["decision"]["site"] == "s1"
    assert all(r == first for r in results)


def test_a_placement_clears_the_reasons_the_job_waited_for():
    def event(kind: str, seq: int, **data):
        payload = JobEventData(job_id="j1", tenant="t", state=kind, **data)
        return JobEvent.make("t", "job", kind, "j1", payload, "j1"), seq

    record = None
    for e, seq in (event("accepted", 1), event("queued", 2, reasons=["s1: busy"]), event("placed", 3, site="s1")):
        record = apply_event(record, e, seq) or record
    assert record["state"] == "placed" and record["reasons"] == []


def test_late_events_of_an_attempt_the_job_left_change_nothing(accepted):
    # placed and started at site a, requeued when a was lost, placed and started at b; then a, reconnected,
    # reports its old run's end
    record = fold(
        (accepted, 1),
        (event(JobState.placed, 0, site="a", attempt=0, decision=decision("a")), 2),
        (event(JobState.started, 0, site="a", attempt=0), 3),
        (event(JobState.requeued, 1, site="a", attempt=1, reason="site a went down"), 4),
        (event(JobState.placed, 1, site="b", attempt=1, decision=decision("b")), 5),
        (event(JobState.started, 1, site="b", attempt=1), 6),
        (event(JobState.succeeded, 0, site="a", attempt=0, exit_code=0), 7),
    )
    job = JobRecord.model_validate(record)
    assert (job.state, job.site, job.attempt, job.exit_code) == (JobState.started, "b", 1, None)
    assert job.history[-1].state == JobState.succeeded  # kept, for the record
    job = JobRecord.model_validate(apply_event(record, event(JobState.failed, 1, site="b", attempt=1, exit_code=3), 8))
    assert (job.state, job.site, job.exit_code) == (JobState.failed, "b", 3)


def test_the_record_given_is_left_as_it_was(accepted):
    """The fold works on the stored JSON: the record it is given (a cache's copy) must not change under it."""
    record = fold((accepted, 1), (event(JobState.placed, site="a", attempt=0, decision=decision("a")), 2))
    before = copy.deepcopy(record)
    for ev, seq in ((event(JobState.started, site="a", attempt=0), 3),
                    (event(JobState.requeued, 1, site="a", attempt=1, reason="lost"), 4),
                    (event(JobState.failed, site="a", attempt=0, exit_code=2, reason="late"), 5)):
        assert apply_event(record, ev, seq) is not None
    assert record == before


def test_a_job_asked_to_stop_stays_cancelling_until_its_site_says_it_ended(accepted):
    record = fold(
        (accepted, 1),
        (event(JobState.placed, 1, minute=1, site="scw-par", attempt=1), 2),
        (event(JobState.dispatched, 1, minute=2, site="scw-par", attempt=1), 3),
        (event(JobState.cancelling, minute=3, site="scw-par", reason="wrong config"), 4),
    )
    assert record["state"] == "cancelling" and record["reasons"] == ["wrong config"]
    # the site started the run before the stop order reached it: the job is still being stopped
    record = apply_event(record, event(JobState.started, 1, minute=4, site="scw-par", attempt=1), 5)
    assert record is not None and record["state"] == "cancelling" and record["site"] == "scw-par"
    record = apply_event(record, event(JobState.cancelled, 1, minute=5, site="scw-par", attempt=1), 6)
    assert record is not None and record["state"] == "cancelled"
