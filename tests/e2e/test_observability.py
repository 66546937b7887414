"""One trace per job across every hop, logs that lead to it, and metrics: `continuum up` exporting by OTLP to a
receiver this test runs (over HTTP and over gRPC), as a collector or Jaeger would receive it."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.request
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from services.runtime import free_port
from shared.bus import request_json
from shared.telemetry import TRACEPARENT, Attr, SpanName
from tests.conftest import SUBJECTS, listen
from tests.e2e.harness import connect_when_up, start_system, wait_all_final

pytestmark = pytest.mark.e2e
HOPS = (SpanName.SUBMIT, SpanName.VALIDATE, SpanName.PLACE, SpanName.DISPATCH, SpanName.RUN, SpanName.RATE)
# each span and its parent: the path of a job through the system
EDGES = {SpanName.VALIDATE: SpanName.SUBMIT, SpanName.PLACE: SpanName.SUBMIT, SpanName.DISPATCH: SpanName.PLACE,
         SpanName.RUN: SpanName.DISPATCH, SpanName.RATE: SpanName.RUN}
SERVICE_OF = {SpanName.SUBMIT: "continuum-intake", SpanName.VALIDATE: "continuum-intake",
              SpanName.PLACE: "continuum-routing", SpanName.DISPATCH: "continuum-agent",
              SpanName.RUN: "continuum-agent", SpanName.RATE: "continuum-billing"}
SUBMITTER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SUBMITTER_SPAN = "00f067aa0ba902b7"


class Receiver:
    """What an OTLP receiver got: spans (with their service) and metric names, and a way to wait for them."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.metrics: set[str] = set()
        self.changed = threading.Condition()

    def take_traces(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.changed:
            for resource_spans in request.resource_spans:
                service = next(a.value.string_value for a in resource_spans.resource.attributes
                               if a.key == "service.name")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append({
                            "name": span.name, "service": service, "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(), "parent_id": span.parent_span_id.hex() or None,
                            "attributes": {a.key: _value(a.value) for a in span.attributes}})
            self.changed.notify_all()

    def take_metrics(self, request: metrics_service_pb2.ExportMetricsServiceRequest) -> None:
        with self.changed:
            for resource_metrics in request.resource_metrics:
                for scope in resource_metrics.scope_metrics:
                    self.metrics.update(m.name for m in scope.metrics)
            self.changed.notify_all()

    def job_spans(self, job_id: str) -> dict[str, dict]:
        """The job's spans by name (the first of each: a placement tried twice has two)."""
        mine = {s["span_id"] for s in self.spans if s["attributes"].get(Attr.JOB_ID) == job_id}
        named: dict[str, dict] = {}
        for span in self.spans:
            if span["span_id"] in mine or span["parent_id"] in mine:
                named.setdefault(span["name"], span)
        return named

    async def wait_for(self, condition, timeout: float, what: str) -> None:
        def wait() -> bool:
            with self.changed:
                return self.changed.wait_for(condition, timeout)
        if not await asyncio.to_thread(wait):
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _value(value):
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


def http_receiver(receiver: Receiver, port: int):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                receiver.take_traces(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse()
            elif self.path == "/v1/metrics":
                receiver.take_metrics(metrics_service_pb2.ExportMetricsServiceRequest.FromString(body))
                reply = metrics_service_pb2.ExportMetricsServiceResponse()
            else:
                self.send_error(404)
                return
            data = reply.SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.shutdown


def grpc_receiver(receiver: Receiver, port: int):
    class Traces(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802 (the generated API)
            receiver.take_traces(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(self, request, context):  # noqa: N802
            receiver.take_metrics(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return lambda: server.stop(None)


@pytest.fixture(params=["http/protobuf", "grpc"])
def otlp(request):
    receiver, port = Receiver(), free_port()
    stop = (http_receiver if request.param == "http/protobuf" else grpc_receiver)(receiver, port)
    yield receiver, {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                     "OTEL_EXPORTER_OTLP_PROTOCOL": request.param,
                     "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "500"}
    stop()


@pytest.fixture
def system(nats_server, tmp_path, otlp):
    yield from start_system(nats_server, tmp_path, **otlp[1])


async def test_a_job_is_one_trace_from_submission_to_billing_and_its_logs_lead_to_it(system, otlp):
    receiver = otlp[0]
    nc = await connect_when_up(system)
    events = await listen(nc)
    spec = {"tenant": "lab", "name": "traced", "command": ["train"], "resources": {"gpus": 1, "gpu_type": "H100"},
            "walltime_s": 60, "labels": {"sim.runtime_s": "0.2"}}
    # the submitter's own trace: the job's spans continue it
    reply = await nc.request(SUBJECTS.jobs_submit, json.dumps(spec).encode(), timeout=5,
                             headers={TRACEPARENT: f"00-{SUBMITTER_TRACE}-{SUBMITTER_SPAN}-01"})
    job_id = json.loads(reply.data)["job_id"]
    await wait_all_final(events, [job_id], timeout=30)

    await receiver.wait_for(lambda: set(HOPS) <= receiver.job_spans(job_id).keys(), 30,
                            f"spans {HOPS} of job {job_id}")
    spans = receiver.job_spans(job_id)
    assert {s["trace_id"] for s in spans.values()} == {SUBMITTER_TRACE}
    assert spans[SpanName.SUBMIT]["parent_id"] == SUBMITTER_SPAN
    for child, parent in EDGES.items():
        assert spans[child]["parent_id"] == spans[parent]["span_id"], f"{child} is not the child of {parent}"
    for name, service in SERVICE_OF.items():
        assert spans[name]["service"] == service
    placed = spans[SpanName.PLACE]["attributes"]
    assert placed[Attr.OUTCOME] == "placed" and placed[Attr.SITE] == events.by_job[job_id][-1]["data"]["site"]
    assert placed[Attr.CANDIDATES] == 4 and placed[Attr.OVERFLOW] is False and Attr.SCORE in placed
    assert spans[SpanName.RUN]["attributes"][Attr.EXIT_CODE] == 0
    assert spans[SpanName.RATE]["attributes"][Attr.GPU_HOURS] > 0

    # every log line of every service about the job carries the job's trace
    record = await request_json(nc, SUBJECTS.jobs_get, {"job_id": job_id})
    assert record["traceparent"].split("-")[1] == SUBMITTER_TRACE
    lines = [json.loads(line) for log in (system.data_dir / "logs").glob("*.log")
             for line in log.read_text().splitlines() if job_id in line and line.startswith("{")]
    assert {line["service"] for line in lines} >= {"intake", "routing", "agent", "billing"}
    assert {line.get("trace_id") for line in lines} == {SUBMITTER_TRACE}
    assert all(line["tenant"] == "lab" and line.get("span_id") for line in lines)

    # metrics: by OTLP to the same receiver, and on each service's Prometheus endpoint
    await receiver.wait_for(lambda: {"continuum.jobs", "continuum.billing.cost"} <= receiver.metrics, 15,
                            "the jobs and cost metrics")
    endpoints = json.loads((system.data_dir / "state.json").read_text())["metrics"]
    scraped = {service: await asyncio.to_thread(_scrape, url) for service, url in endpoints.items()}
    assert 'continuum_jobs_total{site="none",state="accepted"}' in scraped["intake"]
    assert 'continuum_jobs_total{site="hpc-fr",state="succeeded"} 1.0' in scraped["intake"]
    assert 'continuum_placement_latency_seconds_count{overflow="false",site="hpc-fr"} 1.0' in scraped["routing"]
    free = re.search(r'^continuum_site_gpus_free\{gpu_type="H100",site="hpc-fr"\} (\S+)$', scraped["capacity"], re.M)
    assert free and float(free[1]) in (15.0, 16.0)  # 16 H100 there, one for the job while it ran
    gpu_hours = re.search(r'^continuum_billing_gpu_hours_total\{site="hpc-fr",tenant="lab"\} (\S+)$',
                          scraped["billing"], re.M)
    assert gpu_hours and float(gpu_hours[1]) == pytest.approx(spans[SpanName.RATE]["attributes"][Attr.GPU_HOURS])
    await nc.close()


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()
