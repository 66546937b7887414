"""GA4GH TES 1.1 routes (CONTRACT.md, v2 "HTTP"), served at /ga4gh/tes/v1 and /v1: the translation is
services/gateway/tes.py's; here, who asks, and the contract's requests."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query
from pydantic import ValidationError

from services.gateway import tes
from services.gateway.context import Through, Who, ask
from services.gateway.lists import jobs_page
from shared.contracts.jobs import JobRef

router = APIRouter(tags=["TaskService"])
STARTED_AT = datetime.now(UTC)
VERSION = "1.1.0"
PAGE_SIZE, MAX_PAGE_SIZE = 256, 2047  # TES: "Must be less than 2048. Defaults to 256."

ViewParam = Annotated[tes.View, Query(description="MINIMAL (id and state), BASIC or FULL")]


@router.get("/service-info", operation_id="GetServiceInfo")
async def get_service_info() -> dict:
    return tes.service_info(VERSION, STARTED_AT)


@router.post("/tasks", operation_id="CreateTask")
async def create_task(task: tes.TesTask, who: Who, gw: Through,
                      traceparent: Annotated[str | None, Header()] = None) -> dict:
    """A task becomes a job; a task Continuum cannot take is a 400 that names its fields."""
    try:
        spec = tes.to_job_spec(task, who.tenant)
    except tes.TesError as e:
        raise HTTPException(400, str(e)) from None
    reply = await ask(gw, gw.contract.subjects.jobs_submit, spec, who, traceparent)
    if reply["state"] != "accepted":
        problems = [(tes.tes_field(p["loc"]), p["msg"]) for p in reply.get("errors", [])]
        raise HTTPException(400, str(tes.TesError(problems)))
    return {"id": reply["job_id"]}


@router.get("/tasks", operation_id="ListTasks")
async def list_tasks(
    who: Who, gw: Through,
    name_prefix: str | None = None,
    state: tes.TesState | None = None,
    tag_key: Annotated[list[str] | None, Query()] = None,
    tag_value: Annotated[list[str] | None, Query()] = None,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = PAGE_SIZE,
    page_token: str | None = None,
    view: ViewParam = "MINIMAL",
) -> dict:
    keys, values = tag_key or [], tag_value or []
    if len(values) > len(keys):
        raise HTTPException(400, "tag_value: one more than tag_key")
    # TES: keys zipped with values, a key without a value (or an empty one) matching any value
    tags = {k: (values[n] if n < len(values) else "") for n, k in enumerate(keys)}
    records, token = await jobs_page(
        gw, who, states=tes.job_states(state) if state else None, name_prefix=name_prefix, tags=tags,
        limit=page_size, page_token=page_token)
    if state:  # failed jobs are either of two TES states, by their exit code
        records = [r for r in records if tes.tes_state(r["state"], r.get("exit_code")) == state]
    return {"tasks": [tes.to_task(r, view) for r in records], **({"next_page_token": token} if token else {})}


@router.get("/tasks/{id}", operation_id="GetTask")
async def get_task(id: str, who: Who, gw: Through, view: ViewParam = "MINIMAL") -> dict:
    record = await ask(gw, gw.contract.subjects.jobs_get, {"job_id": _job_id(id)}, who)
    return tes.to_task(record, view)


@router.post("/tasks/{id}:cancel", operation_id="CancelTask")
async def cancel_task(id: str, who: Who, gw: Through) -> dict:
    await ask(gw, gw.contract.subjects.jobs_cancel,
              {"job_id": _job_id(id), "reason": "cancelled through TES"}, who)
    return {}


def _job_id(task_id: str) -> str:
    """A task id is a job id: anything else is a task that does not exist (404, as for another tenant's)."""
    try:
        return JobRef(job_id=task_id).job_id
    except ValidationError:
        raise HTTPException(404, f"no task {task_id!r}") from None
