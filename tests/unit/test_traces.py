"""The embedded span file and the waterfall's layout of a job's trace; trace ids on log lines."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from services.traces import job_trace, read_spans
from shared.telemetry import Attr, SpanFile, add_trace_ids, context_of, traceparent_of


def _tracer(path):
    provider = TracerProvider(resource=Resource.create({"service.name": "continuum-test"}))
    provider.add_span_processor(SimpleSpanProcessor(SpanFile(path)))
    return provider, provider.get_tracer("test")


def test_a_jobs_trace_is_laid_out_parent_first_in_time_order_without_other_jobs(tmp_path):
    path = tmp_path / "traces" / "spans.jsonl"
    provider, tracer = _tracer(path)
    with tracer.start_as_current_span("intake.submit", attributes={Attr.JOB_ID: "j1"}):
        with tracer.start_as_current_span("intake.validate"):
            pass
        submitted = trace.get_current_span()
    # the next hops, in other processes, continue from the traceparent in the message header
    header = traceparent_of(submitted)
    with (
        tracer.start_as_current_span("routing.place", context=context_of(header), attributes={Attr.JOB_ID: "j1"}),
        tracer.start_as_current_span("agent.dispatch", attributes={Attr.JOB_ID: "j1"}),
    ):
        pass
    # another job in the same submitter's trace, and a job of its own trace
    with tracer.start_as_current_span("intake.submit", context=context_of(header), attributes={Attr.JOB_ID: "j2"}):
        pass
    with tracer.start_as_current_span("intake.submit", attributes={Attr.JOB_ID: "j3"}):
        pass
    provider.shutdown()
    with path.open("ab") as f:
        f.write(b'{"trace_id": "cut off in the midd')  # a line still being written

    rows = job_trace(read_spans(path), "j1")
    assert [(r.span["name"], r.depth) for r in rows] == [
        ("intake.submit", 0), ("intake.validate", 1), ("routing.place", 1), ("agent.dispatch", 2)]
    assert len({r.span["trace_id"] for r in rows}) == 1
    assert rows[2].span["parent_id"] == rows[0].span["span_id"]
    assert all(r.span["service"] == "continuum-test" and r.span["end_ns"] >= r.span["start_ns"] for r in rows)
    assert job_trace(read_spans(path), "nobody") == []


def test_a_later_submission_with_the_same_key_is_not_part_of_the_jobs_trace(tmp_path):
    path = tmp_path / "spans.jsonl"
    provider, tracer = _tracer(path)
    with tracer.start_as_current_span("intake.submit", attributes={Attr.JOB_ID: "j1", Attr.REASON: "first"}):
        pass
    with tracer.start_as_current_span("intake.submit", attributes={Attr.JOB_ID: "j1", Attr.REASON: "again"}):
        pass
    provider.shutdown()
    rows = job_trace(read_spans(path), "j1")
    assert [r.span["attributes"][Attr.REASON] for r in rows] == ["first"]


def test_log_lines_carry_the_trace_and_span_in_progress_and_drop_unknown_job_fields(tmp_path):
    provider, tracer = _tracer(tmp_path / "spans.jsonl")
    assert add_trace_ids(None, "info", {"event": "x", "job_id": None}) == {"event": "x"}
    with tracer.start_as_current_span("routing.place") as span:
        line = add_trace_ids(None, "info", {"event": "job.placed", "job_id": "j1", "tenant": None})
    context = span.get_span_context()
    assert line == {"event": "job.placed", "job_id": "j1", "trace_id": format(context.trace_id, "032x"),
                    "span_id": format(context.span_id, "016x")}
    provider.shutdown()
