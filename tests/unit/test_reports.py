"""services/routing/reports.py: what a site may say about a job, checked before it becomes an event."""

from __future__ import annotations

from services.routing.reports import unacceptable
from shared.contracts.events import event_id
from shared.contracts.jobs import JobEvent, JobEventData, JobState

AT_NL = [("cloud-nl", 0)]


def report(kind: str = "succeeded", site: str = "cloud-nl", tenant: str = "lab", job_id: str = "j1",
           attempt: int = 0, **data):
    return JobEvent.make(f"agent/{site}", "job", kind, job_id, JobEventData(
        job_id=job_id, tenant=tenant, state=JobState(kind), site=site, attempt=attempt, **data), job_id, attempt)


def test_a_report_on_a_job_dispatched_to_that_site_at_that_attempt_passes():
    assert unacceptable("cloud-nl", "lab", "j1", "succeeded", 0, report(), AT_NL) is None
    requeued = report("requeued", attempt=1).model_copy(update={"id": report("requeued").id})
    assert unacceptable("cloud-nl", "lab", "j1", "requeued", 0, requeued, AT_NL) is None


def test_a_site_the_job_left_may_tell_its_runs_steps_late_but_not_end_or_return_it():
    moved = [("cloud-se", 1), *AT_NL]  # the latest placement first
    assert unacceptable("cloud-nl", "lab", "j1", "started", 0, report("started"), moved) is None
    assert unacceptable("cloud-nl", "lab", "j1", "failed", 0, report("failed"), moved) == (
        "site cloud-nl reported failed on job j1 at attempt 0, which was dispatched to cloud-nl (attempt 0), "
        "cloud-se (attempt 1)")


def test_the_attempt_the_registry_reads_must_be_the_one_reported_on():
    lying = report().model_copy(update={"data": report(attempt=5).data})
    assert unacceptable("cloud-nl", "lab", "j1", "succeeded", 0, lying, AT_NL) == (
        "the report's attempt is not the one it reports on")
    # only a cancellation may take the id without an attempt (intake's own has it)
    no_attempt = report().model_copy(update={"id": event_id("job", "j1", "succeeded", "j1")})
    assert unacceptable("cloud-nl", "lab", "j1", "succeeded", 0, no_attempt, AT_NL) == (
        "the report's id is not that of this job, kind and attempt")
    cancel = report("cancelled").model_copy(update={"id": event_id("job", "j1", "cancelled", "j1")})
    assert unacceptable("cloud-nl", "lab", "j1", "cancelled", 0, cancel, AT_NL) is None


def test_a_report_on_another_sites_job_is_refused_naming_where_it_runs():
    forged = report(site="cloud-se")
    assert unacceptable("cloud-se", "lab", "j1", "succeeded", 0, forged, AT_NL) == (
        "site cloud-se reported succeeded on job j1 at attempt 0, which was dispatched to cloud-nl (attempt 0)")
    assert unacceptable("cloud-nl", "lab", "j1", "succeeded", 1, report(attempt=1), AT_NL).endswith(
        "at attempt 1, which was dispatched to cloud-nl (attempt 0)")
    assert unacceptable("cloud-nl", "lab", "j1", "started", 0, report("started"), []) == (
        "job j1 of tenant lab was never dispatched")


def test_a_site_reports_only_what_sites_report():
    assert unacceptable("cloud-nl", "lab", "j1", "placed", 0, report("placed"), AT_NL) == \
        "a site does not report 'placed'"
    assert unacceptable("cloud-nl", "lab", "j1", "accepted", 0, report("accepted"), AT_NL).startswith("a site does not")


def test_the_body_must_agree_with_the_subject_and_the_id_with_job_kind_and_attempt():
    mismatch = "the report's body does not match its subject (job, tenant, kind and site)"
    assert unacceptable("cloud-nl", "lab", "j1", "succeeded", 0, report(tenant="startup"), AT_NL) == mismatch
    assert unacceptable("cloud-nl", "lab", "j1", "succeeded", 0, report(job_id="j2"), AT_NL) == mismatch
    assert unacceptable("cloud-nl", "lab", "j1", "succeeded", 0, report("failed"), AT_NL) == mismatch
    squatting = report().model_copy(update={"id": report("started").id})
    assert unacceptable("cloud-nl", "lab", "j1", "succeeded", 0, squatting, AT_NL) == (
        "the report's id is not that of this job, kind and attempt")
