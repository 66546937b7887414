"""Routing's composition root: its parts, given what they work against (the catalog, the carbon data, the
stores, the event log and the clock) as arguments. The service passes the bus's (services/routing/app.py); a
test passes in-memory ones, to run the races between placement tries one step at a time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from services.routing.line import WaitingLine
from services.routing.outages import Outages
from services.routing.placement import Placement
from services.routing.store import ReservationStore
from shared.carbon import CarbonProvider
from shared.contracts.catalog import Catalog
from shared.contracts.events import utcnow
from shared.contracts.subjects import Subjects
from shared.stores import Documents, EventLog


@dataclass(frozen=True)
class Stores:
    """The buckets routing reads and writes."""

    reservations: Documents  # one document per site: the GPUs its placed jobs hold (written here)
    waiting: Documents  # the waiting line's board (written here)
    sites: Documents  # capacity's site statuses
    budgets: Documents  # billing's metered budgets
    jobs: Documents  # the registry of jobs (read only)


@dataclass(frozen=True)
class Routing:
    store: ReservationStore
    line: WaitingLine
    placement: Placement
    outages: Outages


def bootstrap(catalog: Catalog, carbon: CarbonProvider, stores: Stores, events: EventLog, subjects: Subjects,
              retry_s: float, grace_s: float, clock: Callable[[], datetime] = utcnow) -> Routing:
    store = ReservationStore(stores.reservations, catalog.sites)
    line = WaitingLine(stores.waiting, catalog, clock)
    placement = Placement(catalog, carbon, store, line, stores.sites, stores.budgets, stores.jobs, events, subjects,
                          retry_s, clock)
    outages = Outages(store, stores.jobs, stores.sites, events, subjects, grace_s, clock)
    return Routing(store, line, placement, outages)
