"""The TRACEPARENT the operator hands a Ray job carries the sampling decision of the operator
process that builds the submission (telemetry.root_sampled: its tracer provider and sampler). A
change of the operator's tracing configuration between the pass that places an attempt and the one
that submits or follows it (a rollout turning OTEL_EXPORTER_OTLP_ENDPOINT on, OTEL_SDK_DISABLED,
another OTEL_TRACES_SAMPLER; a new leader configured otherwise) changes only that flag: the job is
still the operator's own, never a SubmissionConflict. Anything else that differs (the trace or
parent id in TRACEPARENT, any other variable) still is.

Reconciler passes against a fake Ray Job API (tests/aijob/fake_ray.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from koinon_operator.api.aijob import AIJobStatus, parse_spec
from koinon_operator.ray_jobs import RayJobInfo, RayJobState, Submission
from koinon_operator.reconciler import (
    PLACED_SUBMISSIONS,
    digest_of,
    foreign_submission,
    submission_id_for,
    submission_of,
)
from opentelemetry.sdk.trace import TracerProvider

from .fake_ray import UID, Clock, FakeRay, make_body, make_reconciler, step, submitted_as

TRACE_ID = "0" * 31 + "1"


def tracing(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """The operator process's tracing configuration: an SDK provider (sampling every trace, so
    TRACEPARENT ends -01) or none (OTEL_SDK_DISABLED, no exporter: -00)."""
    provider: object = TracerProvider() if on else object()
    monkeypatch.setattr("opentelemetry.trace.get_tracer_provider", lambda: provider)


def reasons(outcome: Any) -> list[str]:
    return [event.reason for event in outcome.events]


async def placed_then_running(
    monkeypatch: pytest.MonkeyPatch, placing: bool, submitting: bool, following: bool, legacy: bool = False
) -> tuple[FakeRay, dict[str, Any], Any]:
    """A job placed by an operator with tracing ``placing``, submitted by one with ``submitting``
    and followed, once Ray runs it, by one with ``following``; ``legacy``: its status as an
    operator before submissionDigests wrote it. The body and the following pass's outcome."""
    ray, clock = FakeRay(), Clock()
    body = make_body({"entrypoint": "python x.py"})
    tracing(monkeypatch, placing)
    await step(make_reconciler(ray, clock), body)
    assert body["status"]["phase"] == "Scheduled"
    if legacy:
        del body["status"]["scheduling"][PLACED_SUBMISSIONS]
    tracing(monkeypatch, submitting)
    await step(make_reconciler(ray, clock), body)
    [submitted] = ray.submissions
    assert submitted.runtime_env["env_vars"]["TRACEPARENT"].endswith("-01" if submitting else "-00")
    ray.set_state(submission_id_for(UID, 1), RayJobState.RUNNING)
    tracing(monkeypatch, following)
    outcome = await step(make_reconciler(ray, clock), body)
    return ray, body, outcome


async def test_turning_tracing_on_between_placement_and_submission_is_no_submission_conflict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ray, body, outcome = await placed_then_running(monkeypatch, placing=False, submitting=True, following=True)
    assert "SubmissionConflict" not in reasons(outcome)
    assert body["status"]["phase"] == "Running"
    assert ray.stopped == []


async def test_turning_tracing_off_between_placement_and_submission_is_no_submission_conflict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ray, body, outcome = await placed_then_running(monkeypatch, placing=True, submitting=False, following=False)
    assert "SubmissionConflict" not in reasons(outcome)
    assert body["status"]["phase"] == "Running"
    assert ray.stopped == []


@pytest.mark.parametrize("submitting", [True, False])
async def test_an_attempt_placed_without_submission_digests_ignores_the_sampled_flag_too(
    monkeypatch: pytest.MonkeyPatch, submitting: bool
) -> None:
    """A status from an operator before submissionDigests: the job found under the attempt's id is
    compared with what this operator would submit, whose flag is its own tracing's."""
    ray, body, outcome = await placed_then_running(
        monkeypatch, placing=submitting, submitting=submitting, following=not submitting, legacy=True
    )
    assert "SubmissionConflict" not in reasons(outcome)
    assert body["status"]["phase"] == "Running"
    assert ray.stopped == []


@pytest.mark.parametrize("legacy", [False, True])
async def test_a_job_that_differs_in_more_than_the_sampled_flag_is_still_a_submission_conflict(
    monkeypatch: pytest.MonkeyPatch, legacy: bool
) -> None:
    """Tracing turned on between placement and submission, and someone with the cluster's Ray token
    has replaced the job under the attempt's id with one that has another variable: not adopted."""
    ray, clock = FakeRay(), Clock()
    body = make_body({"entrypoint": "python x.py"})
    tracing(monkeypatch, False)
    await step(make_reconciler(ray, clock), body)
    if legacy:
        del body["status"]["scheduling"][PLACED_SUBMISSIONS]
    tracing(monkeypatch, True)
    rec = make_reconciler(ray, clock)
    await step(rec, body)
    submission_id = submission_id_for(UID, 1)
    [ours] = ray.submissions
    env = {**ours.runtime_env["env_vars"], "LD_PRELOAD": "/tmp/forge.so"}
    forged = replace(ours, runtime_env={**ours.runtime_env, "env_vars": env})
    ray.jobs[submission_id] = replace(ray.jobs[submission_id], submitted=submitted_as(forged))
    ray.set_state(submission_id, RayJobState.RUNNING)
    outcome = await step(rec, body)
    assert "SubmissionConflict" in reasons(outcome)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "SubmissionConflict"), body["status"]
    assert submission_id in ray.stopped


def ours_and_record() -> tuple[Submission, RayJobInfo]:
    """The operator's submission for a fixed attempt (TRACEPARENT sampled) and Ray's record of it."""
    spec = {"entrypoint": "python x.py", "runtimeEnv": {"env_vars": {"A": "1"}, "pip": ["numpy"]}}
    status = {
        "attempts": 1, "submissionId": f"koinon-{UID}-1", "assignedNodes": ["vn-a"],
        "traceId": TRACE_ID, "scheduling": {"addresses": ["127.0.0.9"], "copies": 1},
    }  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        tracing(patch, True)
        ours = submission_of("ns/j", parse_spec(spec), AIJobStatus.from_status(status), 0)
    found = RayJobInfo(ours.submission_id, RayJobState.RUNNING, "", "r0", 1, None, None, None, submitted_as(ours))
    return ours, found


def with_env(submission: Submission, env_vars: dict[str, str]) -> Submission:
    return replace(submission, runtime_env={**submission.runtime_env, "env_vars": env_vars})


def with_traceparent(submission: Submission, value: str) -> Submission:
    return with_env(submission, {**submission.runtime_env["env_vars"], "TRACEPARENT": value})


def test_the_digest_formula_is_the_one_statuses_already_written_carry() -> None:
    """Statuses written before this fix carry digests of the whole runtime_env, the flag of the
    placing operator included: the formula is unchanged (its value for a fixed submission pinned),
    so they still match what was submitted, and an operator of either version reads the other's."""
    ours, found = ours_and_record()
    assert ours.runtime_env["env_vars"]["TRACEPARENT"].endswith("-01")
    assert digest_of(ours) == "dd62f259ed8e9f2d076102e19829ca38"
    assert foreign_submission(ours, found, placed=digest_of(ours)) is None


@pytest.mark.parametrize("placed_flags", ["00", "01"])
@pytest.mark.parametrize("submitted_flags", ["00", "01"])
def test_the_sampled_flag_takes_no_part_in_telling_the_operators_own_submission(
    placed_flags: str, submitted_flags: str
) -> None:
    ours, found = ours_and_record()
    base = ours.runtime_env["env_vars"]["TRACEPARENT"][:-2]
    placed = with_traceparent(ours, base + placed_flags)
    record = replace(found, submitted=submitted_as(with_traceparent(ours, base + submitted_flags)))
    assert foreign_submission(placed, record, placed=digest_of(placed)) is None  # recorded digest
    assert foreign_submission(placed, record) is None  # no digest (legacy): compared with what it would submit


def test_everything_else_in_the_runtime_env_still_tells_a_foreign_submission() -> None:
    ours, found = ours_and_record()
    traceparent = ours.runtime_env["env_vars"]["TRACEPARENT"]
    version, trace_id, parent_id, _ = traceparent.split("-")
    other_trace = f"{version}-{'f' * 32}-{parent_id}-00"
    other_parent = f"{version}-{trace_id}-{'e' * 16}-00"
    env = ours.runtime_env["env_vars"]
    for changed in (
        with_traceparent(ours, other_trace),
        with_traceparent(ours, other_parent),
        with_traceparent(ours, f"01-{trace_id}-{parent_id}-00"),  # another version
        with_traceparent(ours, traceparent[:-2]),  # no flags at all
        with_traceparent(ours, traceparent + "-00"),
        with_env(ours, {k: v for k, v in env.items() if k != "TRACEPARENT"}),
        with_env(ours, {**env, "A": "2"}),
        with_env(ours, {**env, "TRACEPARENT": traceparent[:-2] + "00", "A": "2"}),  # and another flag
        replace(ours, entrypoint="python z.py"),
        replace(ours, metadata={**ours.metadata, "koinon.dev/copy": "1"}),
    ):
        record = replace(found, submitted=submitted_as(changed))
        assert foreign_submission(ours, record, placed=digest_of(ours)) is not None, changed
        assert foreign_submission(ours, record) is not None, changed
