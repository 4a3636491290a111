"""Tracing as SREs rely on it and Ray errors as namespace users see them: the Ray token never in a
status or a log line, ratio sampling keeps its share of jobs, a deleted job's trace gets its root,
OTEL_SDK_DISABLED and an explicit OTEL_TRACES_EXPORTER=otlp behave as the spec says, the Ray
job is not told its parent was recorded when the operator records nothing, and the operator's
shutdown flushes the last spans without waiting long on a collector that does not answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from datetime import timedelta
from types import SimpleNamespace
from typing import Any
from unittest.mock import AsyncMock, Mock

import kopf
import pytest
from aiohttp import web
from koinon_operator.inventory import RayNodeCache
from koinon_operator.placement import FirstFitPlacer
from koinon_operator.ray_jobs import RayJobsClient, RayJobState, RayUnavailableError
from koinon_operator.reconciler import AIJobReconciler, submission_id_for
from koinon_operator.telemetry import (
    JobIdGenerator,
    JobTracer,
    _exporters_from_env,
    exporter_settings_problem,
    setup_tracing,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import ProxyTracerProvider

from .fake_ray import UID, Clock, FakeRay, make_body, make_reconciler, step
from .test_tracing_rules import _traced_step
from .test_tracing_rules import _tracer as tracer_with

TOKEN = "SECRET-RAY-TOKEN-0123456789"


async def _garbage_http_server() -> tuple[asyncio.AbstractServer, str]:
    """Answers every request with a malformed HTTP reply (as a TLS port, a non-HTTP service or a
    broken proxy does): aiohttp raises ClientResponseError, whose repr holds the request headers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(4096)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nxx")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_ray_auth_token_is_not_quoted_in_ray_errors() -> None:
    server, url = await _garbage_http_server()
    client = RayJobsClient(url, auth_token=TOKEN)
    try:
        with pytest.raises(RayUnavailableError) as caught:
            await client.get("koinon-x-1")
    finally:
        await client.close()
        server.close()
    assert TOKEN not in str(caught.value)


async def test_ray_auth_token_does_not_reach_the_aijob_status() -> None:
    """The RayReachable condition is readable by every user of the namespace (and by the
    operator's logs): it must never carry the cluster's Ray token."""
    server, url = await _garbage_http_server()
    ray = RayJobsClient(url, auth_token=TOKEN)
    clock = Clock()
    reconciler = AIJobReconciler(
        ray=ray, placer=FirstFitPlacer(), nodes=RayNodeCache(ray, max_age_seconds=0.0),
        clock=lambda: clock.now, monotonic=lambda: clock.mono,
    )  # fmt: skip
    body = make_body({"entrypoint": "python x.py"})
    try:
        await step(reconciler, body)  # Accepted, then placement asks Ray for its nodes
    finally:
        await ray.close()
        server.close()
    conditions = body["status"].get("conditions") or []
    ray_reachable = [c for c in conditions if c["type"] == "RayReachable"]
    assert ray_reachable, body["status"]
    assert TOKEN not in str(body["status"])


def _tracer() -> tuple[JobTracer, InMemorySpanExporter]:
    return tracer_with(TracerProvider(id_generator=JobIdGenerator()))


# KOINON_RAY_DASHBOARD=http://koinon:PASSWORD@host: aiohttp sends the userinfo as Basic auth (a
# dashboard behind an authenticating proxy).
PASSWORD = "pr0xy-s3cret"


async def test_a_basic_auth_dashboard_url_works() -> None:
    """So the configuration whose password must stay out of messages is a real one."""
    seen: list[str] = []

    async def jobs(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response([])

    app = web.Application()
    app.router.add_get("/api/jobs/", jobs)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = RayJobsClient(f"http://koinon:{PASSWORD}@127.0.0.1:{port}")
    try:
        assert await client.list_unfinished_jobs() == []
    finally:
        await client.close()
        await runner.cleanup()
    assert seen and seen[0].startswith("Basic "), seen


async def test_the_dashboard_urls_password_stays_out_of_ray_errors_status_and_spans(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A Ray outage's error named the dashboard URL whole, its password with it: in the
    RayReachable condition and the StopUnconfirmed Event every reader of the namespace sees, the
    operator's log, and the StopUnconfirmed span (and the root's status) in the trace backend."""
    from koinon_operator import handlers

    posted: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: posted.append(message))
    ray = RayJobsClient(f"http://koinon:{PASSWORD}@127.0.0.1:1", timeout_seconds=2)
    clock = Clock()
    reconciler = AIJobReconciler(
        ray=ray, placer=FirstFitPlacer(), nodes=RayNodeCache(ray, max_age_seconds=0.0),
        clock=lambda: clock.now, monotonic=lambda: clock.mono,
    )  # fmt: skip
    tracer, exporter = _tracer()
    body = make_body({"entrypoint": "python x.py"})
    try:
        with pytest.raises(RayUnavailableError) as caught:
            await ray.get("koinon-x-1")
        await _traced_step(reconciler, tracer, body)  # Accepted, then placement asks Ray for its nodes
        body["status"].update(phase="Running", submissionId="koinon-x-1", attempts=1)
        body["metadata"]["deletionTimestamp"] = "2026-01-01T00:05:00Z"
        memo = SimpleNamespace(reconciler=reconciler, tracer=tracer, leader=SimpleNamespace(is_leader=True, term=1))
        stop_ray_job: Any = handlers.stop_ray_job  # kopf's decorator types it as a handler spec
        past_grace = timedelta(seconds=handlers.CONFIG.stop_grace_seconds + 1)  # StopUnconfirmed
        await stop_ray_job(body=body, memo=memo, runtime=past_grace)
    finally:
        await ray.close()
    assert "koinon:***@127.0.0.1:1" in str(caught.value)
    ray_reachable = [c for c in body["status"].get("conditions") or [] if c["type"] == "RayReachable"]
    assert ray_reachable and "127.0.0.1:1" in ray_reachable[0]["message"], body["status"]
    assert PASSWORD not in str(body["status"])
    assert any("StopUnconfirmed" in m or "without stopping" in m for m in posted), posted
    assert not [m for m in posted if PASSWORD in m], posted
    assert "koinon:***@" in caplog.text and PASSWORD not in caplog.text

    def text(span: ReadableSpan) -> str:
        return f"{span.name} {dict(span.attributes or {})} {span.status.description}"

    spans = exporter.get_finished_spans()
    assert "aijob.StopUnconfirmed" in [s.name for s in spans]
    leaking = [s.name for s in spans if PASSWORD in text(s)]
    assert leaking == [], f"spans carrying the dashboard URL's password: {leaking}"


async def test_deleting_a_running_job_still_emits_its_root_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transition spans name the root span as their parent; the root is only emitted when the job
    finishes. A job deleted while it runs never finishes, so its trace stays without a root span
    for good (Jaeger: 'invalid parent span id', Tempo: '<root span not yet received>')."""
    from koinon_operator import handlers

    monkeypatch.setattr(kopf, "event", lambda *args, **kwargs: None)
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    tracer, exporter = _tracer()
    body = make_body({"entrypoint": "python x.py"})
    await _traced_step(reconciler, tracer, body)  # Accepted + Scheduled
    await _traced_step(reconciler, tracer, body)  # Submitted
    ray.set_state(submission_id_for(UID, 1), RayJobState.RUNNING)
    await _traced_step(reconciler, tracer, body)  # Running
    assert body["status"]["phase"] == "Running"

    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    memo = SimpleNamespace(
        reconciler=reconciler, tracer=tracer, ray=ray, leader=SimpleNamespace(is_leader=True, term=1)
    )
    stop_ray_job: Any = handlers.stop_ray_job  # kopf's decorator types it as a handler spec
    await stop_ray_job(body=body, memo=memo)  # kubectl delete aijob j
    assert ray.stopped == [submission_id_for(UID, 1)]

    names = [s.name for s in exporter.get_finished_spans()]
    assert "aijob.Running" in names
    assert "aijob" in names, f"the trace of a deleted job never gets its root span: {names}"


def test_otel_sdk_disabled_turns_tracing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SDK_DISABLED=true: 'a no-op SDK implementation will be used for all telemetry signals'.
    The operator still builds an OTLP exporter (and refuses to start over its settings)."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    # Tracing is off: nothing to refuse, the operator must start.
    assert exporter_settings_problem() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    provider = setup_tracing()
    try:
        assert provider is None, "an exporter and a batch thread are set up with the SDK disabled"
    finally:
        if provider is not None:
            provider.shutdown()


async def test_traceparent_is_not_marked_sampled_when_the_operator_exports_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without tracing configured, the Ray job is told (flags 01) that its parent was recorded: an
    instrumented job with its own exporter then records every span under a root that never exists."""
    monkeypatch.setattr("opentelemetry.trace.get_tracer_provider", lambda: ProxyTracerProvider())
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    await step(reconciler, body)
    await step(reconciler, body)
    env = ray.submissions[0].runtime_env["env_vars"]
    assert not env.get("TRACEPARENT", "").endswith("-01"), env.get("TRACEPARENT")


def test_explicit_otlp_exporter_without_endpoint_uses_the_spec_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_TRACES_EXPORTER=otlp with no endpoint: the spec's default is localhost:4317 (a node-local
    agent or a collector sidecar). The operator silently exports nothing."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    provider = setup_tracing()
    try:
        assert provider is not None
    finally:
        if provider is not None:
            provider.shutdown()


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.8])
def test_ratio_sampling_keeps_about_that_share_of_jobs(ratio: float) -> None:
    """OTEL_TRACES_SAMPLER=(parentbased_)traceidratio decides on the low 64 bits of the trace id.
    The trace id is the Kubernetes uid (a UUIDv4) as is, whose low 64 bits start with the RFC 4122
    variant bits '10': they always lie in [2^63, 2^63 + 2^62). Any ratio under 0.5 then keeps no
    job at all, and any ratio of 0.75 or more keeps every job."""
    import random
    import uuid

    from koinon_operator.telemetry import root_sampled, trace_id_for
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(ratio))
    rng = random.Random(7)
    uids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2000)]
    kept = sum(root_sampled(trace_id_for(uid), provider) for uid in uids) / len(uids)
    assert abs(kept - ratio) < 0.05, f"ratio {ratio}: {kept:.2%} of jobs traced"


@pytest.mark.parametrize("setting", ["zipkin", "otlp,jaeger"])
def test_an_exporter_the_operator_does_not_have_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", setting)
    problem = exporter_settings_problem()
    assert problem is not None and problem.startswith("OTEL_TRACES_EXPORTER:"), problem


def test_an_exporter_list_exports_to_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    provider = setup_tracing()
    assert provider is not None
    try:
        processors = provider._active_span_processor._span_processors
        kinds = sorted(type(p.span_exporter).__name__ for p in processors)  # type: ignore[attr-defined]
        assert kinds == ["ConsoleSpanExporter", "OTLPSpanExporter"]
    finally:
        provider.shutdown()


async def test_a_failed_jobs_output_stays_out_of_its_spans() -> None:
    """The Event and the status carry the tail of the job's log (its namespace's to read); the span
    goes to the SREs' backend, and whatever the job printed (a secret, say) must not."""
    ray, clock = FakeRay(), Clock()
    ray.logs_text = "Traceback (most recent call last):\nValueError: API_KEY=sk-live-123 rejected\n"
    reconciler = make_reconciler(ray, clock)
    tracer, exporter = _tracer()
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 0})
    await _traced_step(reconciler, tracer, body)
    await _traced_step(reconciler, tracer, body)
    # Its driver ran and exited 1 (Ray names the driver's node then: the log is read from there).
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message="exit code 1")
    await _traced_step(reconciler, tracer, body)
    assert body["status"]["phase"] == "Failed", body["status"]
    assert "sk-live-123" in str(body["status"])  # still there for the job's owners
    spans = exporter.get_finished_spans()
    assert any(s.name == "aijob.BackoffLimitExceeded" for s in spans), [s.name for s in spans]
    for span in spans:
        assert "sk-live-123" not in str(dict(span.attributes or {})), span.name
        assert "sk-live-123" not in str(span.status.description), span.name


JOB_SECRET = "sk-live-456"
JOB_LOG = f"Traceback (most recent call last):\nValueError: API_KEY={JOB_SECRET} rejected\n"


async def test_ray_failure_message_with_real_rays_log_tail_stays_out_of_spans() -> None:
    ray, clock = FakeRay(), Clock()
    ray.logs_text = JOB_LOG
    reconciler = make_reconciler(ray, clock)
    tracer, exporter = _tracer()
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 0})
    await _traced_step(reconciler, tracer, body)
    await _traced_step(reconciler, tracer, body)
    # What Ray 2.60's job supervisor really writes as the message of a driver that exited 1.
    real_message = (
        "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n" + JOB_LOG
    )
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message=real_message)
    await _traced_step(reconciler, tracer, body)
    assert body["status"]["phase"] == "Failed", body["status"]
    for span in exporter.get_finished_spans():
        assert JOB_SECRET not in str(dict(span.attributes or {})), (span.name, dict(span.attributes or {}))
        assert JOB_SECRET not in str(span.status.description), span.name


async def test_successful_jobs_printed_result_stays_out_of_spans() -> None:
    """The Completed event quotes the KOINON_RESULT value the job printed (up to 200 chars)."""
    ray, clock = FakeRay(), Clock()
    ray.logs_text = f'KOINON_RESULT {{"token": "{JOB_SECRET}"}}\n'
    reconciler = make_reconciler(ray, clock)
    tracer, exporter = _tracer()
    body = make_body({"entrypoint": "python x.py"})
    await _traced_step(reconciler, tracer, body)
    await _traced_step(reconciler, tracer, body)
    ray.set_state(submission_id_for(UID, 1), RayJobState.SUCCEEDED, exit_code=0)
    await _traced_step(reconciler, tracer, body)
    assert body["status"]["phase"] == "Succeeded", body["status"]
    for span in exporter.get_finished_spans():
        assert JOB_SECRET not in str(dict(span.attributes or {})), (span.name, dict(span.attributes or {}))


def test_empty_traces_exporter_is_treated_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "")
    exporters = _exporters_from_env()
    try:
        assert exporters == [], [type(e).__name__ for e in exporters]
    finally:
        for exporter in exporters:
            exporter.shutdown()


async def test_spans_do_not_carry_the_digest_of_a_jobs_declared_result() -> None:
    """A result's digest is an unsalted sha256 of what the job printed: "42" is one lookup away. The
    NoMajority event listed the votes by digest; it gives counts only."""
    import hashlib

    from koinon_operator.telemetry import operator_part

    from .test_verification_rounds import FORGED, GOOD, CopiesRay, replicated_job, run_copies
    from .test_verification_rounds import reconciler as copies_reconciler

    ray, clock = CopiesRay(["vn-a", "vn-b"]), Clock()
    rec, body = copies_reconciler(ray, clock), replicated_job(quorum=2)
    out = await run_copies(rec, ray, clock, body, {"vn-a": GOOD, "vn-b": FORGED})
    digest = hashlib.sha256(b"42").hexdigest()
    assert body["status"]["reason"] == "NoMajority"
    assert "owners per answer: 1 vs 1" in body["status"]["message"], body["status"]["message"]
    assert not any(digest in e.message for e in out.events), [e.message for e in out.events]
    assert all(digest not in operator_part(e.message) for e in out.events)


async def test_the_retry_count_stays_in_the_span_and_the_log_tail_out() -> None:
    from koinon_operator.telemetry import operator_part

    ray, clock = FakeRay(), Clock()
    ray.logs_text = JOB_LOG
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 2})
    await step(reconciler, body)
    await step(reconciler, body)
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message="exit code 1")
    outcome = await step(reconciler, body)
    [event] = [e for e in outcome.events if e.reason == "RayJobFailed"]
    assert JOB_SECRET in event.message  # the Event keeps the tail for the job's owners
    span_text = operator_part(event.message)
    assert "retry 1/2" in span_text and JOB_SECRET not in span_text, span_text


async def test_rays_reply_to_a_rejected_submission_stays_out_of_spans() -> None:
    """Ray's 400 may quote the runtime_env, the job's env var values among them: the Event and
    status keep it for the job's owners, the span's message (its first line) does not."""
    from aiohttp import web
    from koinon_operator.ray_jobs import RayRequestError, Submission
    from koinon_operator.telemetry import operator_part

    async def reject(request: web.Request) -> web.Response:
        return web.json_response({"error": "runtime_env invalid: {'env_vars': {'API_KEY': 'sk-live-789'}}"}, status=400)

    app = web.Application()
    app.router.add_post("/api/jobs/", reject)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = RayJobsClient(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(RayRequestError) as caught:
            await client.submit(Submission("koinon-x-1", "python x.py", {}, {}, {}))
    finally:
        await client.close()
        await runner.cleanup()
    assert "sk-live-789" in str(caught.value)
    assert operator_part(str(caught.value)) == "Ray rejected submission (400):"


class _HungCollector(SpanExporter):
    """An OTLP export to a collector that accepts the connection and never answers."""

    def __init__(self) -> None:
        self.answer = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.answer.wait(60)
        return SpanExportResult.FAILURE


def _shutting_down(provider: TracerProvider) -> SimpleNamespace:
    """The memo kopf's cleanup handler sees, with the operator's other parts stood in for."""
    return SimpleNamespace(
        uptime_sampler=Mock(), result_rechecker=Mock(), orphan_sweep=Mock(), leader_election=Mock(),
        leader=SimpleNamespace(release=AsyncMock()), ray=SimpleNamespace(close=AsyncMock()), tracing=provider,
    )  # fmt: skip


async def test_shutdown_with_a_hung_collector_neither_blocks_the_event_loop_nor_waits_30_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """provider.shutdown() ran on the event loop and waited 30 s for the batch processor's last
    export: the rollout's SIGTERM turned into a SIGKILL, and nothing else ran meanwhile."""
    from koinon_operator import handlers

    monkeypatch.setattr(handlers, "TRACING_SHUTDOWN_S", 0.5, raising=False)
    collector = _HungCollector()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(collector))
    provider.get_tracer("test").start_span("last").end()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.05)

    ticker = asyncio.create_task(tick())
    close: Any = handlers.close  # kopf's decorator types it as a handler spec
    started = time.monotonic()
    try:
        await close(memo=_shutting_down(provider))
    finally:
        took = time.monotonic() - started
        collector.answer.set()
        ticker.cancel()
    assert took < 3, f"the cleanup waited {took:.1f} s on the collector"
    assert ticks >= 5, "the event loop was blocked during the cleanup"


async def test_shutdown_flushes_the_last_spans_to_a_collector_that_answers() -> None:
    from koinon_operator import handlers

    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    provider.get_tracer("test").start_span("last").end()
    close: Any = handlers.close
    await close(memo=_shutting_down(provider))
    assert [s.name for s in exporter.get_finished_spans()] == ["last"]
