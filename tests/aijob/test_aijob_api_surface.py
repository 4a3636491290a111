"""The AIJob API as kubectl users see it: conditions that follow the phase (and kubectl wait), the
operator's words kept within status and Event limits after a long Ray message, and kubectl explain."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import submission_id_for

from tests.aijob.fake_ray import UID, Clock, FakeRay, make_body, make_reconciler, step, volunteer

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "manifests" / "crds" / "aijobs.koinon.dev.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]

# What Ray 2.60's job supervisor writes as the message of a driver that exited 1: it quotes up to
# 20,000 characters of the driver's log.
LONG_LOG = "".join(f'  File "/work/mypkg/train.py", line {i}, in step\n    loss = model(batch)\n' for i in range(80))
RAY_MESSAGE = (
    "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
    + LONG_LOG
    + "RuntimeError: CUDA out of memory\n"
)


def _conditions(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in body["status"].get("conditions") or []}


async def _run_to_running(reconciler: Any, ray: FakeRay, clock: Clock, body: dict[str, Any], attempt: int) -> None:
    for _ in range(2):  # place, submit
        await step(reconciler, body)
        clock.advance(6)
    ray.set_state(submission_id_for(UID, attempt), RayJobState.RUNNING)
    await step(reconciler, body)
    clock.advance(6)
    assert body["status"]["phase"] == "Running", body["status"]


# --------------------------------------------------------------------------- 1. stale conditions


async def test_running_condition_is_not_left_true_when_a_failed_attempt_goes_back_to_pending() -> None:
    ray, clock = FakeRay(), Clock()
    ray.logs_text = "boom\n"
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 2})
    await _run_to_running(reconciler, ray, clock, body, attempt=1)
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message="exit code 1")
    await step(reconciler, body)
    assert body["status"]["phase"] == "Pending" and body["status"]["reason"] == "BackOff"
    running = _conditions(body)["Running"]
    # `kubectl wait --for=condition=Running` returns at once on a job that no longer runs.
    assert running["status"] != "True", running


async def test_running_and_scheduled_conditions_are_not_left_true_on_a_suspended_job() -> None:
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    await _run_to_running(reconciler, ray, clock, body, attempt=1)
    body["spec"]["suspend"] = True
    body["metadata"]["generation"] = 2
    await step(reconciler, body)
    assert body["status"]["phase"] == "Suspended" and body["status"]["assignedNodes"] == []
    conditions = _conditions(body)
    assert conditions["Suspended"]["status"] == "True"
    assert conditions["Running"]["status"] != "True", conditions["Running"]
    assert conditions["Scheduled"]["status"] != "True", conditions["Scheduled"]


async def test_scheduled_condition_is_not_left_true_after_a_node_is_lost() -> None:
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    await _run_to_running(reconciler, ray, clock, body, attempt=1)
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=None, message="node died")
    # The only node leaves Ray: the attempt fails over, uncounted, and nothing is placed.
    import tests.aijob.fake_ray as fake_ray

    nodes = fake_ray.NODES
    fake_ray.NODES = []
    try:
        await step(reconciler, body, volunteers={})
    finally:
        fake_ray.NODES = nodes
    assert body["status"]["phase"] == "Pending" and body["status"]["reason"] == "NodeLost", body["status"]
    conditions = _conditions(body)
    assert conditions["Running"]["status"] != "True", conditions["Running"]
    assert conditions["Scheduled"]["status"] != "True", conditions["Scheduled"]


# --------------------------------------------------------------------------- 2. retry count lost


async def test_retry_count_survives_rays_long_failure_message_in_status_and_event() -> None:
    """Ray's own message quotes the driver's log (up to 20,000 chars); the operator appends its
    words ("retrying (1/2)", "backoffLimit=... reached") after it, so they are cut off."""
    from kopf._cogs.clients.events import CUT_MESSAGE_INFIX, MAX_MESSAGE_LENGTH

    def as_posted(message: str) -> str:  # kopf's own shortening of an Event message
        if len(message) <= MAX_MESSAGE_LENGTH:
            return message
        half = MAX_MESSAGE_LENGTH // 2
        infix = CUT_MESSAGE_INFIX
        return message[: half - len(infix) // 2] + infix + message[-half + (len(infix) - len(infix) // 2) :]

    ray, clock = FakeRay(), Clock()
    ray.logs_text = LONG_LOG + "RuntimeError: CUDA out of memory\n"
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 1})
    await _run_to_running(reconciler, ray, clock, body, attempt=1)
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message=RAY_MESSAGE)
    out = await step(reconciler, body)
    assert body["status"]["reason"] == "BackOff"
    [event] = [e for e in out.events if e.reason == "RayJobFailed"]
    assert "retry 1/1" in as_posted(event.message), as_posted(event.message)
    assert "retrying (1/1)" in body["status"]["message"], body["status"]["message"][-300:]
    clock.advance(6)
    await _run_to_running(reconciler, ray, clock, body, attempt=2)
    ray.set_state(submission_id_for(UID, 2), RayJobState.FAILED, exit_code=1, message=RAY_MESSAGE)
    out = await step(reconciler, body)
    assert body["status"]["phase"] == "Failed"
    [event] = [e for e in out.events if e.reason == "BackoffLimitExceeded"]
    assert "backoffLimit=1 reached" in as_posted(event.message), as_posted(event.message)
    assert "backoffLimit=1 reached" in _conditions(body)["Failed"]["message"]


# --------------------------------------------------------------------------- 3. kubectl explain text


def test_every_status_field_has_a_description_for_kubectl_explain() -> None:
    status = SCHEMA["properties"]["status"]["properties"]
    missing = sorted(name for name, field in status.items() if not field.get("description"))
    assert missing == [], f"`kubectl explain aijob.status` shows <no description> for: {missing}"


def test_explain_runtime_env_and_quorum_say_what_the_operator_does() -> None:
    spec = SCHEMA["properties"]["spec"]["properties"]
    runtime_env = spec["runtimeEnv"]["description"]
    # README: env_vars KOINON_* and TRACEPARENT are set by the operator (they replace the job's own).
    assert "unchanged" not in runtime_env or "KOINON_" in runtime_env, runtime_env
    quorum = spec["verification"]["properties"]["quorum"]["description"]
    # Each copy is a whole job of spec.replicas nodes, and trusted nodes may skip the extra copies.
    assert not quorum.startswith("Replicas"), quorum


# --------------------------------------------------------------------------- 4. with the real kubectl


@pytest.fixture(scope="module")
def kubectl_and_emulator(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.emulator.helpers import EmulatorThread, Kubectl, find_kubectl

    server = EmulatorThread()
    url = server.start()
    server.call(lambda e: e.apply_crd(CRD))
    binary = find_kubectl(tmp_path_factory.mktemp("kubectl-bin"))
    try:
        yield Kubectl(binary, url, tmp_path_factory.mktemp("kubectl-home"))
    finally:
        server.stop()


class _Driver:
    """Runs reconcile passes on an AIJob served by the emulator, writing status as kopf would."""

    def __init__(self, kubectl: Any, name: str, spec: dict[str, Any]) -> None:
        self.kubectl, self.name = kubectl, name
        self.ray, self.clock = FakeRay(), Clock()
        self.reconciler = make_reconciler(self.ray, self.clock)
        manifest = {
            "apiVersion": "koinon.dev/v1alpha1",
            "kind": "AIJob",
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }
        kubectl.run("apply", "-f", "-", stdin=yaml.safe_dump(manifest))

    def body(self) -> dict[str, Any]:
        got: dict[str, Any] = json.loads(self.kubectl.run("get", "aij", self.name, "-o", "json").stdout)
        return got

    async def step(self) -> None:
        out = await self.reconciler.reconcile(self.body(), {}, {"vn-1": volunteer("a", "127.0.20.1")})
        if out.status:
            patch = json.dumps({"status": out.status})
            self.kubectl.run("patch", "aij", self.name, "--subresource=status", "--type=merge", "-p", patch)
        self.clock.advance(6)

    async def run_to_running(self, attempt: int) -> None:
        await self.step()
        await self.step()
        uid = self.body()["metadata"]["uid"]
        self.ray.set_state(submission_id_for(uid, attempt), RayJobState.RUNNING)
        await self.step()
        assert self.body()["status"]["phase"] == "Running"

    def wait(self, condition: str) -> int:
        done = self.kubectl.run("wait", f"--for=condition={condition}", f"aij/{self.name}", "--timeout=2s", check=False)
        return int(done.returncode)


async def test_kubectl_wait_for_complete_still_returns_on_a_succeeded_job_after_a_spec_edit(
    kubectl_and_emulator: Any,
) -> None:
    job = _Driver(kubectl_and_emulator, "done", {"entrypoint": "python x.py"})
    await job.run_to_running(1)
    uid = job.body()["metadata"]["uid"]
    job.ray.set_state(submission_id_for(uid, 1), RayJobState.SUCCEEDED, exit_code=0)
    await job.step()
    assert job.body()["status"]["phase"] == "Succeeded"
    assert job.wait("Complete") == 0
    # An edit after completion (here: asking for cleanup) bumps metadata.generation; the operator
    # records it in status.observedGeneration but leaves the conditions' observedGeneration behind,
    # and kubectl wait ignores a condition older than the object's generation.
    job.kubectl.run("patch", "aij", "done", "--type=merge", "-p", '{"spec":{"ttlSecondsAfterFinished":3600}}')
    await job.step()
    body = job.body()
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"] == 2
    assert job.wait("Complete") == 0, f"Complete condition: {_conditions(body)['Complete']}"


async def test_kubectl_wait_for_running_does_not_return_on_a_job_waiting_to_retry(kubectl_and_emulator: Any) -> None:
    job = _Driver(kubectl_and_emulator, "retry", {"entrypoint": "python x.py", "backoffLimit": 2})
    await job.run_to_running(1)
    uid = job.body()["metadata"]["uid"]
    job.ray.set_state(submission_id_for(uid, 1), RayJobState.FAILED, exit_code=1, message="exit code 1")
    await job.step()
    status = job.body()["status"]
    assert status["phase"] == "Pending" and status["reason"] == "BackOff"
    assert job.wait("Running") != 0, "kubectl wait --for=condition=Running returned for a job not running"


async def test_backoff_limit_reached_survives_rays_long_failure_message_in_status() -> None:
    ray, clock = FakeRay(), Clock()
    ray.logs_text = LONG_LOG
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 0})
    await _run_to_running(reconciler, ray, clock, body, attempt=1)
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message=RAY_MESSAGE)
    await step(reconciler, body)
    assert body["status"]["phase"] == "Failed" and body["status"]["reason"] == "BackoffLimitExceeded"
    assert "backoffLimit=0 reached" in body["status"]["message"], body["status"]["message"][-200:]
    assert "backoffLimit=0 reached" in _conditions(body)["Failed"]["message"]
