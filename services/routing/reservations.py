"""Reservations: the GPUs that placed jobs hold at a site, one document per site. Pure.

The routing service changes a site's document by compare-and-set on its revision (JetStream KV), so
several routing replicas never promise the same GPUs twice: a replica that loses the race re-reads and
re-checks. A job's reservation is released when it ends, is cancelled, or is requeued.
"""

from __future__ import annotations


class NoCapacity(Exception):
    pass


def reserved(doc: dict | None) -> dict[str, int]:
    """GPUs held by type."""
    held: dict[str, int] = {}
    for r in (doc or {}).get("jobs", {}).values():
        held[r["gpu_type"]] = held.get(r["gpu_type"], 0) + r["gpus"]
    return held


def free(doc: dict | None, total: dict[str, int]) -> dict[str, int]:
    held = reserved(doc)
    return {t: n - held.get(t, 0) for t, n in total.items()}


def holds(doc: dict | None, job_id: str) -> bool:
    return job_id in (doc or {}).get("jobs", {})


def reserve(doc: dict | None, job_id: str, gpu_type: str, gpus: int, total: dict[str, int],
            attempt: int = 0) -> dict | None:
    """The document with the job's GPUs held; None if it holds them already; NoCapacity if they are gone."""
    if holds(doc, job_id):
        return None
    if gpus and free(doc, total).get(gpu_type, 0) < gpus:
        raise NoCapacity(f"{gpus} {gpu_type} no longer free")
    jobs = dict((doc or {}).get("jobs", {}))
    jobs[job_id] = {"gpu_type": gpu_type, "gpus": gpus, "attempt": attempt}
    return {"jobs": jobs}


def release(doc: dict | None, job_id: str, before_attempt: int | None = None) -> dict | None:
    """The document without the job (only an attempt older than `before_attempt`, if given: a requeued job's
    new placement may already hold GPUs); None if there is nothing to release."""
    if not holds(doc, job_id):
        return None
    if before_attempt is not None and doc["jobs"][job_id].get("attempt", 0) >= before_attempt:
        return None
    jobs = dict(doc["jobs"])
    del jobs[job_id]
    return {"jobs": jobs}
