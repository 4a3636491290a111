"""AIJob traces as SREs read them: no runtime_env secret in spans, failed attempts name their nodes,
a verified rerun's spans its copies and a failover's its owners,
one Deleted span per TTL deletion, a deletion that left Ray running says so, a failed root says
why, revoked results reach the trace, the resource names the version, low-cardinality root names."""

from __future__ import annotations

import asyncio
import copy
import traceback
from collections.abc import Sequence
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from koinon_operator.ray_jobs import RayJobState, RayUnavailableError
from koinon_operator.reconciler import submission_id_for
from koinon_operator.telemetry import JobIdGenerator, JobTracer, setup_tracing
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tests.aijob.fake_ray import UID, Clock, FakeRay, make_body, make_reconciler
from tests.aijob.test_tracing_rules import _run_to_success_and_ttl, _traced_step

SECRET = "sk-live-999"


def _tracer() -> tuple[JobTracer, InMemorySpanExporter]:
    provider = TracerProvider(id_generator=JobIdGenerator())
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return JobTracer(provider), exporter


def _span_text(span: Any) -> str:
    return f"{span.name} {dict(span.attributes or {})} {span.status.description}"


# 1 ------------------------------------------------------------------------------------------
def _ray_supervisor_message(submission_id: str, runtime_env: dict[str, Any]) -> str:
    """Exactly what Ray 2.60's JobManager.submit_job writes when runtime_env validation raises."""
    from ray._private.utils import parse_runtime_env_for_task_or_actor

    try:
        parse_runtime_env_for_task_or_actor(runtime_env)
    except Exception as e:
        tb_str = traceback.format_exc()
        return f"Failed to start supervisor actor {submission_id}: '{e}'. Full traceback:\n{tb_str}"
    raise AssertionError("Ray accepted the runtime_env")


async def test_a_runtime_env_ray_refuses_is_not_quoted_into_spans() -> None:
    """Ray's refusal quotes the runtime_env (here a private index URL with its token) on the first
    line of its message; the SubmitRejected span (koinon.message and status description) carries it
    to the SREs' backend, while the 400 path (test_rays_reply_to_a_rejected_submission_stays_out_of_
    spans) keeps only the operator's words."""
    runtime_env = {"pip": {"pip_install_options": ["--index-url", f"https://bob:{SECRET}@pypi.internal/simple"]}}
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    tracer, exporter = _tracer()
    body = make_body({"entrypoint": "python x.py", "runtimeEnv": runtime_env})
    await _traced_step(reconciler, tracer, body)
    await _traced_step(reconciler, tracer, body)  # submitted
    sid = submission_id_for(UID, 1)
    ray.set_state(sid, RayJobState.FAILED, message=_ray_supervisor_message(sid, runtime_env),
                  error_type="JOB_SUPERVISOR_ACTOR_START_FAILURE")  # fmt: skip
    await _traced_step(reconciler, tracer, body)
    assert body["status"]["reason"] == "SubmitRejected", body["status"]["reason"]
    leaking = [s.name for s in exporter.get_finished_spans() if SECRET in _span_text(s)]
    assert leaking == [], f"spans carrying the runtime_env's token: {leaking}"


async def _spans_of_a_first_attempt_that_failed_on_its_own(backoff_limit: int) -> Sequence[ReadableSpan]:
    """The spans of a job placed, submitted, and whose first attempt exited 1."""
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    tracer, exporter = _tracer()
    body = make_body({"entrypoint": "python x.py", "backoffLimit": backoff_limit})
    await _traced_step(reconciler, tracer, body)
    await _traced_step(reconciler, tracer, body)
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message="exit code 1")
    await _traced_step(reconciler, tracer, body)
    return exporter.get_finished_spans()


# 2 ------------------------------------------------------------------------------------------
async def test_a_failed_attempts_span_names_the_nodes_it_ran_on() -> None:
    """The RayJobFailed span is built from the status *after* the pass, which clears assignedNodes:
    koinon.nodes is empty on exactly the spans where an SRE asks 'which volunteer was it?'."""
    spans = await _spans_of_a_first_attempt_that_failed_on_its_own(backoff_limit=2)
    [failed] = [s for s in spans if s.name == "aijob.RayJobFailed"]
    attributes = dict(failed.attributes or {})
    assert attributes["koinon.attempt"] == 1
    assert attributes["koinon.nodes"] == "vn-1", attributes


async def test_the_spans_concluding_a_verified_rerun_name_its_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun after NoMajority runs as many copies as the attempt before: verification.copies is
    unchanged, so the pass's merge patch leaves it out of verification, and record() (merging the
    patch shallowly) made aijob.Verified and the root span say koinon.verification.copies=0."""
    from tests.aijob import test_verification_rounds as rounds

    ray, clock = rounds.CopiesRay(["vn-a", "vn-b"]), Clock()
    reconciler, body = rounds.reconciler(ray, clock), rounds.replicated_job()
    tracer, exporter = _tracer()

    async def traced(reconciler: Any, body: dict[str, Any], volunteers: Any = None) -> Any:
        return await _traced_step(reconciler, tracer, body, volunteers)

    monkeypatch.setattr(rounds, "step", traced)  # every pass of run_copies, traced
    await rounds.run_copies(reconciler, ray, clock, body, {"vn-a": rounds.GOOD, "vn-b": rounds.FORGED})
    assert body["status"]["reason"] == "NoMajority"
    ray.present = ["vn-a", "vn-b", "vn-b2", "vn-c", "vn-d"]
    answers: dict[str, str | None] = {"vn-c": rounds.GOOD, "vn-d": rounds.GOOD, "vn-b2": rounds.FORGED}
    await rounds.run_copies(reconciler, ray, clock, body, answers)
    assert body["status"]["reason"] == "Verified" and body["status"]["verification"]["copies"] == 2
    spans = {s.name: dict(s.attributes or {}) for s in exporter.get_finished_spans()}
    for name in ("aijob.Verified", "aijob"):
        assert spans[name]["koinon.verification.copies"] == 2, (name, spans[name])
        assert spans[name]["koinon.verification.agreeing"] == "vn-a,vn-c,vn-d", (name, spans[name])


async def test_the_scheduled_span_of_a_failover_to_the_same_owner_names_the_owner() -> None:
    """A failover (NodeLost) to another node of the same owner leaves scheduling.owners unchanged:
    the pass's patch of scheduling (addresses, excludedNodes) has no owners, and record() (merging
    the patch shallowly) made aijob.Scheduled of attempt 2 say koinon.owners=''."""
    from tests.aijob.test_verification_rounds import CopiesRay, reconciler, volunteers

    ray, clock = CopiesRay(["vn-b"]), Clock()
    rec = reconciler(ray, clock)
    tracer, exporter = _tracer()
    body = make_body({"entrypoint": "python x.py"})
    bobs = volunteers(["vn-b", "vn-b2"])
    for _ in range(2):
        await _traced_step(rec, tracer, body, bobs)
    assert body["status"]["assignedNodes"] == ["vn-b"]
    ray.set_state(submission_id_for(UID, 1), RayJobState.RUNNING)
    ray.present = ["vn-a", "vn-b2"]  # vn-b leaves; bob's other node (another address) is there
    for _ in range(5):
        clock.advance(60)
        await _traced_step(rec, tracer, body, bobs)
        if body["status"].get("attempts") == 2:
            break
    assert body["status"]["attempts"] == 2 and body["status"]["assignedNodes"] == ["vn-b2"], body["status"]
    scheduled = [dict(s.attributes or {}) for s in exporter.get_finished_spans() if s.name == "aijob.Scheduled"]
    assert [(a["koinon.attempt"], a["koinon.nodes"], a["koinon.owners"]) for a in scheduled] == [
        (1, "vn-b", "bob"),
        (2, "vn-b2", "bob"),
    ]


# 3 ------------------------------------------------------------------------------------------
async def test_a_ttl_pass_repeated_before_the_delete_lands_adds_no_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every timer pass after the TTL (the delete in flight, or failing: RBAC, API down) added
    another aijob.Deleted span and Event."""
    from koinon_operator import handlers

    posted: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda *args, **kwargs: posted.append(kwargs["reason"]))
    stuck = asyncio.Event()

    async def delete_in_flight(namespace: str, name: str, uid: str) -> None:
        await stuck.wait()  # the API server takes its time

    monkeypatch.setattr(handlers, "delete_aijob", delete_in_flight)
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    tracer, exporter = _tracer()
    body = make_body({"entrypoint": "python x.py", "ttlSecondsAfterFinished": 0})
    for _ in range(2):
        await _traced_step(reconciler, tracer, body)
    ray.set_state(submission_id_for(UID, 1), RayJobState.SUCCEEDED, exit_code=0)
    await _traced_step(reconciler, tracer, body)
    assert body["status"]["phase"] == "Succeeded"
    leader = SimpleNamespace(is_leader=True, term=1)
    quiet = SimpleNamespace(record=lambda *args: None)
    memo = SimpleNamespace(reconciler=reconciler, tracer=tracer, leader=leader, reputation=quiet)
    reconcile: Any = handlers.reconcile_aijob
    try:
        for _ in range(3):  # passes after the TTL while the delete is still in flight
            clock.advance(5)
            raw: Any = copy.deepcopy(body)
            await reconcile(body=kopf.Body(raw), patch=kopf.Patch(), memo=memo, namespace="ns",
                            name="j", aijob_allocations={}, volunteer_nodes={})  # fmt: skip
    finally:
        stuck.set()
        await asyncio.sleep(0)
    names = [s.name for s in exporter.get_finished_spans()]
    assert names.count("aijob.Deleted") == 1, names
    assert posted.count("Deleted") == 1, posted


# 4 ------------------------------------------------------------------------------------------
async def _deleted_running_job(monkeypatch: pytest.MonkeyPatch, ray_down: bool, leader: Any) -> InMemorySpanExporter:
    from koinon_operator import handlers

    monkeypatch.setattr(kopf, "event", lambda *args, **kwargs: None)
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    tracer, exporter = _tracer()
    body = make_body({"entrypoint": "python x.py"})
    await _traced_step(reconciler, tracer, body)
    await _traced_step(reconciler, tracer, body)
    ray.set_state(submission_id_for(UID, 1), RayJobState.RUNNING)
    await _traced_step(reconciler, tracer, body)
    assert body["status"]["phase"] == "Running"
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    if ray_down:

        async def down(submission_id: str) -> None:
            raise RayUnavailableError("Ray dashboard unreachable")

        ray.stop = down  # type: ignore[method-assign]
    memo = SimpleNamespace(reconciler=reconciler, tracer=tracer, ray=ray, leader=leader)
    stop_ray_job: Any = handlers.stop_ray_job
    await stop_ray_job(body=body, memo=memo, runtime=timedelta(seconds=10**6))
    return exporter


async def test_a_deletion_that_could_not_stop_the_ray_job_shows_in_the_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """StopUnconfirmed is a Warning Event ('may still run: ...'), but the trace only gets
    aijob.Deleted and a root span with status UNSET: the SRE's view says nothing is left running."""
    exporter = await _deleted_running_job(monkeypatch, True, SimpleNamespace(is_leader=True, term=1))
    spans = exporter.get_finished_spans()
    unconfirmed = [s for s in spans if "StopUnconfirmed" in s.name or "StopUnconfirmed" in str(s.attributes)]
    assert unconfirmed, [s.name for s in spans]
    assert unconfirmed[0].status.status_code is StatusCode.ERROR


class _LeaseLostDuringStop:
    """Leads when the deletion handler starts; the Lease runs out while Ray is asked to stop."""

    def __init__(self) -> None:
        self.checks = 0
        self.term = 1

    @property
    def is_leader(self) -> bool:
        self.checks += 1
        return self.checks == 1


async def test_a_deletion_pass_that_lost_the_lease_emits_no_root_span(monkeypatch: pytest.MonkeyPatch) -> None:
    """reconcile_aijob re-checks the lease/term before record(); stop_ray_job does not before
    deleted(). The new leader's deletion handler (finalizer still there) emits the root span as
    well: two root spans with the same span id in one trace."""
    emitted: list[Any] = []
    monkeypatch.setattr(JobTracer, "deleted", lambda self, body, events=(): emitted.append(body))
    # It keeps the finalizer instead (returning would let kopf remove it, and the new leader's
    # handler, which emits the root, would never run): the new leader stops the job again.
    with pytest.raises(kopf.TemporaryError, match="lease ran out"):
        await _deleted_running_job(monkeypatch, False, _LeaseLostDuringStop())
    assert emitted == [], "root span emitted by an operator that no longer holds the Lease"


# 5 ------------------------------------------------------------------------------------------
async def test_a_failed_jobs_root_span_says_why() -> None:
    spans = await _spans_of_a_first_attempt_that_failed_on_its_own(backoff_limit=0)
    [root] = [s for s in spans if s.name == "aijob"]
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description, "root span ERROR without a description (Jaeger/Tempo show a bare error)"


# 6 ------------------------------------------------------------------------------------------
def test_a_revoked_result_shows_in_the_jobs_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """ResultRevoked is written as a condition only: the trace keeps a root span with status OK
    and nothing says the accepted result was revoked."""
    from koinon_operator.revocation import ResultRechecker

    from tests.aijob.test_result_revocation import NOW, _verified_job, _volunteer

    provider = TracerProvider(id_generator=JobIdGenerator())
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr("opentelemetry.trace.get_tracer_provider", lambda: provider)
    job = _verified_job("skipped", ["m2"], ["mallory"], None)
    job["metadata"].update(resourceVersion="1", uid=UID)
    job["status"]["traceId"] = "ab" * 16
    fleet = [_volunteer("m1", "mallory", 1), _volunteer("m2", "mallory")]

    class Api:
        def list_cluster_custom_object(self, group: str, version: str, plural: str) -> dict[str, Any]:
            return {"items": fleet if plural == "volunteernodes" else [job]}

        def patch_namespaced_custom_object_status(self, *args: Any) -> None:
            pass

    monkeypatch.setattr("koinon_operator.revocation.load_config", lambda: None)
    monkeypatch.setattr("kubernetes.client.CustomObjectsApi", Api)
    assert ResultRechecker(tracer=JobTracer(provider))._recheck(NOW) == 1
    spans = exporter.get_finished_spans()
    assert any("ResultRevoked" in s.name and s.context.trace_id == int("ab" * 16, 16) for s in spans), spans


# 7 ------------------------------------------------------------------------------------------
def test_resource_names_the_operators_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """service.version is missing: an SRE cannot tell which operator release emitted a trace."""
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = setup_tracing()
    assert provider is not None
    try:
        assert "service.version" in provider.resource.attributes, dict(provider.resource.attributes)
    finally:
        provider.shutdown()


async def test_root_span_name_is_low_cardinality_with_k8s_attributes() -> None:
    """OTel: span names are low-cardinality; 'aijob <ns>/<name>' makes one span name per job
    (Tempo's span metrics and Honeycomb's name breakdowns get a series per job), and the
    namespace is in an attribute of its own."""
    tracer, exporter = _tracer()
    await _run_to_success_and_ttl(tracer)
    [root] = [s for s in exporter.get_finished_spans() if s.parent is None]
    assert "ns/j" not in root.name, root.name
    assert dict(root.attributes or {}).get("koinon.aijob.namespace") == "ns", dict(root.attributes or {})


async def test_span_and_resource_do_not_give_k8s_namespace_name_two_meanings(monkeypatch: pytest.MonkeyPatch) -> None:
    """manifests/operator/deployment.yaml sets the resource attribute k8s.namespace.name to the
    operator pod's namespace; JobTracer._job sets the span attribute k8s.namespace.name to the
    AIJob's namespace. Backends that flatten resource and span attributes (Honeycomb, Datadog,
    Elastic, Tempo's unscoped `.k8s.namespace.name`) then see one key with two values: a search
    for the team's namespace, or for the operator's, returns the wrong spans."""
    from opentelemetry.sdk.resources import Resource

    # What the deployment's env expands to; setup_tracing builds its resource with Resource.create().
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=op-0,k8s.namespace.name=koinon-system")
    provider = TracerProvider(resource=Resource.create(), id_generator=JobIdGenerator())
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = JobTracer(provider)
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    await _traced_step(reconciler, tracer, body)
    await _traced_step(reconciler, tracer, body)
    spans = exporter.get_finished_spans()
    assert spans
    span: Any = spans[0]
    resource_ns = span.resource.attributes.get("k8s.namespace.name")
    span_ns = (span.attributes or {}).get("k8s.namespace.name")
    assert resource_ns is None or span_ns is None or resource_ns == span_ns, (resource_ns, span_ns)
