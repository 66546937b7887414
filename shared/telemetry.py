"""OpenTelemetry for every service: one trace per job across every hop, the metrics operators watch, and the
trace ids on every log line about a job. Span, attribute and metric names are declared here, once.

A job's trace, each span the child of the one before it:

    intake.submit (intake.validate) -> routing.place -> agent.dispatch -> site.run -> billing.rate

Context crosses each hop in the W3C `traceparent` header of the NATS message, JetStream included, so a
redelivered message continues the same trace. A hop that starts without a message (a waiting job woken when
GPUs come back, a requeue after an outage, a cancel) continues from the traceparent the registry keeps for
the job: the one of its `intake.submit`, itself the child of the submitter's own when it sent one.

Export follows the standard OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL
`http/protobuf` or `grpc`, OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER). With no
endpoint, spans go to `DATA_DIR/traces/spans.jsonl`, which `continuum trace JOB_ID` reads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog
from faststream.exceptions import HandlerException
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from shared import health

TRACEPARENT = "traceparent"
TRACES_FILE = Path("traces") / "spans.jsonl"  # under the data directory


class SpanName:
    SUBMIT = "intake.submit"
    VALIDATE = "intake.validate"
    CANCEL = "intake.cancel"
    PLACE = "routing.place"
    REQUEUE = "routing.requeue"
    DISPATCH = "agent.dispatch"
    RUN = "site.run"
    RATE = "billing.rate"


class Attr:
    JOB_ID = "continuum.job.id"
    TENANT = "continuum.tenant"
    ATTEMPT = "continuum.job.attempt"
    OUTCOME = "continuum.outcome"  # accepted, placed, queued, succeeded, ...
    REASON = "continuum.reason"
    TRIES = "continuum.tries"  # deliveries of the message that started the span
    SITE = "continuum.site"
    GPU_TYPE = "continuum.gpu.type"
    GPUS = "continuum.gpu.count"
    EXIT_CODE = "continuum.exit_code"
    CANDIDATES = "continuum.placement.candidates"  # sites considered (every catalog site)
    ELIGIBLE = "continuum.placement.eligible"  # of which eligible
    OVERFLOW = "continuum.placement.overflow"
    SCORE = "continuum.placement.score"
    WAIT_S = "continuum.placement.wait_s"  # the chosen site's score parts
    COST_EUR = "continuum.placement.cost_eur"
    CO2E_KG = "continuum.placement.co2e_kg"
    AMOUNT_EUR = "continuum.billing.amount_eur"
    ALLOCATION_HOURS = "continuum.billing.allocation_hours"
    GPU_HOURS = "continuum.billing.gpu_hours"
    ENERGY_KWH = "continuum.billing.energy_kwh"
    BILLED_CO2E_KG = "continuum.billing.co2e_kg"


tracer = trace.get_tracer("continuum")
_propagator = TraceContextTextMapPropagator()

# Metrics. Instruments made before the meter provider exists forward to it once it is set.
meter = metrics.get_meter("continuum")
job_transitions = meter.create_counter(
    "continuum.jobs", unit="{job}", description="Jobs entering each state, by state and site (the registry's count)")
placement_latency = meter.create_histogram(
    "continuum.placement.latency", unit="s", description="From a job's acceptance (or requeue) to its placement",
    explicit_bucket_boundaries_advisory=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800])
overflow_jobs = meter.create_counter(
    "continuum.overflow.jobs", unit="{job}", description="Jobs placed on paid capacity as overflow from public")
billed_cost = meter.create_counter("continuum.billing.cost", unit="EUR", description="Metered cost, by tenant and site")
billed_co2e = meter.create_counter("continuum.billing.co2e", unit="kg", description="Metered CO2e, by tenant and site")
billed_gpu_hours = meter.create_counter("continuum.billing.gpu_hours", unit="h", description="Metered GPU-hours")
dead_lettered = meter.create_counter(
    "continuum.messages.dead_lettered", unit="{message}", description="Messages sent to the dead-letter stream")
# observed by the service that knows them (see `observe`)
SITE_GPUS_FREE = "continuum.site.gpus.free"
SITE_QUEUED = "continuum.site.queued"
JOBS_WAITING = "continuum.jobs.waiting"


# Context across hops

def context_of(traceparent: str | None) -> Context | None:
    return _propagator.extract({TRACEPARENT: traceparent}) if traceparent else None


def traceparent_of(span: Span) -> str | None:
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get(TRACEPARENT)


def current_traceparent() -> str | None:
    """The traceparent of the span in progress, for the header of what it publishes."""
    return traceparent_of(trace.get_current_span())


@contextmanager
def in_trace(traceparent: str | None, job_id: str | None = None, tenant: str | None = None) -> Iterator[None]:
    """Work for a job outside a span of its own (a report from its run, say): what it logs and publishes
    continues the job's trace from `traceparent`."""
    token = otel_context.attach(ctx) if (ctx := context_of(traceparent)) else None
    try:
        with structlog.contextvars.bound_contextvars(job_id=job_id, tenant=tenant):
            yield
    finally:
        if token is not None:
            otel_context.detach(token)


def new_traceparent() -> str:
    """A fresh trace context, for when tracing is off and the submitter sent none: the job still gets one."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


@contextmanager
def job_span(name: str, parent: str | None, job_id: str | None = None, tenant: str | None = None,
             **attributes: Any) -> Iterator[Span]:
    """A span about one job, the child of `parent` (a traceparent), current while the block runs; log lines
    inside carry the job's id and tenant (and, through `add_trace_ids`, the trace and span ids).

    Control flow is not an error: a job handed back to wait (FastStream's Nack, Ack, Skip) ends the span as
    it is; any other exception marks it failed."""
    attrs = {Attr.JOB_ID: job_id, Attr.TENANT: tenant, **attributes}
    with (
        tracer.start_as_current_span(name, context=context_of(parent), record_exception=False,
                                     set_status_on_exception=False,
                                     attributes={k: v for k, v in attrs.items() if v is not None}) as span,
        # both bound (None until known) so that leaving the block unbinds what `name_job` set inside it
        structlog.contextvars.bound_contextvars(job_id=job_id, tenant=tenant),
    ):
        try:
            yield span
        except HandlerException:
            raise
        except BaseException as e:
            span.record_exception(e)
            span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
            raise


def name_job(span: Span, job_id: str, tenant: str | None) -> None:
    """Tell a span (and the log lines after this) which job it is about, once that is known."""
    span.set_attribute(Attr.JOB_ID, job_id)
    if tenant:
        span.set_attribute(Attr.TENANT, tenant)
    structlog.contextvars.bind_contextvars(job_id=job_id, **({"tenant": tenant} if tenant else {}))


def add_trace_ids(_logger: Any, _method: str, event: dict) -> dict:
    """structlog processor: the trace and span of the work in progress, so a log line leads to its trace."""
    for key in ("job_id", "tenant"):
        if key in event and event[key] is None:  # a job span that does not know them (yet)
            del event[key]
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


# Set-up, once per process

class SpanFile(SpanExporter):
    """The embedded default: spans as JSON lines in a file that every service of the system appends to (one
    write per line on an O_APPEND descriptor, so lines of different processes do not interleave)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            os.write(self._fd, orjson.dumps(span_record(span)) + b"\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        os.close(self._fd)


def span_record(span: ReadableSpan) -> dict:
    """What the span file keeps of a span: enough to draw a waterfall."""
    return {"trace_id": format(span.context.trace_id, "032x"), "span_id": format(span.context.span_id, "016x"),
            "parent_id": format(span.parent.span_id, "016x") if span.parent else None, "name": span.name,
            "service": span.resource.attributes.get("service.name"), "start_ns": span.start_time,
            "end_ns": span.end_time, "status": span.status.status_code.name,
            "attributes": dict(span.attributes or {})}


def _otlp_protocol() -> str:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf")
    if protocol not in ("http/protobuf", "grpc"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (http/protobuf or grpc)")
    return protocol


def _otlp_exporter(signal: str) -> Any:
    """The OTLP exporter of `signal` (traces or metrics) for the protocol asked; it reads its endpoint and
    options from OTEL_* itself."""
    grpc = _otlp_protocol() == "grpc"
    if signal == "traces":
        if grpc:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
            return GrpcSpanExporter()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
        return HttpSpanExporter()
    if grpc:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter
        return GrpcMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter
    return HttpMetricExporter()


def _endpoint(signal: str) -> str | None:
    return os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT")


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    exporter: str  # where spans go, for the start-up log line

    def shutdown(self) -> None:
        """Export what is still buffered: called when the service stops."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(service: str, data_dir: Path, metrics_port: int | None = None) -> Telemetry:
    """Tracing and metrics for this process, from the OTEL_* environment; the file default without an endpoint.
    OTEL_SERVICE_NAME, when set, names the service; otherwise `continuum-<service>`. With `metrics_port`, the
    Prometheus endpoint, and the process's /healthz and /readyz on the same port (`shared/health.py`)."""
    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"continuum-{service}"})
    tracer_provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    readers: list[MetricReader] = []
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp") == "none":
        exporter = "none"
    elif endpoint := _endpoint("traces"):
        tracer_provider.add_span_processor(BatchSpanProcessor(_otlp_exporter("traces")))
        exporter = f"otlp {_otlp_protocol()} {endpoint}"
    else:
        path = data_dir / TRACES_FILE
        # a short delay unless told otherwise, so that `continuum trace` sees a job's spans about a second after
        # it ends (the processor reads OTEL_BSP_SCHEDULE_DELAY itself when it is set)
        delay = None if os.environ.get("OTEL_BSP_SCHEDULE_DELAY") else 1000
        tracer_provider.add_span_processor(BatchSpanProcessor(SpanFile(path), schedule_delay_millis=delay))
        exporter = f"file {path}"
    # a traces-only backend (Jaeger) takes no metrics: OTEL_METRICS_EXPORTER=none
    if os.environ.get("OTEL_METRICS_EXPORTER", "otlp") != "none" and _endpoint("metrics"):
        readers.append(PeriodicExportingMetricReader(_otlp_exporter("metrics")))
    if metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import make_wsgi_app

        try:
            health.serve(metrics_port, make_wsgi_app())  # /metrics, and /healthz and /readyz beside them
            readers.append(PrometheusMetricReader(scope_info_enabled=False))
        except OSError as e:  # the service runs on without its endpoint rather than not at all
            structlog.get_logger().error("metrics.unavailable", port=metrics_port, reason=str(e))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return Telemetry(tracer_provider, meter_provider, exporter)


def observe(name: str, description: str, unit: str, read: Any) -> None:
    """An observable gauge: `read()` gives [(value, attributes), ...] whenever metrics are collected."""
    def callback(_options: Any) -> list[metrics.Observation]:
        return [metrics.Observation(value, attributes) for value, attributes in read()]
    meter.create_observable_gauge(name, callbacks=[callback], unit=unit, description=description)
