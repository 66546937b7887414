"""`continuum service gateway`: FastAPI on uvicorn, a stateless translator between HTTP and the contract on the
bus (CONTRACT.md, v2 "HTTP"). TES at /ga4gh/tes/v1 (and /v1), REST at /api/v1, the dashboard at /, the
OpenAPI document at /openapi.json, liveness at /healthz and readiness at /readyz.

Its one piece of state is the index of jobs that lists read, a projection of the event stream it can rebuild
at any time (SQLite of its own, or one PostgreSQL index that every gateway shares)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.auth import OPERATOR_PRINCIPAL, SERVICES_PRINCIPAL
from services.gateway import SERVICE, rest_api, tes_api
from services.gateway.context import Gateway
from services.gateway.contract import Contract
from services.gateway.index import Follower, JobsIndex
from services.gateway.principals import Tokens
from shared import health
from shared.bus import connect
from shared.contracts.catalog import Catalog
from shared.contracts.subjects import Subjects
from shared.settings import Settings

log = structlog.get_logger()
DASHBOARD = Path(__file__).parent / "dashboard"
# a body this much larger than the largest JobSpec intake takes is refused before it is read on
BODY_SLACK = 2


def tokens_folder(settings: Settings) -> Path | None:
    """The HTTP tokens: CONTINUUM_TOKENS_DIR, else those `auth init` wrote beside this process's credentials.
    None (an open API) only when the bus is open too: an API open on a server that asks credentials of
    everyone would let anyone act as the gateway's own principal."""
    if settings.tokens_dir:
        return settings.tokens_dir
    if settings.nats_creds is None:
        return None
    beside = settings.nats_creds.parent.parent / "tokens"
    if not beside.is_dir():
        raise ValueError(f"CONTINUUM_TOKENS_DIR is not set and there is no {beside}: the HTTP API would be open "
                         "on a server that requires credentials")
    return beside


def create_app(settings: Settings) -> FastAPI:
    tokens = Tokens(tokens_folder(settings))
    catalog = Catalog.load(settings.sites_file, settings.tenants_file)
    subjects = Subjects(settings.prefix)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nc = await connect(settings, name=f"continuum-{SERVICE}", max_reconnect_attempts=-1)
        contract = Contract(nc, subjects)
        index = await asyncio.to_thread(JobsIndex.from_settings, settings)
        follower = Follower(contract.js, index, subjects).start()
        app.state.gateway = Gateway(contract, tokens, index, follower, catalog, settings.jaeger_url)
        # what start-up made (modules, the catalog, the app) lives as long as the process: out of the collector's
        # full passes, which otherwise walk it all every so often, in the middle of a request (tens of ms)
        gc.collect()
        gc.freeze()
        log.info("gateway.ready", open=tokens.open)
        try:
            yield
        finally:
            await follower.stop()
            index.close()
            await nc.drain()

    app = FastAPI(title="Continuum", version="2", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="GA4GH TES 1.1 at /ga4gh/tes/v1 and the REST API at /api/v1 (CONTRACT.md, v2 "
                              "HTTP). Authorization: Bearer <token> when auth is on.")
    app.include_router(tes_api.router, prefix="/ga4gh/tes/v1")
    app.include_router(tes_api.router, prefix="/v1", include_in_schema=False)
    app.include_router(rest_api.router)
    app.add_exception_handler(RequestValidationError, _bad_request)  # type: ignore[arg-type]
    app.add_middleware(BodyLimit, max_bytes=BODY_SLACK * settings.max_request_bytes)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "alive"}

    def not_ready() -> str | None:
        gateway: Gateway | None = getattr(app.state, "gateway", None)
        if gateway is None:
            return "starting: not connected to NATS yet"
        return None if gateway.contract.nc.is_connected else "NATS connection lost: reconnecting"

    health.require("bus", not_ready)  # the same on the metrics port, as every service has it

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        gateway: Gateway | None = getattr(request.app.state, "gateway", None)
        ready = not_ready() is None
        body: dict = {"status": "ready" if ready else "not ready"}
        if gateway is not None:  # how far lists can see: the event stream's sequence the index holds
            body["index_caught_up_to"] = gateway.follower.caught_up_to
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD / "index.html")

    app.mount("/static", StaticFiles(directory=DASHBOARD, check_dir=False), name="static")
    return app


async def _bad_request(_: Request, error: RequestValidationError) -> JSONResponse:
    """A request that is not what a route takes: 400, naming every problem and where it is."""
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
                         for e in error.errors())
    return JSONResponse({"detail": problems}, status_code=400)


class BodyLimit:
    """Refuses a request body larger than `max_bytes` (413), from its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = HTTPException(413, f"body: larger than {self.max_bytes} bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = JSONResponse({"detail": too_large.detail}, status_code=too_large.status_code)
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large  # an HTTP error the app answers (a body it cannot read is not its failure)
            return message

        await self.app(scope, counted, send)


class GatewayServer:
    """What `run_service` runs: uvicorn serving the app, on CONTINUUM_HTTP_HOST:CONTINUUM_HTTP_PORT."""

    def __init__(self, settings: Settings) -> None:
        self.config = uvicorn.Config(create_app(settings), host=settings.http_host, port=settings.http_port or 0,
                                     log_config=None, access_log=False, loop="none", lifespan="on",
                                     timeout_graceful_shutdown=10)

    async def run(self) -> None:
        server = uvicorn.Server(self.config)
        def not_listening() -> str | None:  # uvicorn binds after the app's start, and stops taking requests first
            if server.should_exit:
                return "stopping"
            return None if server.started else "starting: the HTTP server does not listen yet"

        health.require("http", not_listening)
        await server.serve()


def create_gateway_app(settings: Settings) -> GatewayServer:
    if settings.principal not in (None, SERVICES_PRINCIPAL, OPERATOR_PRINCIPAL):
        raise ValueError(f"the gateway acts for every principal: run it as `services`, not {settings.principal}")
    return GatewayServer(settings)
