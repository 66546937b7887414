"""Lists of jobs, for TES and REST alike, from the index of jobs (services/gateway/index.py): what the
principal may see, and nothing acknowledged before the request left out."""

from __future__ import annotations

import asyncio
from datetime import datetime

from fastapi import HTTPException

from services.gateway.context import Gateway
from services.gateway.index import MAX_PAGE, BadPageToken
from services.gateway.principals import Principal

# how long a list waits for the index to reach what the event stream held when the request came
CATCH_UP_S = 2.0


async def jobs_page(gw: Gateway, who: Principal, *, tenant: str | None = None, states: list[str] | None = None,
                    site: str | None = None, since: datetime | None = None, name_prefix: str | None = None,
                    tags: dict[str, str] | None = None, limit: int, page_token: str | None = None,
                    ) -> tuple[list[dict], str | None]:
    """A page of job records, newest first, and the token of the next (None: the last page). A tenant sees
    its own only (asking for another's gives nothing). Everything the stream held when the request came is in
    it: a job submitted a moment before is listed."""
    if who.tenant is not None:
        if tenant not in (None, who.tenant):
            return [], None
        tenant = who.tenant
    await gw.follower.sync(CATCH_UP_S)  # late rather than wrong: a list without it is still an answer
    tags = tags or {}
    # the index matches one tag (a key with any value, for an empty one); the others are matched here
    first = next(iter(tags.items()), None)
    tag = (first[0], first[1] or None) if first else None
    try:
        records, token = await asyncio.to_thread(
            gw.index.page, tenant=tenant, state=states, site=site, since=since, name_prefix=name_prefix, tag=tag,
            limit=min(limit, MAX_PAGE), page_token=page_token)  # a shorter page (TES allows it), then the next
    except BadPageToken as e:
        raise HTTPException(400, f"page_token: {e}") from None
    if len(tags) > 1:
        records = [r for r in records if _has_tags(r, tags)]
    return records, token


def _has_tags(record: dict, tags: dict[str, str]) -> bool:
    labels = (record.get("spec") or {}).get("labels") or {}
    return all(key in labels and (not value or labels[key] == value) for key, value in tags.items())
