"""The reservation store: each site's reservations document (services/routing/reservations.py says what it
holds) in a bucket, read from the local copy and changed by compare-and-set, so that routing replicas never
promise the same GPUs twice."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from services.routing import reservations
from shared.stores import Change, Documents


class ReservationStore:
    def __init__(self, documents: Documents, site_ids: Iterable[str]) -> None:
        self.documents = documents
        self.site_ids = tuple(site_ids)

    def held(self) -> dict[str, dict]:
        """Each site's document, as the local copy has it."""
        return {site_id: doc for site_id in self.site_ids if (doc := self.documents.cached(site_id)) is not None}

    async def read(self, site_id: str) -> dict | None:
        """The site's document now (not the local copy, which may lag)."""
        return await self.documents.read(site_id)

    async def change(self, site_id: str, change: Change) -> dict | None:
        return await self.documents.change(site_id, change)

    async def release(self, job_id: str, before_attempt: int | None = None, until_metered: bool = False) -> None:
        """Free the job's GPUs wherever it holds some (a try that lost a race and stopped before giving its own
        back leaves a second site); with `until_metered`, its cost stays committed until billing meters it."""
        await self._change_where(job_id, reservations.holds, lambda doc: reservations.release(
            doc, job_id, before_attempt, until_metered=until_metered))

    async def give_back(self, site_id: str, job_id: str, token: str) -> None:
        """Free only the GPUs a given placement try reserved at the site (`token`)."""
        await self.documents.change(site_id, lambda doc: reservations.release(doc, job_id, token=token))

    async def metered(self, job_id: str) -> None:
        """Billing metered the job: its cost is spent, no longer committed."""
        await self._change_where(job_id, lambda doc, j: reservations.holds(doc, j) or reservations.unmetered(doc, j),
                                 lambda doc: reservations.metered(doc, job_id))

    async def _change_where(self, job_id: str, concerns: Callable[[dict | None, str], bool], change: Change) -> None:
        """Change every site document that concerns the job. The local copy says which, unless it has not seen
        the job there yet (a job that ended at once): then the bucket itself."""
        sites = [site_id for site_id, doc in self.held().items() if concerns(doc, job_id)]
        if not sites:
            sites = [site_id for site_id in self.site_ids if concerns(await self.documents.read(site_id), job_id)]
        for site_id in sites:
            await self.documents.change(site_id, change)

    def overflow(self) -> dict:
        return reservations.overflow_summary(self.held())
