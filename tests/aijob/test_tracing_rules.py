"""Tracing rules that need no cluster: the root span once per job, sampling decided for the whole
trace, the SRE's service.name kept, and OTLP over HTTP when asked for (to a real HTTP receiver)."""

from __future__ import annotations

import copy
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import AIJobReconciler, submission_id_for
from koinon_operator.telemetry import JobIdGenerator, JobTracer, _exporters_from_env, setup_tracing, traceparent
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

from tests.aijob.fake_ray import UID, Clock, FakeRay, make_body, make_reconciler, step


def _tracer(provider: TracerProvider) -> tuple[JobTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return JobTracer(provider), exporter


async def _traced_step(reconciler: AIJobReconciler, tracer: JobTracer, body: dict[str, Any]) -> None:
    """What handlers.reconcile_aijob does: record(the body before the patch, the patch, the events)."""
    before = copy.deepcopy(body)
    outcome = await step(reconciler, body)
    tracer.record(before, outcome.status, [(e.type, e.reason, e.message) for e in outcome.events])


async def _run_to_success_and_ttl(tracer: JobTracer) -> None:
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "ttlSecondsAfterFinished": 0})
    await _traced_step(reconciler, tracer, body)  # Accepted + Scheduled
    await _traced_step(reconciler, tracer, body)  # Submitted
    ray.set_state(submission_id_for(UID, 1), RayJobState.RUNNING)
    await _traced_step(reconciler, tracer, body)
    ray.set_state(submission_id_for(UID, 1), RayJobState.SUCCEEDED, exit_code=0)
    clock.advance(10)
    await _traced_step(reconciler, tracer, body)  # Completed
    assert body["status"]["phase"] == "Succeeded"
    clock.advance(10)
    await _traced_step(reconciler, tracer, body)  # TTL: "Deleted"
    await _traced_step(reconciler, tracer, body)  # the timer fires again before the delete lands


async def test_the_ttl_deletion_does_not_emit_the_root_span_again() -> None:
    provider = TracerProvider(id_generator=JobIdGenerator())
    tracer, exporter = _tracer(provider)
    await _run_to_success_and_ttl(tracer)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans].count("aijob") == 1
    assert [s.name for s in spans].count("ray.job") == 1
    assert "aijob.Deleted" in [s.name for s in spans]


@pytest.mark.parametrize("ratio", [0.0, 1.0])
async def test_a_parent_based_sampler_keeps_or_drops_the_whole_trace(ratio: float) -> None:
    provider = TracerProvider(id_generator=JobIdGenerator(), sampler=ParentBasedTraceIdRatio(ratio))
    tracer, exporter = _tracer(provider)
    await _run_to_success_and_ttl(tracer)
    names = [s.name for s in exporter.get_finished_spans()]
    if ratio == 0.0:
        assert names == []  # before: every transition was exported without its root
    else:
        assert "aijob" in names and "aijob.Accepted" in names


def test_the_ray_job_gets_the_roots_sampling_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    trace_id = UID.replace("-", "")
    assert traceparent(trace_id, sampled=False).endswith("-00")
    assert traceparent(trace_id, sampled=True).endswith("-01")
    dropping = TracerProvider(sampler=ParentBasedTraceIdRatio(0.0))
    monkeypatch.setattr("opentelemetry.trace.get_tracer_provider", lambda: dropping)
    assert traceparent(trace_id).endswith("-00")


def test_service_name_from_otel_resource_attributes_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=sre-operator,deployment.environment=prod")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = setup_tracing()
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "sre-operator"
    finally:
        provider.shutdown()
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES")
    provider = setup_tracing()
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "koinon-operator"
    finally:
        provider.shutdown()


@pytest.fixture
def otlp_http_receiver() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """A real OTLP/HTTP endpoint (protobuf POSTs to /v1/traces)."""
    received: list[ExportTraceServiceRequest] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf":
                received.append(ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
            else:
                self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_otlp_over_http_when_the_protocol_says_so(
    monkeypatch: pytest.MonkeyPatch, otlp_http_receiver: tuple[str, list[ExportTraceServiceRequest]]
) -> None:
    endpoint, received = otlp_http_receiver
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    [exporter] = _exporters_from_env()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.get_tracer("test").start_span("over-http").end()
    provider.shutdown()
    names = [s.name for r in received for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert names == ["over-http"]


def test_an_otlp_protocol_the_operator_cannot_speak_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json' is not supported"):
        _exporters_from_env()


def test_the_operator_exits_at_once_naming_an_otlp_protocol_it_cannot_speak() -> None:
    """Raised from kopf's startup handler, the refusal only made kopf retry every minute: the
    operator ran, looked alive and reconciled nothing."""
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
    }
    env.pop("OTEL_TRACES_EXPORTER", None)
    ran = subprocess.run(
        [sys.executable, "-c", "from koinon_operator.main import main; main()"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 2, ran.stderr[-2000:]
    assert "koinon-operator: OTEL_EXPORTER_OTLP_PROTOCOL: 'http/json' is not supported" in ran.stderr
