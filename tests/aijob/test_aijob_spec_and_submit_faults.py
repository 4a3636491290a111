"""Specs Ray would refuse are refused first, naming the field; a submission Ray refuses fails the
job instead of looping as an outage; a running job edited into an invalid spec is stopped, and its
conditions follow the Failed phase."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_operator.api.aijob import SpecError, parse_spec
from koinon_operator.ray_jobs import RayJobState, RayUnavailableError
from koinon_operator.reconciler import submission_id_for

from tests.aijob.fake_ray import UID, Clock, FakeRay, make_body, make_reconciler, step

CRD = Path(__file__).resolve().parents[2] / "manifests" / "crds" / "aijobs.koinon.dev.yaml"


@pytest.mark.parametrize(
    ("env_vars", "field"),
    [
        (["EPOCHS=3"], "spec.runtimeEnv.env_vars"),
        ({"EPOCHS": 3}, "spec.runtimeEnv.env_vars.EPOCHS"),  # YAML's unquoted number
        ({"A=B": "1"}, "spec.runtimeEnv.env_vars"),
        ({"N" * 257: "1"}, "spec.runtimeEnv.env_vars"),
        ({f"V{i}": "1" for i in range(257)}, "spec.runtimeEnv.env_vars"),
    ],
)
def test_env_vars_ray_would_refuse_are_refused_naming_the_field(env_vars: object, field: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec({"entrypoint": "python x.py", "runtimeEnv": {"env_vars": env_vars}})
    assert raised.value.field_path == field


def test_what_ray_does_with_a_number_in_env_vars() -> None:
    # Why the check exists: Ray refuses it only when the job's supervisor starts, and the job then
    # fails like a node failure (blamed on the volunteer).
    from ray.runtime_env import RuntimeEnv

    with pytest.raises(TypeError, match="must be of type Dict"):
        RuntimeEnv(env_vars={"EPOCHS": 3})  # type: ignore[dict-item]


def test_an_env_var_value_is_never_quoted_back() -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec({"entrypoint": "x", "runtimeEnv": {"env_vars": {"TOKEN": 123456789}}})
    assert "123456789" not in str(raised.value)


async def test_env_vars_that_are_not_a_mapping_fail_the_job_with_the_field() -> None:
    ray, clock = FakeRay(), Clock()
    body = make_body({"entrypoint": "python x.py", "runtimeEnv": {"env_vars": ["EPOCHS=3"]}})
    await step(make_reconciler(ray, clock), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec")
    assert body["status"]["message"].startswith("spec.runtimeEnv.env_vars:")
    assert body["status"]["traceId"]  # traced like every AIJob
    assert not ray.submissions


def test_the_crd_takes_env_vars_as_strings_only_and_cpus_up_to_what_the_operator_takes() -> None:
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["runtimeEnv"]["properties"]["env_vars"]["additionalProperties"] == {"type": "string"}
    assert spec["resources"]["properties"]["cpus"]["maximum"] == 1024
    with pytest.raises(SpecError):
        parse_spec({"entrypoint": "x", "resources": {"cpus": 1024.5}})


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"entrypoint": "   "}, "spec.entrypoint"),  # the operator refuses it: the schema must too
        ({"entrypoint": "python x.py", "resources": {"gpus": -1}}, "spec.resources.gpus"),
    ],
)
def test_the_crd_refuses_what_the_operator_would_refuse(spec: dict[str, object], field: str) -> None:
    from koinon_emulator.schema import admit

    with pytest.raises(SpecError) as raised:
        parse_spec(spec)
    assert raised.value.field_path == field
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    causes = admit({"spec": spec}, schema).causes
    assert [cause.field for cause in causes] == [field], causes


def test_the_crd_declares_the_env_var_name_rule_for_real_api_servers() -> None:
    """Names with '=' or empty ones are refused by the operator; a real API server refuses them at
    admission by this CEL rule (the emulator does not evaluate CEL)."""
    crd = yaml.safe_load(CRD.read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    (rule,) = spec["runtimeEnv"]["properties"]["env_vars"]["x-kubernetes-validations"]
    assert rule["rule"] == "self.all(name, name != '' && size(name) <= 256 && !name.contains('='))"
    # Bounded input: a real API server estimates a rule's cost over the largest map it may see when
    # the CRD is applied, and refuses the CRD when that is over budget.
    assert spec["runtimeEnv"]["properties"]["env_vars"]["maxProperties"] == 256


async def test_a_submission_ray_refuses_fails_the_job_and_ray_counts_as_reachable() -> None:
    ray, clock = FakeRay(), Clock()
    ray.reject_submit = "Ray rejected submission (400): runtime_env invalid"
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 1})
    for _ in range(5):
        outcome = await step(reconciler, body)
        assert ("vn-1", "failure") not in outcome.reputation  # not the volunteer's fault
        clock.advance(60)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "SubmitRejected")
    assert "runtime_env invalid" in status["message"]
    assert not any(c["type"] == "RayReachable" and c["status"] == "False" for c in status["conditions"])
    assert status["completionTime"]


async def _running(reconciler: Any, ray: FakeRay) -> tuple[dict[str, Any], str]:
    """A job placed, submitted and Running (attempt 1), and its submission id."""
    body = make_body({"entrypoint": "python x.py"})
    await step(reconciler, body)  # Scheduled
    await step(reconciler, body)  # submitted
    sid = submission_id_for(UID, 1)
    ray.set_state(sid, RayJobState.RUNNING)
    await step(reconciler, body)
    assert body["status"]["phase"] == "Running"
    return body, sid


async def test_a_running_job_edited_into_an_invalid_spec_is_stopped_and_releases_its_nodes() -> None:
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body, sid = await _running(reconciler, ray)
    body["spec"]["resources"] = {"cpus": 2000}
    body["metadata"]["generation"] = 2
    await step(reconciler, body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec")
    assert sid in ray.stopped and ray.jobs[sid].state is RayJobState.STOPPED
    assert reconciler.ledger.current({}) == []
    assert await step(reconciler, body) is not None and body["status"]["reason"] == "InvalidSpec"


def _conditions(body: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in body["status"].get("conditions") or []}


async def test_a_suspended_job_that_fails_on_an_invalid_edit_is_no_longer_suspended() -> None:
    """README: the conditions follow the phase. A Failed job kept Suspended=True, so
    `kubectl wait --for=condition=Suspended` (or a Kueue-like controller) took it as suspended."""
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "suspend": True})
    await step(reconciler, body)
    assert body["status"]["phase"] == "Suspended" and _conditions(body)["Suspended"] == "True"
    body["spec"]["resources"] = {"cpus": 2000}
    body["metadata"]["generation"] = 2
    await step(reconciler, body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec")
    assert _conditions(body)["Suspended"] == "False", body["status"]["conditions"]
    assert _conditions(body)["Failed"] == "True"


class _StopFails(FakeRay):
    down = False

    async def stop(self, submission_id: str) -> None:
        if self.down:
            raise RayUnavailableError("connection refused")
        await super().stop(submission_id)


async def test_ray_reachable_is_set_back_when_an_invalid_edit_fails_a_job_after_an_outage() -> None:
    """The pass that fails the job stops its Ray job: Ray answered. A finished job is never
    reconciled with Ray again, so a RayReachable=False of the outage before stayed for good."""
    ray, clock = _StopFails(), Clock()
    reconciler = make_reconciler(ray, clock)
    body, sid = await _running(reconciler, ray)
    body["spec"]["resources"] = {"cpus": 2000}
    body["metadata"]["generation"] = 2
    ray.down = True
    await step(reconciler, body)
    assert body["status"]["phase"] == "Running" and _conditions(body)["RayReachable"] == "False"
    ray.down = False
    clock.advance(60)
    await step(reconciler, body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec")
    assert sid in ray.stopped
    assert _conditions(body)["RayReachable"] == "True", body["status"]["conditions"]


async def test_a_runtime_env_ray_cannot_start_fails_the_job_at_once_and_blames_no_volunteer() -> None:
    """`runtimeEnv: {pip: 3}` or a local working_dir pass the schema; Ray accepts the submission
    (200) and then marks it FAILED without a driver exit code, as it fails to create the job's
    supervisor. That was charged to the volunteer and run again until backoffLimit."""
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "runtimeEnv": {"pip": 3}})
    await step(reconciler, body)
    await step(reconciler, body)  # submitted
    ray.set_state(
        submission_id_for(UID, 1), RayJobState.FAILED,
        message="Failed to start supervisor actor koinon-x-1: 'runtime_env['pip'] must be of type str, list or dict'"
        ". Full traceback:\nTraceback (most recent call last):\n  ...\n"
        "TypeError: runtime_env['pip'] must be of type str, list or dict",
        error_type="JOB_SUPERVISOR_ACTOR_START_FAILURE",
    )  # fmt: skip
    outcome = await step(reconciler, body)
    assert outcome.reputation == []
    status = body["status"]
    assert (status["phase"], status["reason"], status["attempts"]) == ("Failed", "SubmitRejected", 1)
    assert "must be of type str" in status["message"] and "Traceback" not in status["message"]


async def test_a_runtime_env_that_fails_to_set_up_is_retried_without_charging_the_volunteer() -> None:
    """A pip package that does not exist fails the same everywhere, and an honest volunteer must not
    pay for the typo; a node's broken network fails the same way, so it is still retried (counted)."""
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "runtimeEnv": {"pip": ["no-such-package-xyz"]}})
    await step(reconciler, body)
    await step(reconciler, body)
    ray.set_state(
        submission_id_for(UID, 1), RayJobState.FAILED, message="runtime_env setup failed: pip install failed",
        error_type="RUNTIME_ENV_SETUP_FAILURE",
    )  # fmt: skip
    outcome = await step(reconciler, body)
    assert ("vn-1", "failure") not in outcome.reputation
    assert body["status"]["failures"] == 1 and body["status"]["phase"] == "Pending"


class _NodesDown(FakeRay):
    down = False

    async def nodes(self) -> Any:
        if self.down:
            raise RayUnavailableError("connection refused")
        return await super().nodes()


async def test_ray_reachable_is_set_back_when_an_invalid_edit_fails_a_job_never_placed() -> None:
    """A Pending job that met a Ray outage while being placed, then edited into an invalid spec
    once Ray is back: its pass asks Ray nothing, and like every other pass without a Ray error it
    sets RayReachable back (finished, the job is never reconciled with Ray again)."""
    ray, clock = _NodesDown(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    ray.down = True
    await step(reconciler, body)
    await step(reconciler, body)  # placement cannot list Ray's nodes
    assert body["status"]["phase"] == "Pending" and _conditions(body)["RayReachable"] == "False"
    ray.down = False
    body["spec"]["resources"] = {"cpus": 2000}
    body["metadata"]["generation"] = 2
    clock.advance(60)
    await step(reconciler, body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec")
    assert _conditions(body)["RayReachable"] == "True", body["status"]["conditions"]
