"""The REST API under /api/v1 (CONTRACT.md, v2 "HTTP"): the contract's requests over HTTP, lists from the
index of jobs, and the event stream as Server-Sent Events that resume from `Last-Event-ID`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Header, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from services.gateway.context import Through, Who, ask
from services.gateway.lists import jobs_page
from shared.contracts.billing import Statement
from shared.contracts.jobs import CancelReply, JobRecord, JobSpec, JobState, SubmitReply
from shared.contracts.sites import SitesReply

router = APIRouter(prefix="/api/v1")
PAGE_SIZE, MAX_PAGE_SIZE = 50, 500


class JobsPage(BaseModel):
    jobs: list[JobRecord]
    # the next page's token; absent on the last page
    next_page_token: str | None = None


class CancelBody(BaseModel):
    reason: str = Field("cancelled by the user", max_length=1024)


class Me(BaseModel):
    principal: str
    # the tenant it acts as; null for the operator (every tenant) or anyone on an open API
    tenant: str | None
    # the tenants it may see
    tenants: list[str]
    # where a job's trace is shown (a Jaeger UI), when one is configured
    jaeger_url: str | None = None


@router.post("/jobs", status_code=201, responses={400: {"model": SubmitReply, "description": "rejected"}})
async def submit_job(spec: JobSpec, who: Who, gw: Through,
                     traceparent: Annotated[str | None, Header()] = None) -> SubmitReply:
    """Submit a JobSpec: 201 with its job id, or 400 with every problem (the submit reply)."""
    reply = await ask(gw, gw.contract.subjects.jobs_submit, spec.model_dump(mode="json", exclude_unset=True), who,
                      traceparent)
    if reply["state"] != "accepted":
        return JSONResponse(reply, status_code=400)  # type: ignore[return-value]
    return SubmitReply.model_validate(reply)


@router.get("/jobs")
async def list_jobs(
    who: Who, gw: Through,
    tenant: str | None = None,
    state: Annotated[list[JobState] | None, Query(description="one or several")] = None,
    site: str | None = None,
    since: Annotated[datetime | None, Query(description="submitted at or after (RFC 3339)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = PAGE_SIZE,
    page_token: str | None = None,
) -> JobsPage:
    """Jobs, newest first, filtered; page with `next_page_token`. A tenant's token lists its own only."""
    records, token = await jobs_page(gw, who, tenant=tenant, states=[s.value for s in state] if state else None,
                                     site=site, since=since, limit=limit, page_token=page_token)
    return JobsPage(jobs=[JobRecord.model_validate(r) for r in records], next_page_token=token)


@router.get("/jobs/{job_id}", responses={404: {"description": "no such job (or another tenant's)"}})
async def get_job(job_id: str, who: Who, gw: Through) -> JobRecord:
    return JobRecord.model_validate(await ask(gw, gw.contract.subjects.jobs_get, {"job_id": job_id}, who))


@router.post("/jobs/{job_id}/cancel", responses={404: {"description": "no such job (or another tenant's)"}})
async def cancel_job(job_id: str, who: Who, gw: Through,
                     body: Annotated[CancelBody | None, Body()] = None) -> CancelReply:
    reason = (body or CancelBody()).reason
    return CancelReply.model_validate(
        await ask(gw, gw.contract.subjects.jobs_cancel, {"job_id": job_id, "reason": reason}, who))


@router.get("/sites")
async def list_sites(_: Who, gw: Through) -> SitesReply:
    """Every site's status: up or down, GPUs free by type, forecast wait, carbon now (what any principal sees)."""
    return SitesReply.model_validate(await ask(gw, gw.contract.subjects.sites_list, {}))


@router.get("/tenants/{tenant}/statement", responses={404: {"description": "no such tenant (or another's)"}})
async def statement(tenant: str, who: Who, gw: Through, since: datetime | None = None,
                    until: datetime | None = None) -> Statement:
    body: dict[str, Any] = {"tenant": tenant, **({"since": since.isoformat()} if since else {}),
                            **({"until": until.isoformat()} if until else {})}
    return Statement.model_validate(await ask(gw, gw.contract.subjects.billing_statement, body, who))


@router.get("/me")
async def me(who: Who, gw: Through) -> Me:
    """Who the request's token is, and what it may see (the dashboard asks this first)."""
    return Me(principal=who.name, tenant=who.tenant, jaeger_url=gw.jaeger_url,
              tenants=[t for t in gw.catalog.tenants if who.may_see(t)])


@router.get("/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "CloudEvents, each with its stream sequence as the SSE id"}})
async def events(who: Who, gw: Through,
                 after: Annotated[int | None, Query(ge=0, description="start after this stream sequence (0: from "
                                                                       "the first); unset, from now on")] = None,
                 last_event_id: Annotated[str | None, Header()] = None) -> EventSourceResponse:
    """The events the principal may see, live, as Server-Sent Events: a tenant's own job and billing events and
    every site's. Each event's `id` is its stream sequence: a client that reconnects with `Last-Event-ID` (as
    browsers do) gets the events after it, with no gap and no repeat. The comment `: open` comes first, once
    nothing published after it can be missed: a client that reads its lists after it misses nothing."""
    if last_event_id is not None:
        if not last_event_id.isdigit():
            raise HTTPException(400, "Last-Event-ID: not an event id of this stream (a sequence number)")
        after = int(last_event_id)
    filters = gw.contract.visible_events(who)

    async def stream():
        opened = False
        async for batch in gw.contract.events(filters, after):
            if not opened:  # its consumer exists: a client that reads this misses nothing published after it
                opened = True
                yield ServerSentEvent(comment="open")
            for seq, event in batch:
                yield ServerSentEvent(data=orjson.dumps(event).decode(), id=str(seq))

    return EventSourceResponse(stream(), ping=15)
