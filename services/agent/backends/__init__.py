"""Site backends: how a site agent runs jobs. Each one takes Dispatch orders and reports back through
`Reports`; the agent turns the reports into lifecycle events."""

from __future__ import annotations

from services.agent.backends.base import Backend, Reports
from services.agent.backends.local import LocalBackend
from services.agent.backends.simulated import SimulatedBackend
from shared.contracts.catalog import SiteEntry


def backend_for(site: SiteEntry, reports: Reports) -> Backend:
    if site.backend == "simulated":
        return SimulatedBackend(site, reports)
    if site.backend == "local":
        return LocalBackend(site, reports)
    raise ValueError(f"site {site.id}: backend {site.backend!r} is not available yet")


__all__ = ["Backend", "Reports", "backend_for"]
