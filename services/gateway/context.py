"""What every route of the gateway reaches: the bus, the tokens, the index of jobs, the catalog; and the
principal of the request, from its Authorization header."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request

from services.gateway.contract import Contract, Refused, Unavailable
from services.gateway.index import Follower, JobsIndex
from services.gateway.principals import Principal, Tokens, Unauthorized
from shared.contracts.catalog import Catalog


@dataclass
class Gateway:
    contract: Contract
    tokens: Tokens
    index: JobsIndex
    follower: Follower
    catalog: Catalog
    jaeger_url: str | None = None


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def principal(request: Request) -> Principal:
    try:
        return gateway(request).tokens.authenticate(request.headers.get("authorization"))
    except Unauthorized as e:
        raise HTTPException(401, str(e), headers={"WWW-Authenticate": 'Bearer realm="continuum"'}) from None


Who = Annotated[Principal, Depends(principal)]
Through = Annotated[Gateway, Depends(gateway)]


async def ask(gw: Gateway, subject: str, body: Any, who: Principal | None = None,
              traceparent: str | None = None) -> dict:
    """A contract request for an HTTP route: its refusals and the services' silence as HTTP errors."""
    try:
        return await gw.contract.ask(subject, body, who, traceparent)
    except Refused as e:
        raise HTTPException(404 if e.not_found else 400 if e.bad_request else 502, str(e)) from None
    except Unavailable as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "1"}) from None
