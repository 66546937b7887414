"""The job registry's read model: a JobRecord folded from the job's events. Pure and idempotent. Intake keeps
the registry with it; routing folds a job's accepted event itself, which is all the registry holds of it yet.

Applying an event twice changes nothing (events are known by id). Events may be applied in any order (a
consumer handles a batch concurrently, a redelivery comes late): what the job is now is read from its
history sorted by stream sequence, so a late event never moves it backwards; a terminal state is final.
Events of an earlier placement attempt than the job's latest are kept in its history but ignored: the job
left that site.
"""

from __future__ import annotations

from datetime import datetime

from shared.contracts.jobs import HistoryEntry, JobEvent, JobRecord, JobState

# what a history entry keeps of an event's data, besides its state and time
_HISTORY_FIELDS = ("site", "reason", "exit_code", "attempt", "reasons", "refusal")


def apply_event(current: dict | None, event: JobEvent, seq: int) -> dict | None:
    """The record after `event` (as JSON-ready dict), or None when the event is already in it.

    It works on the stored JSON itself: only what the event brings is written (its history entry, a spec, a
    decision, all validated with the event), so that a job's fifth event does not validate and serialise its
    whole record again. `current` is never changed (it may be a cache's copy): what changes is replaced."""
    data = event.data
    record = dict(current) if current else JobRecord(
        job_id=data.job_id, tenant=data.tenant, state=JobState(event.kind)).model_dump(mode="json")
    if any(h["event_id"] == event.id for h in record["history"]):
        return None

    state = JobState(event.kind)
    # an entry without an attempt (an event that named none, intake's) belongs to whichever attempt is current
    entry = HistoryEntry(state=state, time=event.time, event_id=event.id, seq=seq,
                         **{k: getattr(data, k) for k in _HISTORY_FIELDS if data.gives(k)}).model_dump(mode="json")
    history = record["history"] = sorted([*record["history"], entry], key=_in_order)

    if data.spec is not None and record.get("spec") is None:
        record["spec"] = data.spec.model_dump(mode="json")
    if data.traceparent and not record.get("traceparent"):
        record["traceparent"] = data.traceparent

    attempt = record["attempt"] = max(record.get("attempt", 0), data.attempt)
    # an event of an attempt the job has left (a site that was lost and reports late) changes nothing
    live = [h for h in history if h.get("attempt", attempt) >= attempt]
    terminal = next((h for h in live if JobState(h["state"]).terminal), None)
    # a job asked to stop stays `cancelling` until its site says it ended, whatever it reports meanwhile
    cancelling = next((h for h in live if h["state"] == JobState.cancelling), None)
    record["state"] = (terminal or cancelling or live[-1])["state"]
    if not any(h is entry for h in live) or (terminal is not None and entry["seq"] > terminal["seq"]):
        return record  # kept in the history, but the job is over or moved on

    if state in (JobState.placed, JobState.queued, JobState.rejected) and data.decision is not None \
            and seq >= record.get("decision_seq", -1):
        record["decision"] = data.decision.model_dump(mode="json")
        record["decision_seq"] = seq
    record["site"] = _current_site(live)
    if entry is (terminal or live[-1]):  # the outcome and its reasons come from the newest event
        if state in (JobState.succeeded, JobState.failed) and data.exit_code is not None:
            record["exit_code"] = data.exit_code
        # reasons say why the job waits, failed or was refused: a newer event without any clears them
        record["reasons"] = list(data.reasons) or ([data.reason] if data.reason else [])
    return record


def _in_order(entry: dict) -> tuple[int, datetime]:
    """History is in stream order; the events intake records itself (sequence 0) by their time."""
    return entry["seq"], datetime.fromisoformat(entry["time"])


def _current_site(history: list[dict]) -> str | None:
    site = None
    for h in history:
        if h["state"] in (JobState.placed, JobState.dispatched, JobState.started):
            site = h.get("site") or site
        elif h["state"] == JobState.requeued:
            site = None
    return site
