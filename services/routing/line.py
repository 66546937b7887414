"""The waiting line: jobs that fit nowhere now, on a board shared by routing replicas (a bucket), each with its
priority, when it started waiting, its spec and its place in the line of each site whose GPUs (and nothing
else) it waits for. Higher priorities come first, then the longest waiting: the order freed GPUs are offered
in, and the line a job's wait forecast counts the jobs ahead of it from."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from services.routing.policy import Hold, line_entry
from shared.contracts.catalog import Catalog
from shared.contracts.events import utcnow
from shared.contracts.jobs import Decision, JobSpec
from shared.stores import Documents

# a waiting job refreshes its entry on the board this often; an entry not refreshed for three times as long is
# ignored (its job is no longer being placed: dead-lettered, say)
REFRESH_S = 60.0
STALE_AFTER_S = 3 * REFRESH_S


class WaitingLine:
    def __init__(self, board: Documents, catalog: Catalog, clock: Callable[[], datetime] = utcnow) -> None:
        self.board = board
        self.catalog = catalog
        self.clock = clock

    def entries(self) -> list[tuple[str, dict]]:
        """(job id, entry) of the jobs waiting, in line order; entries gone stale are left out."""
        now = self.clock().timestamp()
        fresh = [(job_id, entry) for job_id, entry in self.board.cached_all().items()
                 if now - entry["refreshed_at"] <= STALE_AFTER_S]
        return sorted(fresh, key=lambda e: _place(e[1]))

    def __len__(self) -> int:
        """The jobs waiting (entries gone stale left out, as in `entries`)."""
        now = self.clock().timestamp()
        return sum(1 for entry in self.board.cached_all().values() if now - entry["refreshed_at"] <= STALE_AFTER_S)

    def waits(self, job_id: str) -> bool:
        return self.board.cached(job_id) is not None

    def ahead(self, job_id: str, priority: int) -> dict[str, list]:
        """For each site, the waiting jobs ahead of this one that wait for its GPUs, as that site's line entries."""
        mine = self.board.cached(job_id)
        place = (-priority, mine["since"] if mine else self.clock().timestamp())
        lines: dict[str, list] = {}
        for other, entry in self.entries():
            if other == job_id or _place(entry) >= place:
                continue
            for site_id, queued in entry.get("line", {}).items():
                lines.setdefault(site_id, []).append(tuple(queued))
        return lines

    async def join(self, job_id: str, spec: JobSpec, decision: Decision) -> None:
        """Put the job on the board (or refresh its entry there, once a while), keeping its place."""
        entry = self.board.cached(job_id)
        now = self.clock().timestamp()
        if entry is not None and now - entry["refreshed_at"] <= REFRESH_S:
            return
        # in the line of each site whose GPUs (and nothing else) it waits for; in none while it waits for a greener
        # hour or yields to a higher priority (it would not take those GPUs while the other job waits)
        holds = decision.holds
        waits_for_gpus = decision.wait_until is None and not any(Hold.LINE in kinds for kinds in holds.values())
        line = {site_id: queued for site_id, kinds in holds.items()
                if waits_for_gpus and kinds == {Hold.GPUS} and (queued := line_entry(spec, self.catalog.site(site_id)))}
        await self.board.put(job_id, {"priority": spec.priority, "refreshed_at": now,
                                      "since": entry["since"] if entry else now,
                                      "spec": spec.model_dump(mode="json"), "line": line})

    async def leave(self, job_id: str) -> None:
        if self.waits(job_id):
            await self.board.delete(job_id)

    async def forget(self, job_id: str) -> None:
        """An entry left behind by a job placed or ended meanwhile (another replica's write crossed ours)."""
        await self.board.delete(job_id)


def _place(entry: dict) -> tuple[int, float]:
    return -entry["priority"], entry.get("since", 0)
