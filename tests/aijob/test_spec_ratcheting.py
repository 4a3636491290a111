"""Refusals added to parse_spec after operators had accepted such specs (a runtimeEnv key Ray does
not know, a runtimeEnv nested too deep, a NUL, gpuMemoryMiB with no GPUs) ratchet, as Kubernetes'
validation does: parse_spec runs on every pass, and an operator upgrade stopped and failed
(InvalidSpec) jobs the previous operator had placed and that nobody had edited. They still apply to
a job never placed and to an edit.
Also: which JOB_ENTRYPOINT_COMMAND_START_ERROR is the spec's (SubmitRejected) by Ray's own traceback,
and the CRD declares no rule that would lock existing objects before Kubernetes 1.30."""

from __future__ import annotations

import json
import os
import subprocess
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_emulator.schema import admit
from koinon_operator import reconciler as reconciler_module
from koinon_operator.api import aijob
from koinon_operator.api.aijob import AIJobSpec, SpecError
from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import AIJobReconciler, submission_id_for

from tests.aijob.fake_ray import UID, Clock, FakeRay, failed_to_start, make_body, make_reconciler, step

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = yaml.safe_load((ROOT / "manifests/crds/aijobs.koinon.dev.yaml").read_text())["spec"]["versions"][0]["schema"][
    "openAPIV3Schema"
]

# Specs the operator before these refusals placed and ran, with the field each is refused by now.
TOLERATED: dict[str, tuple[dict[str, Any], str]] = {
    "unknown-runtime-env-key": (
        {"entrypoint": "python train.py", "runtimeEnv": {"envVars": {"EPOCHS": "3"}}},
        "spec.runtimeEnv.envVars",
    ),
    "gpu-memory-without-gpus": (
        {"entrypoint": "python train.py", "resources": {"gpus": 0, "gpuMemoryMiB": 16000, "cpus": 1}},
        "spec.resources.gpuMemoryMiB",
    ),
    # Ray ignores a runtime_env field it does not know (an earlier operator's job ran), at any depth.
    "runtime-env-nested-too-deep": (
        {"entrypoint": "python train.py", "runtimeEnv": {"my_plugin": json.loads("[" * 33 + "]" * 33)}},
        "spec.runtimeEnv",
    ),
    "nul-in-env-var": (
        {"entrypoint": "python train.py", "runtimeEnv": {"env_vars": {"TOKEN": "a\x00b"}}},
        "spec.runtimeEnv.env_vars.TOKEN",
    ),
}


def _without_newer_refusals(raw: Any) -> tuple[AIJobSpec, SpecError | None]:
    """The previous operator's parse: the checks every version made, none of the newer ones."""
    spec, _ = aijob.parse_spec_ratcheting(raw)
    return spec, None


@contextmanager
def _previous_operator(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with monkeypatch.context() as patch:
        patch.setattr(reconciler_module, "parse_spec_ratcheting", _without_newer_refusals, raising=False)
        yield


async def _running_under_previous_operator(
    monkeypatch: pytest.MonkeyPatch, spec: dict[str, Any]
) -> tuple[FakeRay, Clock, dict[str, Any]]:
    ray, clock = FakeRay(), Clock()
    body = make_body(spec)
    with _previous_operator(monkeypatch):
        old = make_reconciler(ray, clock)
        for _ in range(2):
            await step(old, body)
            clock.advance(5)
        sid = body["status"].get("submissionId")
        assert sid and sid in ray.jobs, body["status"]
        ray.set_state(sid, RayJobState.RUNNING)
        await step(old, body)
    assert body["status"]["phase"] == "Running", body["status"]
    return ray, clock, body


def _tolerated_warnings(events: list[Any]) -> list[Any]:
    return [e for e in events if e.reason == "InvalidSpecTolerated"]


@pytest.mark.parametrize(("spec", "field"), TOLERATED.values(), ids=TOLERATED.keys())
async def test_a_job_running_before_the_upgrade_runs_on_with_one_warning_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, spec: dict[str, Any], field: str
) -> None:
    ray, clock, body = await _running_under_previous_operator(monkeypatch, spec)
    sid = body["status"]["submissionId"]
    events = []
    for _ in range(2):  # the upgrade, then a restart of the new operator: the warning is in status
        new = make_reconciler(ray, clock)
        for _ in range(3):
            clock.advance(30)
            events += (await step(new, body)).events
            assert body["status"]["phase"] == "Running", (body["status"]["reason"], body["status"]["message"])
    assert sid not in ray.stopped
    (warning,) = _tolerated_warnings(events)
    assert warning.type == "Warning" and warning.message.startswith(f"{field}: "), warning
    assert "a\x00b" not in warning.message  # a value is never quoted (it may be a secret)
    ray.set_state(sid, RayJobState.SUCCEEDED)
    clock.advance(30)
    await step(new, body)
    assert body["status"]["phase"] == "Succeeded", body["status"]


async def test_a_tolerated_job_is_placed_again_on_a_retry_without_a_second_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec, _ = TOLERATED["unknown-runtime-env-key"]
    ray, clock, body = await _running_under_previous_operator(monkeypatch, {**spec, "backoffLimit": 2})
    new = make_reconciler(ray, clock)
    events = list((await step(new, body)).events)
    ray.set_state(body["status"]["submissionId"], RayJobState.FAILED, message="node died")
    for _ in range(8):
        clock.advance(60)
        events += (await step(new, body)).events
        if body["status"].get("attempts") == 2 and body["status"]["submissionId"] in ray.jobs:
            break
    assert body["status"]["attempts"] == 2 and body["status"]["phase"] in ("Scheduled", "Running"), body["status"]
    assert submission_id_for(UID, 2) in ray.jobs
    for _ in range(2):
        clock.advance(30)
        events += (await step(new, body)).events
    assert len(_tolerated_warnings(events)) == 1, events


async def test_a_job_never_placed_gets_the_newer_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting (Unschedulable) when the operator was upgraded: nothing of it ran yet."""
    spec, field = TOLERATED["gpu-memory-without-gpus"]
    ray, clock = FakeRay(), Clock()
    body = make_body({**spec, "resources": {**spec["resources"], "cpus": 512}})  # fits no node
    with _previous_operator(monkeypatch):
        await step(make_reconciler(ray, clock), body)
        await step(make_reconciler(ray, clock), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "Unschedulable"), body["status"]
    await step(make_reconciler(ray, clock), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec"), body["status"]
    assert body["status"]["message"].startswith(f"{field}: ")
    assert ray.submissions == []


async def test_an_edit_of_a_tolerated_job_is_checked_as_any_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The edit (here of the entrypoint) would run from the next attempt with the refused key: it
    fails the job now, as an edit into an invalid spec does, and the running copy is stopped."""
    spec, field = TOLERATED["unknown-runtime-env-key"]
    ray, clock, body = await _running_under_previous_operator(monkeypatch, spec)
    new = make_reconciler(ray, clock)
    await step(new, body)
    assert body["status"]["phase"] == "Running"
    body["spec"] = {**body["spec"], "entrypoint": "python train.py --epochs 4"}
    body["metadata"]["generation"] += 1
    clock.advance(30)
    await step(new, body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec"), body["status"]
    assert body["status"]["message"].startswith(f"{field}: ")
    assert body["status"]["submissionId"] in ray.stopped


@pytest.mark.parametrize(("spec", "field"), TOLERATED.values(), ids=TOLERATED.keys())
async def test_an_edit_of_a_running_job_into_a_newly_refused_spec_fails_it_as_before(
    spec: dict[str, Any], field: str
) -> None:
    ray, clock = FakeRay(), Clock()
    body = make_body({"entrypoint": "python train.py"})
    rec = make_reconciler(ray, clock)
    for _ in range(2):
        await step(rec, body)
    sid = body["status"]["submissionId"]
    ray.set_state(sid, RayJobState.RUNNING)
    await step(rec, body)
    assert body["status"]["phase"] == "Running"
    body["spec"] = spec
    body["metadata"]["generation"] += 1
    clock.advance(30)
    events = (await step(rec, body)).events
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec"), body["status"]
    assert body["status"]["message"].startswith(f"{field}: ")
    assert sid in ray.stopped
    assert not _tolerated_warnings(events)


def test_the_ratchet_leaves_the_older_checks_alone() -> None:
    """An edit a previous operator refused too is refused whatever the job's status."""
    state = aijob.AIJobStatus.from_status({"phase": "Running", "attempts": 1, "submissionId": "koinon-x-1"})
    with pytest.raises(SpecError) as raised:
        AIJobReconciler._ratchet({"entrypoint": "x", "replicas": 0}, state)
    assert raised.value.field_path == "spec.replicas"


# --- the CRD adds no check existing objects could fail ----------------------------------------------


def test_the_crd_refuses_neither_a_nul_nor_gpu_memory_without_gpus() -> None:
    """Before Kubernetes 1.30 (no validation ratcheting by default) a schema or CEL rule tightened
    under existing objects fails every update of one that breaks it, its status writes and the
    removal of its finalizer included: such an AIJob could not be deleted. The operator refuses
    these for new jobs itself."""
    spec_schema = SCHEMA["properties"]["spec"]["properties"]
    assert "x-kubernetes-validations" not in spec_schema["resources"]
    for spec, _ in TOLERATED.values():
        assert not admit({"spec": spec}, SCHEMA).causes, spec
    assert not admit({"spec": {"entrypoint": "python\x00 x.py"}}, SCHEMA).causes


# --- JOB_ENTRYPOINT_COMMAND_START_ERROR: the spec's only when Popen raised ---------------------------


class _Supervisor:
    """Ray 2.60's JobSupervisor.run and _exec_entrypoint, cut to the frames a traceback shows:
    its message for JOB_ENTRYPOINT_COMMAND_START_ERROR is traceback.format_exc() of run's try."""

    def __init__(self, entrypoint: str) -> None:
        self._entrypoint = entrypoint

    def _exec_entrypoint(self, env: dict[str, str], logs_path: str) -> subprocess.Popen[bytes]:
        with open(logs_path, "a") as logs_file:
            child_process = subprocess.Popen(
                self._entrypoint,
                shell=True,
                start_new_session=True,
                stdout=logs_file,
                stderr=subprocess.STDOUT,
                env=env,
            )
            return child_process

    def run(self, logs_path: str, stop_wait: str | None = None) -> str:
        try:
            env = dict(os.environ)
            child_process = self._exec_entrypoint(env, logs_path)
            child_process.wait()
            if stop_wait is not None:  # stop() was called: Ray reads the node's RAY_JOB_STOP_WAIT_TIME_S
                stop_job_wait_time = int(stop_wait)
                del stop_job_wait_time
            return ""
        except Exception:
            return traceback.format_exc()


async def test_popen_refusing_the_entrypoint_is_a_rejection(tmp_path: Path) -> None:
    message = _Supervisor("python\x00 x.py").run(str(tmp_path / "log"))
    assert "in _exec_entrypoint" in message and message.rstrip().endswith("ValueError: embedded null byte"), message
    body, reputation = await failed_to_start(message)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "SubmitRejected"), body["status"]
    assert not [e for e in reputation if e[1] == "failure"], reputation


async def test_a_value_error_once_the_driver_ran_is_not_the_specs(tmp_path: Path) -> None:
    """A node's RAY_JOB_STOP_WAIT_TIME_S=abc raises ValueError in run() after the driver ran (the
    traceback goes through no Popen): retried, and its node charged only as a driver that could
    not start is, not the job failed at once as a spec Ray refused."""
    message = _Supervisor("true").run(str(tmp_path / "log"), stop_wait="abc")
    assert message.rstrip().endswith("ValueError: invalid literal for int() with base 10: 'abc'"), message
    assert "_exec_entrypoint" not in message
    body, reputation = await failed_to_start(message)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "BackOff"), body["status"]
    assert body["status"]["failures"] == 1
    assert not [e for e in reputation if e[1] == "failure"], reputation
