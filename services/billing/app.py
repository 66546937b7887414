"""billing: meters each job once from its final event, rates it by its site, answers statements."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import structlog

from services.billing import budgets
from services.billing.ledger import Ledger
from services.billing.rating import rate, statement
from shared import telemetry
from shared.bus import Bus, create_app, create_bus
from shared.carbon import CarbonProvider, default_carbon, site_intensity
from shared.contracts.billing import (
    BudgetEvent,
    BudgetStatus,
    Statement,
    StatementRequest,
    Topup,
    TopupRequest,
    UsageEvent,
    UsageLine,
)
from shared.contracts.catalog import Catalog
from shared.contracts.events import utcnow
from shared.contracts.jobs import JobEvent, JobState
from shared.contracts.subjects import Subjects
from shared.settings import Settings
from shared.stores import BusDocuments, Documents, EventLog

log = structlog.get_logger()
SERVICE = "billing"
_FINAL = (JobState.succeeded, JobState.failed, JobState.cancelled)


class Billing:
    """The service's domain, given what it works against (a test gives it in-memory stores and a clock)."""

    def __init__(self, catalog: Catalog, carbon: CarbonProvider, jobs: Documents, standings: Documents,
                 events: EventLog, subjects: Subjects, clock: Callable[[], datetime] = utcnow) -> None:
        self.catalog = catalog
        self.carbon = carbon
        self.jobs = jobs  # the registry, read only
        self.standings = standings  # where each tenant stands, for routing: one key a tenant
        self.events, self.subjects = events, subjects
        self.clock = clock
        self.ledger: Ledger  # opened at start: building the service (for docs, say) touches no file
        # per tenant, the next accounting, shared by the jobs metered while the one before it runs
        self._next_account: dict[str, asyncio.Future] = {}
        self._accounting: set[str] = set()
        self._tasks: set[asyncio.Task] = set()  # the accountings on their way (the loop keeps weak refs only)

    def usage(self, event: JobEvent) -> UsageLine | None:
        """The usage line of a job's final event; None for a job that never started (nothing ran)."""
        data = event.data
        if data.started_at is None or data.site not in self.catalog.sites:
            return None
        site = self.catalog.site(data.site)

        def intensity(at: datetime) -> float:
            return site_intensity(site, at, self.carbon)
        return rate(site, job_id=data.job_id, tenant=data.tenant,
                    gpu_type="none" if data.gpu_type is None else data.gpu_type, gpus=data.gpus or 0,
                    started_at=data.started_at, ended_at=data.ended_at or event.time, state=event.kind,
                    intensity=intensity)

    async def meter(self, event: JobEvent, traceparent: str | None) -> None:
        line = self.usage(event)
        if line is None:
            return
        with telemetry.job_span(telemetry.SpanName.RATE, traceparent, line.job_id, line.tenant,
                                **{telemetry.Attr.SITE: line.site}) as span:
            record = await self.jobs.read(line.job_id)
            if record and event.data.attempt < record.get("attempt", 0):
                # a lost site's late report of a run the job left: its current attempt is the one billed
                span.set_attribute(telemetry.Attr.OUTCOME, "superseded")
                log.warning("usage.superseded", site=line.site, attempt=event.data.attempt)
                return
            if self.ledger.add(line):
                attributes = {"tenant": line.tenant, "site": line.site}
                telemetry.billed_cost.add(line.amount_eur, attributes)
                telemetry.billed_co2e.add(line.co2e_kg, attributes)
                telemetry.billed_gpu_hours.add(line.gpu_hours, attributes)
            else:
                # billed before (a redelivery or a replay): the first line stands
                line = self.ledger.get(line.job_id) or line
            span.set_attributes({telemetry.Attr.OUTCOME: "billed", telemetry.Attr.AMOUNT_EUR: line.amount_eur,
                                 telemetry.Attr.ALLOCATION_HOURS: line.allocation_hours,
                                 telemetry.Attr.GPU_HOURS: line.gpu_hours, telemetry.Attr.ENERGY_KWH: line.energy_kwh,
                                 telemetry.Attr.BILLED_CO2E_KG: line.co2e_kg})
            await self.account_after(line.tenant)
            # publishing again after a crash is harmless: the usage event's id is the job's
            usage = UsageEvent.make(SERVICE, "billing", "usage", line.tenant, line, line.job_id)
            await self.events.publish_event(self.subjects.billing_event(line.tenant, "usage"), usage)
            log.info("job.billed", site=line.site, amount_eur=line.amount_eur, co2e_kg=line.co2e_kg)

    def budgets(self, tenant_id: str) -> list[BudgetStatus]:
        """The tenant's paid budget this month and its allocation, with top-ups, against what was metered."""
        tenant = self.catalog.tenants[tenant_id]
        month = budgets.month_start(self.clock())
        spent_eur, _ = self.ledger.metered(tenant_id, month.strftime("%Y-%m"))
        _, allocation_used = self.ledger.metered(tenant_id)
        topup_eur, _ = self.ledger.topups(tenant_id, since=month)
        _, topup_hours = self.ledger.topups(tenant_id)
        return [budgets.status(tenant_id, "monthly_eur", month.strftime("%Y-%m"), spent_eur,
                               tenant.monthly_budget_eur + topup_eur),
                budgets.status(tenant_id, "allocation_hours", budgets.WHOLE_GRANT, allocation_used,
                               tenant.allocation_gpu_hours + topup_hours)]

    async def account_after(self, tenant: str) -> list[BudgetStatus]:
        """`account(tenant)` run after this call, so that it counts what the caller metered; the jobs of a fetch
        metered while one runs share the next one (one budget write, not one a job)."""
        waiting = self._next_account.get(tenant)
        if waiting is None:
            waiting = self._next_account[tenant] = asyncio.get_running_loop().create_future()
            if tenant not in self._accounting:
                task = asyncio.create_task(self._account_in_turn(tenant), name=f"account-{tenant}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(waiting)  # a caller that stops does not stop it for the others

    async def _account_in_turn(self, tenant: str) -> None:
        self._accounting.add(tenant)
        try:
            while (waiting := self._next_account.pop(tenant, None)) is not None:
                try:
                    waiting.set_result(await self.account(tenant))
                except asyncio.CancelledError:  # the service stops
                    waiting.cancel()
                    raise
                except Exception as e:  # each job's message is retried
                    waiting.set_exception(e)
        finally:
            self._accounting.discard(tenant)

    async def account(self, tenant: str) -> list[BudgetStatus]:
        """Tell routing where the tenant stands (KV, one key a tenant), and announce the budget events due."""
        paid, allocation = self.budgets(tenant)
        await self.standings.put(tenant, {"period": paid.period, "spent_eur": paid.used, "budget_eur": paid.limit,
                                          "allocation_used_h": allocation.used, "allocation_h": allocation.limit})
        for budget in (paid, allocation):
            for kind in budgets.events_due(budget):
                key = (tenant, budget.budget, budget.period, kind, budget.limit)
                if self.ledger.announced(*key):
                    continue
                # published before it is recorded: a crash in between publishes it again, with the same id
                event = BudgetEvent.make(SERVICE, "billing", kind, tenant, budget, *key[1:])
                await self.events.publish_event(self.subjects.billing_event(tenant, kind), event)
                self.ledger.announce(*key)
                log.warning(f"tenant.{kind}", tenant=tenant, budget=budget.budget, used=budget.used,
                            limit=budget.limit)
        return [paid, allocation]

    async def topup(self, request: TopupRequest) -> dict:
        added = self.ledger.add_topup(Topup(at=self.clock(), **request.model_dump()))
        log.info("tenant.topup", tenant=request.tenant, amount_eur=request.amount_eur,
                 allocation_hours=request.allocation_hours, added=added)
        standing = await self.account(request.tenant)
        return {"tenant": request.tenant, "topup_id": request.topup_id, "added": added,
                "budgets": [b.model_dump(mode="json") for b in standing]}


def billing_on(bus: Bus, catalog: Catalog, carbon: CarbonProvider) -> Billing:
    """Billing on the bus: the registry and the tenants' standings in their buckets, its events on the stream."""
    topology = bus.topology
    return Billing(catalog, carbon, BusDocuments(bus, topology.jobs_bucket, mirrored=False),
                   BusDocuments(bus, topology.budgets_bucket, mirrored=False), bus, bus.subjects)


def create_billing_app(settings: Settings):
    bus = create_bus(settings, SERVICE)
    subjects, topology = bus.subjects, bus.topology
    billing = billing_on(bus, Catalog.load(settings.sites_file, settings.tenants_file), default_carbon())
    bus.document_events(subjects.billing_event(kind="usage"), UsageEvent,
                        "The usage line of one finished job (data).")
    bus.document_events(subjects.billing_event(kind="budget_warning"), BudgetEvent,
                        "A tenant used 80 % of its monthly paid budget or of its allocation (data: BudgetStatus).")
    bus.document_events(subjects.billing_event(kind="budget_exhausted"), BudgetEvent,
                        "A tenant used all of its monthly paid budget or of its allocation (data: BudgetStatus).")
    async def meter(event: JobEvent) -> None:
        await billing.meter(event, bus.traceparent())

    for kind in _FINAL:
        bus.consumer(subjects.job_event(kind=kind.value), topology.events_stream, kind.value, batch=128)(meter)

    @bus.responder(subjects.billing_statement, "billing.statement", tenants=True)
    async def get_statement(request: StatementRequest) -> Statement | dict:
        if request.tenant not in billing.catalog.tenants or bus.tenant() not in (None, request.tenant):
            # another tenant's bill is as unknown to a tenant as a tenant that does not exist
            return {"error": f"unknown tenant {request.tenant!r}: not in the tenant catalog"}
        lines = billing.ledger.lines(request.tenant, request.since, request.until)
        return statement(request.tenant, lines, request.since, request.until)

    @bus.responder(subjects.billing_topup, "billing.topup")
    async def topup(request: TopupRequest) -> dict:
        if request.tenant not in billing.catalog.tenants:
            return {"error": f"unknown tenant {request.tenant!r}: not in the tenant catalog"}
        return await billing.topup(request)

    async def open_ledger() -> None:
        billing.ledger = Ledger(settings.ledger_url or settings.ledger)

    async def close() -> None:
        billing.ledger.close()

    return create_app(bus, on_startup=(open_ledger,), on_shutdown=(close,))
