"""services/gateway/tes.py: a TES task becomes a JobSpec, a JobRecord a TES task, as the contract maps them."""

from __future__ import annotations

import jsonschema
import pytest
from tes.models import Task
from tes.utils import unmarshal

from services.gateway import tes
from services.gateway.tes import TesState, TesTask, to_job_spec, to_task
from tests.tes_schema import check

T0 = "2026-12-02T09:00:00Z"


def task(**fields) -> TesTask:
    return TesTask.model_validate({"executors": [{"image": "ubuntu:24.04", "command": ["echo", "hi"]}], **fields})


def record(state: str, **fields) -> dict:
    spec = {"tenant": "lab", "name": "align", "command": ["echo", "hi"], "image": "ubuntu:24.04",
            "resources": {"gpus": 4, "gpu_type": "H100", "cpus": 8}, "residency": "FR",
            "labels": {"WORKFLOW_ID": "wf-1", tes.DESCRIPTION_LABEL: "aligns reads"}}
    history = [{"state": "accepted", "time": T0, "event_id": "e1", "seq": 1},
               {"state": "started", "time": "2026-12-02T09:00:05Z", "event_id": "e2", "seq": 5, "site": "jean-zay"},
               {"state": state, "time": "2026-12-02T09:01:00Z", "event_id": "e3", "seq": 9, "site": "jean-zay"}]
    return {"job_id": "j1", "tenant": "lab", "state": state, "site": "jean-zay", "spec": spec,
            "history": history, "exit_code": None, "reasons": [], "attempt": 1, **fields}


def test_the_first_executor_is_the_job_and_backend_parameters_place_it():
    spec = to_job_spec(task(name="align", tags={"WORKFLOW_ID": "wf-1"}, resources={
        "cpu_cores": 8, "ram_gb": 64.0, "backend_parameters": {
            "GPUs": "4", "gpu_type": "H100", "residency": "FR", "certifications": "secnumcloud, hds",
            "priority": "7", "budget_eur": "12.5", "deadline": "2026-12-03T00:00:00Z"}}), "lab")

    assert spec["tenant"] == "lab" and spec["name"] == "align"
    assert spec["command"] == ["echo", "hi"] and spec["image"] == "ubuntu:24.04"
    assert spec["resources"] == {"gpus": 4, "gpu_type": "H100", "cpus": 8, "memory_gb": 64.0}
    assert (spec["residency"], spec["certifications"], spec["priority"], spec["budget_eur"]) == (
        "FR", ["secnumcloud", "hds"], 7, 12.5)
    assert spec["labels"] == {"WORKFLOW_ID": "wf-1"} and "steps" not in spec


def test_on_an_open_api_the_tenant_tag_names_the_tenant_and_without_it_the_field_is_named():
    assert to_job_spec(task(tags={tes.TENANT_TAG: "lab"}), None)["tenant"] == "lab"
    with pytest.raises(tes.TesError) as refused:
        to_job_spec(task(), None)
    assert refused.value.problems[0][0] == "tags.continuum.tenant"


def test_problems_name_the_tes_fields_the_client_sent():
    with pytest.raises(tes.TesError) as refused:
        to_job_spec(task(resources={"backend_parameters": {"gpus": "four", "priority": "12"}}), "lab")
    where = [field for field, _ in refused.value.problems]
    assert where == ["resources.backend_parameters.gpus"]  # what cannot be read at all, first
    with pytest.raises(tes.TesError) as refused:
        to_job_spec(task(resources={"backend_parameters": {"priority": "12"}}), "lab")
    assert [field for field, _ in refused.value.problems] == ["resources.backend_parameters.priority"]


def test_unknown_backend_parameters_are_dropped_unless_strict():
    assert "labels" in to_job_spec(task(resources={"backend_parameters": {"VmSize": "big"}}), "lab")
    with pytest.raises(tes.TesError) as refused:
        to_job_spec(task(resources={"backend_parameters": {"VmSize": "big"}, "backend_parameters_strict": True}),
                    "lab")
    assert refused.value.problems[0][0] == "resources.backend_parameters.VmSize"


@pytest.mark.parametrize(("fields", "where"), [
    ({"volumes": ["/vol/A"]}, "volumes"),
    ({"inputs": [{"path": "/data/in", "url": "file:///srv/in", "type": "DIRECTORY"}]}, "inputs.0.type"),
    ({"inputs": [{"path": "/data/in"}]}, "inputs.0.url"),
    ({"outputs": [{"path": "/data/*.bam", "url": "file:///srv/out"}]}, "outputs.0.path"),
])
def test_what_no_site_can_do_is_refused_naming_the_field(fields, where):
    with pytest.raises(tes.TesError) as refused:
        to_job_spec(task(**fields), "lab")
    assert where in [field for field, _ in refused.value.problems]


@pytest.mark.parametrize(("state", "exit_code", "expected"), [
    ("accepted", None, TesState.QUEUED), ("queued", None, TesState.QUEUED), ("placed", None, TesState.QUEUED),
    ("requeued", None, TesState.QUEUED), ("dispatched", None, TesState.INITIALIZING),
    ("started", None, TesState.RUNNING), ("succeeded", 0, TesState.COMPLETE),
    ("failed", 3, TesState.EXECUTOR_ERROR), ("failed", None, TesState.SYSTEM_ERROR),
    ("cancelling", None, TesState.CANCELING), ("cancelled", None, TesState.CANCELED),
    ("rejected", None, TesState.SYSTEM_ERROR),
])
def test_states_map_as_the_contract_says(state, exit_code, expected):
    assert tes.tes_state(state, exit_code) == expected
    assert state in tes.job_states(expected)


def test_a_finished_task_in_the_full_view_has_its_exit_code_and_only_tes_fields():
    found = to_task(record("failed", exit_code=3), "FULL")

    check(found, "tesTask")
    assert found["state"] == "EXECUTOR_ERROR" and found["logs"][0]["logs"][0]["exit_code"] == 3
    assert found["description"] == "aligns reads" and found["tags"] == {"WORKFLOW_ID": "wf-1"}
    assert found["resources"]["backend_parameters"]["gpus"] == "4"
    assert found["logs"][0]["metadata"]["continuum.site"] == "jean-zay"
    assert found["creation_time"] == T0 and "system_logs" in found["logs"][0]
    assert unmarshal(found, Task).logs[0].logs[0].exit_code == 3  # a strict client reads it


def test_views_leave_out_what_tes_says_they_leave_out():
    job = record("succeeded", exit_code=0)
    job["spec"]["inputs"] = [{"path": "/srv/job.sh", "content": "echo hi"}]
    assert to_task(job, "MINIMAL") == {"id": "j1", "state": "COMPLETE"}
    basic, full = to_task(job, "BASIC"), to_task(job, "FULL")
    for view in (basic, full):
        check(view, "tesTask")
        unmarshal(view, Task)
    assert "content" not in basic["inputs"][0] and "system_logs" not in basic["logs"][0]
    assert full["inputs"][0]["content"] == "echo hi"


def test_the_strict_schema_refuses_a_field_tes_does_not_define():
    found = to_task(record("started"), "BASIC")
    found["site"] = "jean-zay"
    with pytest.raises(jsonschema.ValidationError):
        check(found, "tesTask")


def test_a_task_comes_back_as_it_was_sent():
    sent = task(name="align", tags={"WORKFLOW_ID": "wf-1"}, description="aligns reads",
                resources={"cpu_cores": 8, "backend_parameters": {"gpus": "4", "residency": "FR"}})
    spec = to_job_spec(sent, "lab")
    job = record("queued", spec=spec)
    back = to_task(job, "BASIC")
    assert back["executors"] == [{"image": "ubuntu:24.04", "command": ["echo", "hi"]}]
    assert back["name"] == "align" and back["description"] == "aligns reads"
    assert back["tags"] == {"WORKFLOW_ID": "wf-1"}
    assert back["resources"]["cpu_cores"] == 8
    assert {"gpus": "4", "residency": "FR"}.items() <= back["resources"]["backend_parameters"].items()
