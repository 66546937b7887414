"""A job's trace from the embedded span file, laid out for a waterfall (`continuum trace JOB_ID`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from shared.telemetry import Attr


@dataclass(frozen=True)
class TraceRow:
    span: dict
    depth: int


def read_spans(path: Path) -> Iterator[dict]:
    """The spans in the file; a line still being written (or damaged) is passed over."""
    with path.open("rb") as lines:
        for line in lines:
            try:
                span = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(span, dict) and {"trace_id", "span_id", "name", "start_ns", "end_ns"} <= span.keys():
                yield span


def job_trace(spans: Iterable[dict], job_id: str) -> list[TraceRow]:
    """The job's trace as a tree in time order: each parent before its children, siblings by start time.

    The job's trace is that of its first span (its submission; a later submission with the same idempotency
    key is a trace of its own). A span in it belongs to the job when it names the job, or names no job and its
    parent belongs (the validation inside a submission, say); a parent not in the file (the submitter's own
    span) makes a root."""
    spans = list(spans)
    named = [s for s in spans if s.get("attributes", {}).get(Attr.JOB_ID) == job_id]
    if not named:
        return []
    trace_id = min(named, key=lambda s: s["start_ns"])["trace_id"]
    candidates = {s["span_id"]: s for s in spans if s["trace_id"] == trace_id}
    children: dict[str | None, list[dict]] = {}
    for span in candidates.values():
        parent = span.get("parent_id") if span.get("parent_id") in candidates else None
        children.setdefault(parent, []).append(span)

    rows: list[TraceRow] = []

    def walk(parent: str | None, depth: int) -> None:
        for span in sorted(children.get(parent, []), key=lambda s: s["start_ns"]):
            named = span.get("attributes", {}).get(Attr.JOB_ID)
            if named is not None and named != job_id:
                continue  # another job that shares the submitter's trace
            rows.append(TraceRow(span, depth))
            walk(span["span_id"], depth + 1)

    walk(None, 0)
    return rows
