"""Site backends: how a site agent runs jobs. Each one is a `SiteBackend`: it takes Dispatch orders, refuses
one with `SubmitError`, and reports back through `Reports`; the agent turns the reports into lifecycle events."""

from __future__ import annotations

from services.agent.backends.base import Outcome, Reports, SiteBackend, SlotBackend, SubmitError
from services.agent.backends.local import LocalBackend
from services.agent.backends.simulated import SimulatedBackend
from services.agent.backends.slurm import SlurmBackend
from shared.contracts.catalog import SiteEntry


def backend_for(site: SiteEntry, reports: Reports) -> SiteBackend:
    if site.backend == "simulated":
        return SimulatedBackend(site, reports)
    if site.backend == "local":
        return LocalBackend(site, reports)
    return SlurmBackend(site, reports)


__all__ = ["Outcome", "Reports", "SiteBackend", "SlotBackend", "SubmitError", "backend_for"]
