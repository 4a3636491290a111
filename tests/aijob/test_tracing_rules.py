"""Tracing rules that need no cluster: the root span once per job (a deletion racing the pass that
finishes the job, or that pass repeated after its status write was lost, included; a deletion
racing the job's first pass emits it too) and ending after its children, the pass's status applied
as the merge patch it is, sampling decided for the whole trace, the Ray job's TRACEPARENT naming the
exported root, the SRE's service.name kept, OTLP over HTTP when asked for (to a real HTTP receiver),
and malformed OTLP headers, or ones the exporter could not send once URL-decoded, refused at start
without showing the key."""

from __future__ import annotations

import asyncio
import copy
import http.server
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from koinon_emulator.patching import merge_patch
from koinon_operator.api.aijob import parse_time
from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import STALE_BODY_GRACE_SECONDS, AIJobReconciler, Outcome, submission_id_for
from koinon_operator.telemetry import (
    JobIdGenerator,
    JobTracer,
    _exporters_from_env,
    apply_merge_patch,
    exporter_settings_problem,
    setup_tracing,
    traceparent,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.trace import StatusCode

from tests.aijob.fake_ray import UID, VOLUNTEERS, Clock, FakeRay, make_body, make_reconciler, step
from tests.aijob.kopf_patch import written_status


def _tracer(provider: TracerProvider) -> tuple[JobTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return JobTracer(provider), exporter


async def _traced_step(
    reconciler: AIJobReconciler,
    tracer: JobTracer,
    body: dict[str, Any],
    volunteers: dict[str, dict[str, Any]] | None = None,
) -> Outcome:
    """What handlers.reconcile_aijob does: record(the body before the patch, the patch, the events)."""
    before = copy.deepcopy(body)
    outcome = await step(reconciler, body, volunteers)
    tracer.record(before, outcome.status, [(e.type, e.reason, e.message) for e in outcome.events])
    return outcome


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


async def _running_job(tracer: JobTracer) -> tuple[AIJobReconciler, FakeRay, Clock, dict[str, Any]]:
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    for _ in range(2):  # Accepted + Scheduled, Submitted
        await _traced_step(reconciler, tracer, body)
    ray.set_state(submission_id_for(UID, 1), RayJobState.RUNNING)
    await _traced_step(reconciler, tracer, body)
    assert body["status"]["phase"] == "Running"
    return reconciler, ray, clock, body


async def test_a_deletion_racing_the_pass_that_finishes_the_job_emits_one_root_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kopf hands the deletion handler the body of the deletion event, while a timer pass that began
    before it is still concluding the job (reconciler.stop waits for it). That pass emits the root
    (Succeeded, OK); the deletion handler, judging from its body (Running), emitted a second root
    span with the same span id (reason Deleted)."""
    from koinon_operator import handlers

    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: posted.append((type, reason)))
    provider = TracerProvider(id_generator=JobIdGenerator())
    tracer, exporter = _tracer(provider)
    reconciler, ray, clock, body = await _running_job(tracer)
    ray.set_state(submission_id_for(UID, 1), RayJobState.SUCCEEDED, exit_code=0)
    stops, reading_logs = _stops_recorded_and_logs_held(monkeypatch, ray)
    leader = SimpleNamespace(is_leader=True, term=1)
    quiet = SimpleNamespace(record=lambda *args, **kwargs: asyncio.sleep(0))
    memo = SimpleNamespace(reconciler=reconciler, tracer=tracer, leader=leader, reputation=quiet, ray=ray)
    clock.advance(10)
    reconcile: Any = handlers.reconcile_aijob
    patch = kopf.Patch()
    raw: Any = copy.deepcopy(body)
    timer_body = kopf.Body(raw)
    timer = asyncio.create_task(reconcile(body=timer_body, patch=patch, memo=memo, namespace="ns", name="j",
                                          aijob_allocations={}, volunteer_nodes={}))  # fmt: skip
    await asyncio.sleep(0.05)
    deleting = copy.deepcopy(body)  # kubectl delete: the deletion event's body, still Running
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    stop_ray_job: Any = handlers.stop_ray_job
    deletion = asyncio.create_task(stop_ray_job(body=deleting, memo=memo))
    await asyncio.sleep(0.05)
    assert not timer.done() and not deletion.done()  # the deletion waits for the pass
    reading_logs.set()
    await asyncio.gather(timer, deletion)
    assert (written_status(patch, body) or {}).get("phase") == "Succeeded"
    roots = [s for s in exporter.get_finished_spans() if s.name == "aijob"]
    assert [(r.attributes or {}).get("koinon.reason") for r in roots] == ["Completed"], [
        (dict(r.attributes or {}).get("koinon.reason"), r.status.status_code) for r in roots
    ]
    assert roots[0].status.is_ok
    # Nor does the deletion stop or report stopping a job that the pass it waited for finished.
    assert ("Normal", "Stopped") not in posted and ("Normal", "Completed") in posted, posted
    assert stops == []


async def _deleted_during_its_first_pass(
    monkeypatch: pytest.MonkeyPatch, tracer: JobTracer, retried_deletion: bool = False
) -> dict[str, Any]:
    """kubectl apply, then kubectl delete while the job's first timer pass is in flight (Ray slow
    to list its nodes): kopf hands the deletion handler the deletion event's body, taken before that
    pass's status write, so without status.traceId. The handler waits for the pass in
    reconciler.stop, then tells the tracer. Returns the first pass's status patch."""
    from koinon_operator import handlers

    monkeypatch.setattr(kopf, "event", lambda *args, **kwargs: None)
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    listing = asyncio.Event()
    nodes = ray.nodes

    async def slow_nodes() -> Any:
        await listing.wait()
        return await nodes()

    monkeypatch.setattr(ray, "nodes", slow_nodes)
    leader = SimpleNamespace(is_leader=True, term=1)
    quiet = SimpleNamespace(record=lambda *args, **kwargs: asyncio.sleep(0))
    memo = SimpleNamespace(reconciler=reconciler, tracer=tracer, leader=leader, reputation=quiet, ray=ray)
    patch = kopf.Patch()
    reconcile: Any = handlers.reconcile_aijob
    volunteers = {name: [node] for name, node in VOLUNTEERS.items()}
    raw: Any = copy.deepcopy(body)
    timer = asyncio.create_task(reconcile(body=kopf.Body(raw), patch=patch, memo=memo, namespace="ns",
                                          name="j", aijob_allocations={}, volunteer_nodes=volunteers))  # fmt: skip
    await asyncio.sleep(0.05)
    deleting = copy.deepcopy(body)  # the deletion event's body: no status yet
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:01Z"
    stop_ray_job: Any = handlers.stop_ray_job
    deletion = asyncio.create_task(stop_ray_job(body=deleting, memo=memo))
    await asyncio.sleep(0.05)
    assert not timer.done() and not deletion.done()  # the deletion waits for the pass
    listing.set()
    await asyncio.gather(timer, deletion)
    if retried_deletion:  # kopf runs the handler again (this process's leftover, or a retry)
        await stop_ray_job(body=deleting, memo=memo)
    return written_status(patch, body) or {}


@pytest.mark.parametrize("retried_deletion", [False, True])
async def test_a_deletion_racing_the_jobs_first_pass_still_gives_its_spans_their_root(
    monkeypatch: pytest.MonkeyPatch, retried_deletion: bool
) -> None:
    """The first pass emits aijob.Accepted and aijob.Scheduled under the root span id derived from
    the uid; the deletion handler, judging from a body without status.traceId, emitted no root:
    the trace's spans pointed at a parent that never came. The root comes once, with the phase
    that pass left."""
    provider = TracerProvider(id_generator=JobIdGenerator())
    tracer, exporter = _tracer(provider)
    status = await _deleted_during_its_first_pass(monkeypatch, tracer, retried_deletion)
    trace_id = status["traceId"]
    assert trace_id

    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert "aijob.Scheduled" in names and "aijob.Deleted" in names, names
    ids = {s.context.span_id for s in spans}
    orphans = [s.name for s in spans if s.parent is not None and s.parent.span_id not in ids]
    assert orphans == [], f"spans whose parent (the job's root) is never emitted: {orphans} (all: {names})"
    roots = [s for s in spans if s.name == "aijob"]
    assert len(roots) == 1, names
    assert roots[0].context.trace_id == int(trace_id, 16)
    attributes = dict(roots[0].attributes or {})
    assert (attributes["koinon.reason"], attributes["koinon.phase"]) == ("Deleted", status["phase"])


async def test_a_job_deleted_before_any_pass_emitted_its_spans_gets_no_trace() -> None:
    """No pass gave it a status.traceId nor emitted a span: a lone root (and its aijob.Deleted)
    would be a trace no status ever pointed to, for a job that never ran; none is emitted."""
    provider = TracerProvider(id_generator=JobIdGenerator())
    tracer, exporter = _tracer(provider)
    body = make_body({"entrypoint": "python x.py"})
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:01Z"
    tracer.deleted(body, [("Normal", "Stopped", "Ray job stopped before deletion")])
    assert exporter.get_finished_spans() == ()


async def test_a_finishing_pass_repeated_after_its_status_write_was_lost_emits_no_second_root_span() -> None:
    """record() runs before kopf's status patch lands. When that write is lost (an API error), the
    reconciler acts on the body again after STALE_BODY_GRACE_SECONDS and concludes the job again:
    a second root span (and ray.job span) with the same ids reached the backend."""
    provider = TracerProvider(id_generator=JobIdGenerator())
    tracer, exporter = _tracer(provider)
    reconciler, ray, clock, body = await _running_job(tracer)
    body["metadata"]["resourceVersion"] = "7"
    ray.set_state(submission_id_for(UID, 1), RayJobState.SUCCEEDED, exit_code=0)
    concluded = 0
    for _ in range(3):  # no pass's write lands: the body stays as it was
        clock.advance(STALE_BODY_GRACE_SECONDS / 2 + 1)
        outcome = await reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS)
        tracer.record(body, outcome.status, [(e.type, e.reason, e.message) for e in outcome.events])
        concluded += outcome.status.get("phase") == "Succeeded"
    assert concluded == 2  # the first pass, and the one after the grace (not the one within it)
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("aijob") == 1 and names.count("ray.job") == 1, names


def test_the_passs_status_is_applied_to_the_body_as_a_json_merge_patch() -> None:
    """As the API server applies it (the emulator's merge_patch): nested objects key by key, null
    deletes, also inside an object the patch adds."""
    before = {"phase": "Running", "verification": {"copies": 2, "agreeing": ["a"]}, "submissionId": "s"}
    patch: dict[str, Any] = {
        "verification": {"agreeing": None, "stopped": ["d"]},
        "scheduling": {"owners": ["bob"], "why": None},
        "submissionId": None,
    }
    assert apply_merge_patch(before, patch) == merge_patch(before, patch)
    assert apply_merge_patch(before, patch) == {
        "phase": "Running",
        "verification": {"copies": 2, "stopped": ["d"]},
        "scheduling": {"owners": ["bob"]},
    }
    assert before["verification"] == {"copies": 2, "agreeing": ["a"]}  # not changed in place


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


async def test_the_ray_jobs_traceparent_names_the_exported_root_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: TRACEPARENT, passed to the Ray job, makes the job's own spans children of the AIJob's
    root span. It must name the trace of status.traceId and the span id the root span is exported
    with (and say sampled, as the root is): a wrong id there leaves every span of the job an orphan
    or in another trace, while everything the operator exports looks right."""
    provider = TracerProvider(id_generator=JobIdGenerator())
    monkeypatch.setattr("opentelemetry.trace.get_tracer_provider", lambda: provider)  # the installed one
    tracer, exporter = _tracer(provider)
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    await _traced_step(reconciler, tracer, body)  # Accepted + Scheduled
    await _traced_step(reconciler, tracer, body)  # Submitted
    ray.set_state(submission_id_for(UID, 1), RayJobState.SUCCEEDED, exit_code=0)
    clock.advance(10)
    await _traced_step(reconciler, tracer, body)  # Completed: the root span
    assert body["status"]["phase"] == "Succeeded"

    [submission] = ray.submissions
    version, trace_id, parent_id, flags = submission.runtime_env["env_vars"]["TRACEPARENT"].split("-")
    [root] = [s for s in exporter.get_finished_spans() if s.name == "aijob"]
    assert root.context is not None and root.parent is None
    assert (version, flags) == ("00", "01")
    assert trace_id == body["status"]["traceId"] == f"{root.context.trace_id:032x}"
    assert parent_id == f"{root.context.span_id:016x}"


def resource_attributes() -> dict[str, Any]:
    """The resource attributes of the provider setup_tracing() builds from the environment."""
    provider = setup_tracing()
    assert provider is not None
    try:
        return dict(provider.resource.attributes)
    finally:
        provider.shutdown()


def test_service_name_from_otel_resource_attributes_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=sre-operator,deployment.environment=prod")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert resource_attributes()["service.name"] == "sre-operator"
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES")
    assert resource_attributes()["service.name"] == "koinon-operator"


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


HONEYCOMB_KEY = "hcaik_01hq0SECRETSECRETSECRET"


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"])
@pytest.mark.parametrize(
    "headers",
    [
        f"x-honeycomb-team: {HONEYCOMB_KEY}",  # ':' instead of '=' (the HTTP way of writing a header)
        f'"x-honeycomb-team={HONEYCOMB_KEY}"',  # YAML quoting gone wrong: the quotes are in the item
        f'x-honeycomb-team="{HONEYCOMB_KEY}"',  # ... or in the value
        f"'x-honeycomb-team={HONEYCOMB_KEY}'",  # single quotes: logged by no one, sent as a wrong header
        f"x-honeycomb-team='{HONEYCOMB_KEY}'",
    ],
)
def test_a_malformed_otlp_headers_item_is_refused_at_start_without_showing_the_api_key(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, variable: str, headers: str
) -> None:
    """The SDK logged the malformed item whole (the API key with it) and the operator then exported
    without the header: every batch failed with 401 in the background."""
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://api.honeycomb.io:443")
    monkeypatch.setenv(variable, f"x-honeycomb-dataset=koinon,{headers}")
    caplog.set_level(logging.DEBUG)
    problem = exporter_settings_problem()  # what main() runs before kopf starts
    if problem is None:  # main() would go on to kopf, whose startup handler runs this
        provider = setup_tracing()
        if provider is not None:
            provider.shutdown()
    assert HONEYCOMB_KEY not in caplog.text, "the Honeycomb API key was written to the operator's log"
    assert problem is not None and problem.startswith(f"{variable}: item 2 ")
    assert HONEYCOMB_KEY not in problem and "honeycomb" not in problem
    with pytest.raises(ValueError, match=f"{variable}: item 2 "):
        setup_tracing()


@pytest.mark.parametrize(
    "headers",
    [
        "x-honeycomb-team=hcaik_01",
        "Authorization=Basic%20dXNlcjpwYXNz, x-scope-orgid = tenant-1",  # URL-encoded; spaces around
        "Authorization=Bearer abc.def",  # a plain space in the value: the SDK takes it too
        "api-key=YWJj==,",  # '=' in a base64 value; a trailing comma
        "",
    ],
)
def test_otlp_headers_the_sdk_parses_are_accepted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, headers: str
) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", headers)
    caplog.set_level(logging.WARNING)
    assert exporter_settings_problem() is None
    assert "Header format invalid" not in caplog.text


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_generic_otlp_headers_value_the_exporter_does_not_read_is_not_checked(
    monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    # The exporters take the traces variable when it is set, the generic one only otherwise: a
    # generic value meant for other signals or SDKs must not stop the operator.
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "authorization=Bearer%20abc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", 'x-scope="tenant a"')
    assert exporter_settings_problem() is None
    # Unset (or empty) traces headers: the generic value is the one read, and checked.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "")
    assert "OTEL_EXPORTER_OTLP_HEADERS: item 1" in (exporter_settings_problem() or "")


def test_a_headers_value_that_decodes_to_a_line_break_is_refused_at_start_not_logged_at_every_export(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    otlp_http_receiver: tuple[str, list[ExportTraceServiceRequest]],
) -> None:
    """The start check read the item as written, while the SDK URL-decodes the value: a "%0A" (a
    wrapped base64 credential URL-encoded whole) passed, then requests refused the header at every
    export over OTLP/HTTP, the SDK logged the refusal at ERROR with the value (the API key) every
    batch, and no span was delivered."""
    endpoint, received = otlp_http_receiver
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"x-honeycomb-team={HONEYCOMB_KEY[:8]}%0A{HONEYCOMB_KEY[8:]}")
    caplog.set_level(logging.INFO)
    problem = exporter_settings_problem()
    if problem is None:  # main() would go on, and kopf's startup handler install it: what then
        provider = setup_tracing()
        assert provider is not None
        provider.get_tracer("test").start_span("s").end()
        provider.shutdown()
    assert HONEYCOMB_KEY[8:] not in caplog.text, "the API key was written to the operator's log"
    assert problem is not None, f"passed the start check; spans delivered: {len(received)}"
    assert problem.startswith("OTEL_EXPORTER_OTLP_HEADERS: item 1 (x-honeycomb-team): ")
    assert HONEYCOMB_KEY[:8] not in problem and HONEYCOMB_KEY[8:] not in problem


@pytest.mark.parametrize(
    ("protocol", "item"),
    [
        ("http/protobuf", "x-honeycomb-team=hcaik%0D%0A01"),  # CR LF: requests refuses, the SDK logs it
        ("http/protobuf", "x-honeycomb-team=hcaik%0001"),  # a NUL reaches the backend as it is
        ("http/protobuf", "x-honeycomb-team=hcaik%E2%82%AC01"),  # beyond Latin-1: every batch fails
        ("http/protobuf", "x-honeycomb-team=hcaik%FF01"),  # not UTF-8: decoded to U+FFFD, as above
        ("http/protobuf", "x-honeycomb%3Ateam=hcaik01"),  # a name that decodes to no header name
        ("grpc", "x-honeycomb-team=hcaik%0A01"),  # "Illegal header value": every export INTERNAL
        ("grpc", "x-honeycomb-team=hcaik%0901"),  # a tab: HTTP takes it, gRPC metadata does not
        ("grpc", "x-honeycomb-team=hcaik%C3%A901"),  # Latin-1 but not ASCII: the same
        ("grpc", "x-honeycomb-team!=hcaik01"),  # "Illegal header key"
        ("grpc", "x-honeycomb-team-bin=hcaik01"),  # binary metadata wants bytes: TypeError each time
    ],
)
@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"])
def test_a_header_the_exporter_cannot_send_once_url_decoded_is_refused_at_start_naming_it(
    monkeypatch: pytest.MonkeyPatch, protocol: str, item: str, variable: str
) -> None:
    """Judged on the header as the SDK hands it to the transport (URL-decoded): before, each passed
    the start check and every export then failed in the background."""
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv(variable, f"x-honeycomb-dataset=koinon, {item}")
    problem = exporter_settings_problem()
    name = item.split("=", 1)[0]
    assert problem is not None and problem.startswith(f"{variable}: item 2 ({name}): "), problem
    assert "hcaik" not in problem


@pytest.mark.parametrize(
    ("protocol", "headers"),
    [
        ("http/protobuf", "x-scope-orgid=caf%C3%A9"),  # Latin-1 once decoded: http.client sends it
        ("http/protobuf", "authorization=Basic%09abc"),  # a tab is part of an HTTP field value
        ("http/protobuf", "authorization=Bearer abc%0A"),  # a space in it: taken as written, not decoded
        ("grpc", "authorization=Bearer%20abc, x-honeycomb-team=hcaik%3D%3D"),
        ("grpc", "X-Scope-OrgID=tenant-1"),  # lowercased by the SDK
    ],
)
def test_headers_the_exporter_sends_once_url_decoded_are_accepted(
    monkeypatch: pytest.MonkeyPatch, protocol: str, headers: str
) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", headers)
    assert exporter_settings_problem() is None


def main_exits_2_before_kopf(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], if_kopf_started: str
) -> str:
    """The operator's main() with the OTEL_* settings of the environment: it must exit 2 before
    kopf starts (``if_kopf_started`` says what would go wrong otherwise); what it wrote to stderr."""
    from koinon_operator.main import main

    def kopf_run(**_: Any) -> None:
        raise AssertionError(if_kopf_started)

    monkeypatch.setattr(kopf, "run", kopf_run)
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_the_operator_exits_2_on_a_malformed_otlp_headers_item(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://api.honeycomb.io:443")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"x-honeycomb-team: {HONEYCOMB_KEY}")
    err = main_exits_2_before_kopf(monkeypatch, capsys, "kopf started with the API key left out of every export")
    assert "koinon-operator: OTEL_EXPORTER_OTLP_HEADERS: item 1 is not name=value" in err
    assert HONEYCOMB_KEY not in err


def test_the_operator_exits_2_naming_a_header_it_could_not_send(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "https://api.honeycomb.io:443")
    wrapped = f"{HONEYCOMB_KEY[:8]}%0A{HONEYCOMB_KEY[8:]}"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", f"x-honeycomb-team={wrapped}")
    err = main_exits_2_before_kopf(monkeypatch, capsys, "kopf started with a header no export can send")
    assert "koinon-operator: OTEL_EXPORTER_OTLP_TRACES_HEADERS: item 1 (x-honeycomb-team): " in err
    assert HONEYCOMB_KEY[:8] not in err and HONEYCOMB_KEY[8:] not in err


def _children_ending_after(spans: Any) -> tuple[Any, list[tuple[str, float]]]:
    """The root span, and its children that end after it (name, ms after)."""
    root = next(s for s in spans if s.name == "aijob")
    children = [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
    return root, [(s.name, (s.end_time - root.end_time) / 1e6) for s in children if s.end_time > root.end_time]


async def _run_with_the_real_clock(tracer: JobTracer, ray: FakeRay, body: dict[str, Any], until: str) -> None:
    """Passes on ``body`` up to phase ``until``, on the wall clock (as the operator's): the
    transition spans end at the real now, as they do in the operator."""
    clock = Clock()
    reconciler = make_reconciler(ray, clock)
    body["metadata"]["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ray_states = [None, None, RayJobState.RUNNING, RayJobState.SUCCEEDED]  # Accepted, Submitted, ...
    for ray_state in ray_states:
        if ray_state is not None:
            ray.set_state(submission_id_for(UID, 1), ray_state, exit_code=0 if ray_state.terminal else None)
        clock.now = datetime.now(UTC)
        await _traced_step(reconciler, tracer, body)
        if body["status"]["phase"] == until:
            return


async def test_the_root_span_does_not_end_before_the_spans_of_the_pass_that_finished_the_job() -> None:
    """The root ended at completionTime, in whole seconds, while the transitions of that very pass
    (aijob.Completed) ended at the nanosecond now: up to a second after their parent."""
    tracer, exporter = _tracer(TracerProvider(id_generator=JobIdGenerator()))
    body = make_body({"entrypoint": "python x.py"})
    await _run_with_the_real_clock(tracer, FakeRay(), body, until="Succeeded")
    assert body["status"]["phase"] == "Succeeded"
    root, late = _children_ending_after(exporter.get_finished_spans())
    assert not late, f"children ending after the root (ms after it): {late}"
    assert root.context.trace_id == int(body["status"]["traceId"], 16)  # still the job's own ids


async def test_a_deleted_jobs_root_span_does_not_end_before_its_stopped_and_deleted_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The root ended at deletionTimestamp (whole seconds, set by the API server), before the
    Stopped and Deleted spans the deletion handler emits afterwards."""
    from koinon_operator import handlers

    monkeypatch.setattr(kopf, "event", lambda *args, **kwargs: None)
    tracer, exporter = _tracer(TracerProvider(id_generator=JobIdGenerator()))
    ray, body = FakeRay(), make_body({"entrypoint": "python x.py"})
    await _run_with_the_real_clock(tracer, ray, body, until="Running")
    assert body["status"]["phase"] == "Running"
    body["metadata"]["deletionTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    memo = SimpleNamespace(
        reconciler=make_reconciler(ray, Clock()), tracer=tracer, leader=SimpleNamespace(is_leader=True, term=1)
    )
    stop_ray_job: Any = handlers.stop_ray_job  # kopf's decorator types it as a handler spec
    await stop_ray_job(body=body, memo=memo)
    spans = exporter.get_finished_spans()
    _, late = _children_ending_after(spans)
    assert {"aijob.Stopped", "aijob.Deleted"} <= {s.name for s in spans}
    assert not late, f"children ending after the root (ms after it): {late}"
    run = next(s for s in spans if s.name == "ray.job")
    assert run.start_time is not None and run.end_time is not None
    assert run.start_time <= run.end_time, "the ray.job span ends before it starts"


async def test_the_ray_job_span_keeps_the_sub_second_start_and_end_of_the_run() -> None:
    """startTime and completionTime were written in whole seconds, cutting the ray.job span by up
    to a second at either end."""
    tracer, exporter = _tracer(TracerProvider(id_generator=JobIdGenerator()))
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    await _traced_step(reconciler, tracer, body)  # Accepted + Scheduled
    await _traced_step(reconciler, tracer, body)  # Submitted
    ray.set_state(submission_id_for(UID, 1), RayJobState.RUNNING)
    clock.now = clock.now.replace(microsecond=250_000)
    started = clock.now
    await _traced_step(reconciler, tracer, body)  # Running
    ray.set_state(submission_id_for(UID, 1), RayJobState.SUCCEEDED, exit_code=0)
    clock.advance(3.5)
    await _traced_step(reconciler, tracer, body)  # Completed
    assert body["status"]["phase"] == "Succeeded"
    run = next(s for s in exporter.get_finished_spans() if s.name == "ray.job")
    assert run.start_time is not None and run.end_time is not None
    assert run.start_time / 1e9 == pytest.approx(started.timestamp(), abs=1e-6)
    assert (run.end_time - run.start_time) / 1e9 == pytest.approx(3.5, abs=1e-5)


async def _suspend(reconciler: AIJobReconciler, tracer: JobTracer, body: dict[str, Any], generation: int) -> None:
    """kubectl patch aijob j -p '{"spec":{"suspend":true}}', then the pass that suspends it."""
    body["spec"]["suspend"] = True
    body["metadata"]["generation"] = generation
    await _traced_step(reconciler, tracer, body)
    assert body["status"]["phase"] == "Suspended" and not body["status"].get("startTime")


async def test_a_run_ended_by_a_suspension_keeps_its_ray_job_span() -> None:
    """The job ran on Ray, was suspended (its Ray job stopped) and deleted while suspended: the
    trace said it ran (aijob.Running) but had no ray.job span, since the suspension clears
    status.startTime and the span was only emitted from startTime to completionTime."""
    tracer, exporter = _tracer(TracerProvider(id_generator=JobIdGenerator()))
    reconciler, _, clock, body = await _running_job(tracer)
    started = parse_time(body["status"]["startTime"])
    assert started is not None
    clock.advance(600)  # ten minutes of GPU time on the volunteer
    await _suspend(reconciler, tracer, body, generation=2)
    deleted = copy.deepcopy(body)
    deleted["metadata"]["deletionTimestamp"] = "2026-01-01T01:00:00Z"
    tracer.deleted(deleted, [])
    spans = exporter.get_finished_spans()
    names = [s.name for s in spans]
    assert "aijob.Running" in names and "aijob" in names, names
    runs = [s for s in spans if s.name == "ray.job"]
    assert len(runs) == 1, f"the 10-minute Ray run has no span of its own: {names}"
    run = runs[0]
    assert run.start_time is not None and run.end_time is not None
    assert run.start_time / 1e9 == pytest.approx(started.timestamp(), abs=1e-6)
    assert (run.end_time - run.start_time) / 1e9 == pytest.approx(600, abs=1)  # suspended in whole seconds
    assert dict(run.attributes or {})["koinon.phase"] == "Suspended"
    assert dict(run.attributes or {})["koinon.ray.submission_id"] == submission_id_for(UID, 1)
    assert run.status.status_code is StatusCode.UNSET  # a suspension is no failure


async def test_a_suspended_resumed_and_completed_job_has_a_ray_job_span_for_each_run() -> None:
    """The span emitted at completion covered only the resumed run (startTime is the resumed
    run's): the first run, ended by the suspension, had none."""
    tracer, exporter = _tracer(TracerProvider(id_generator=JobIdGenerator()))
    reconciler, ray, clock, body = await _running_job(tracer)
    clock.advance(600)
    await _suspend(reconciler, tracer, body, generation=2)
    clock.advance(3600)  # an hour suspended: in neither run
    body["spec"]["suspend"] = False
    body["metadata"]["generation"] = 3
    await _traced_step(reconciler, tracer, body)  # Resumed (and placed again)
    while body["status"]["phase"] != "Running":
        for submission in list(ray.jobs):
            if ray.jobs[submission].state is RayJobState.PENDING:
                ray.set_state(submission, RayJobState.RUNNING)
        await _traced_step(reconciler, tracer, body)
    resumed = parse_time(body["status"]["startTime"])
    assert resumed is not None
    clock.advance(120)
    ray.set_state(body["status"]["submissionId"], RayJobState.SUCCEEDED, exit_code=0)
    await _traced_step(reconciler, tracer, body)  # Completed
    assert body["status"]["phase"] == "Succeeded"
    spans = exporter.get_finished_spans()
    runs = sorted((s for s in spans if s.name == "ray.job"), key=lambda s: s.start_time or 0)
    assert [dict(s.attributes or {})["koinon.phase"] for s in runs] == ["Suspended", "Succeeded"], runs
    durations = [((s.end_time or 0) - (s.start_time or 0)) / 1e9 for s in runs]
    assert durations == [pytest.approx(600, abs=1), pytest.approx(120, abs=1e-5)]
    assert (runs[1].start_time or 0) / 1e9 == pytest.approx(resumed.timestamp(), abs=1e-6)
    assert [s.name for s in spans].count("aijob") == 1


async def test_a_suspending_pass_repeated_after_its_status_write_was_lost_emits_one_ray_job_span() -> None:
    """As for the finishing pass: the suspension's ray.job span comes once per process, however
    often the pass is repeated from the body its lost write left (Running, startTime set)."""
    tracer, exporter = _tracer(TracerProvider(id_generator=JobIdGenerator()))
    reconciler, _, clock, body = await _running_job(tracer)
    body["metadata"]["resourceVersion"] = "7"
    body["spec"]["suspend"] = True
    body["metadata"]["generation"] = 2
    suspended = 0
    for _ in range(3):  # no pass's write lands: the body stays as it was
        clock.advance(STALE_BODY_GRACE_SECONDS / 2 + 1)
        outcome = await reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS)
        tracer.record(body, outcome.status, [(e.type, e.reason, e.message) for e in outcome.events])
        suspended += outcome.status.get("phase") == "Suspended"
    assert suspended >= 2
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("ray.job") == 1, names


async def test_an_operator_restarted_after_the_suspension_emits_no_second_ray_job_span() -> None:
    """The suspending process emitted the run's span; the next one (a restart, a new leader) finds
    the job Suspended, startTime cleared, and its deletion emits the root alone."""
    before_restart, exported_before = _tracer(TracerProvider(id_generator=JobIdGenerator()))
    reconciler, _, clock, body = await _running_job(before_restart)
    clock.advance(600)
    await _suspend(reconciler, before_restart, body, generation=2)
    after_restart, exported_after = _tracer(TracerProvider(id_generator=JobIdGenerator()))
    await _traced_step(make_reconciler(FakeRay(), clock), after_restart, body)  # still suspended: no event
    body["metadata"]["deletionTimestamp"] = "2026-01-01T01:00:00Z"
    after_restart.deleted(body, [])
    names = [s.name for s in exported_before.get_finished_spans()] + [
        s.name for s in exported_after.get_finished_spans()
    ]
    assert names.count("ray.job") == 1 and names.count("aijob") == 1, names


def _kopf_delivers_deletion(raw: dict[str, Any]) -> None:
    """kopf's watch delivers `kubectl delete` of a job with a finalizer: kopf puts the new body in
    the timer's place (in place) before it runs the deletion handler, and the API server has
    bumped metadata.generation with the deletionTimestamp (as the emulator does)."""
    newer = copy.deepcopy(raw)
    newer["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    newer["metadata"]["generation"] = int(newer["metadata"].get("generation") or 1) + 1
    newer["metadata"]["resourceVersion"] = str(int(newer["metadata"].get("resourceVersion") or 10) + 1)
    raw.clear()
    raw.update(newer)


@pytest.mark.parametrize("reputation_awaited", [True, False])
async def test_a_job_deleted_while_its_finishing_pass_runs_gets_that_pass_written(
    monkeypatch: pytest.MonkeyPatch, reputation_awaited: bool
) -> None:
    """Review of the conditional status write: the delete's new generation made the finishing
    pass's write look stale, so it was dropped with its Completed Event; and, its drop forgetting
    that the job had finished, the deletion handler stopped the finished Ray job and said so."""
    from koinon_operator import handlers  # imported late, as the tests above: it reads its config

    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: posted.append((type, reason)))
    tracer, _ = _tracer(TracerProvider(id_generator=JobIdGenerator()))
    reconciler, ray, clock, body = await _running_job(tracer)
    body["metadata"].setdefault("resourceVersion", "10")
    ray.set_state(submission_id_for(UID, 1), RayJobState.SUCCEEDED, exit_code=0)
    stops, reading_logs = _stops_recorded_and_logs_held(monkeypatch, ray)

    async def record(*args: Any, **kwargs: Any) -> None:
        if reputation_awaited:
            await asyncio.sleep(0)

    memo = SimpleNamespace(reconciler=reconciler, tracer=tracer, leader=SimpleNamespace(is_leader=True, term=1),
                           reputation=SimpleNamespace(record=record), ray=ray)  # fmt: skip
    clock.advance(10)
    raw: Any = copy.deepcopy(body)
    live = kopf.Body(raw)  # the timer's body, and the deletion handler's
    patch = kopf.Patch(body=live)
    reconcile: Any = handlers.reconcile_aijob
    stop_ray_job: Any = handlers.stop_ray_job

    async def timer_iteration() -> dict[str, Any] | None:
        # kopf's timer: the handler, then at once its patch's functions applied to the live body.
        await reconcile(body=live, patch=patch, memo=memo, namespace="ns", name="j",
                        aijob_allocations={}, volunteer_nodes={})  # fmt: skip
        return written_status(patch, live)

    timer = asyncio.create_task(timer_iteration())
    await asyncio.sleep(0.05)
    _kopf_delivers_deletion(raw)
    deletion = asyncio.create_task(stop_ray_job(body=live, memo=memo))
    await asyncio.sleep(0.05)
    assert not timer.done() and not deletion.done()  # the deletion waits for the pass
    reading_logs.set()
    written, _ = await asyncio.gather(timer, deletion)
    assert (written or {}).get("phase") == "Succeeded"
    assert ("Normal", "Stopped") not in posted and stops == [], (posted, stops)
    assert ("Normal", "Completed") in posted, posted


def _stops_recorded_and_logs_held(monkeypatch: pytest.MonkeyPatch, ray: FakeRay) -> tuple[list[str], asyncio.Event]:
    """The Ray jobs stopped, and an event that holds a pass reading logs (the finishing pass waits
    on Ray) until it is set."""
    stops: list[str] = []
    stop_in_ray = ray.stop

    async def recorded_stop(submission_id: str) -> Any:
        stops.append(submission_id)
        return await stop_in_ray(submission_id)

    monkeypatch.setattr(ray, "stop", recorded_stop)
    reading_logs = asyncio.Event()
    logs_read = ray.logs

    async def slow_logs(*args: Any, **kwargs: Any) -> str:
        await reading_logs.wait()
        return await logs_read(*args, **kwargs)

    monkeypatch.setattr(ray, "logs", slow_logs)
    return stops, reading_logs
