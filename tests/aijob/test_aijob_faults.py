"""Faults around an AIJob: operator crash, Ray outage, deletion, suspend, deadline and TTL."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import replace
from urllib.parse import urlparse

import pytest
from koinon_operator.api.aijob import AIJobStatus, parse_spec
from koinon_operator.ray_jobs import RayJobsClient
from koinon_operator.reconciler import digest_of, foreign_submission, submission_of

from tests.aijob.conftest import ControlPlane, aijob, python_entrypoint
from tests.aijob.tcp_forwarder import TcpForwarder

pytestmark = pytest.mark.slow


def sleeper(seconds: float, later_attempts: float | None = None) -> str:
    later = seconds if later_attempts is None else later_attempts
    return python_entrypoint(
        "import os, time; attempt = os.environ['KOINON_ATTEMPT']; print('attempt', attempt, flush=True); "
        f"time.sleep({seconds} if attempt == '1' else {later}); print('KOINON_RESULT slept')"
    )


def _submissions_of(control_plane: ControlPlane, uid: str) -> list[str]:
    return sorted(j["submission_id"] for j in control_plane.ray_jobs() if uid in (j.get("submission_id") or ""))


def _reasons(control_plane: ControlPlane, name: str, namespace: str) -> list[str]:
    return [str(e["reason"]) for e in control_plane.events(name, namespace)]


def test_operator_killed_while_job_runs_adopts_it_on_restart(control_plane: ControlPlane, namespace: str) -> None:
    first = control_plane.start_operator(namespace, name="first")
    try:
        control_plane.apply(aijob("long", namespace, sleeper(8), resources={"gpus": 1}))
        control_plane.wait_phase("long", namespace, "Running", timeout=60)
    finally:
        first.stop(grace_seconds=0)  # SIGTERM then immediately SIGKILL of the whole group
    second = control_plane.start_operator(namespace, name="second")
    try:
        done = control_plane.wait_phase("long", namespace, "Succeeded", timeout=90)
    finally:
        second.stop(grace_seconds=5)
    uid = done["metadata"]["uid"]
    assert done["status"]["attempts"] == 1
    assert _submissions_of(control_plane, uid) == [done["status"]["submissionId"]]
    assert done["status"]["submissionId"].startswith(f"koinon-{uid}-1-")  # the attempt's nonce after it
    assert _reasons(control_plane, "long", namespace).count("Submitted") == 1


def test_the_ray_job_of_an_aijob_gone_without_its_finalizer_is_stopped(
    control_plane: ControlPlane, namespace: str
) -> None:
    """The operator down, an admin strips the finalizer and the AIJob goes at once: the next
    operator's orphan sweep stops its Ray job (real Ray), and a job whose AIJob exists runs to the
    end beside sweeps every 0.5 s."""
    first = control_plane.start_operator(namespace, name="first")
    try:
        control_plane.apply(aijob("gone", namespace, sleeper(300), resources={"gpus": 1}))
        running = control_plane.wait_phase("gone", namespace, "Running", timeout=60)
    finally:
        first.stop(grace_seconds=0)
    orphan = running["status"]["submissionId"]
    unhooked = json.dumps({"metadata": {"finalizers": None}})
    control_plane.kubectl("patch", "aijob", "gone", "-n", namespace, "--type=merge", "-p", unhooked)
    control_plane.kubectl("delete", "aijob", "gone", "-n", namespace)
    sweeping = {"KOINON_ORPHAN_SWEEP_INTERVAL": "0.5", "KOINON_ORPHAN_GRACE": "1"}
    second = control_plane.start_operator(namespace, name="second", extra_env=sweeping)
    try:
        deadline = time.monotonic() + 60
        while control_plane.ray_job(orphan)["status"] != "STOPPED":
            assert time.monotonic() < deadline, f"{orphan} still {control_plane.ray_job(orphan)['status']}"
            time.sleep(0.5)
        control_plane.apply(aijob("kept", namespace, sleeper(4), resources={"gpus": 1}))
        done = control_plane.wait_phase("kept", namespace, "Succeeded", timeout=90)
        assert done["status"]["attempts"] == 1
    finally:
        second.stop(grace_seconds=5)
    assert "no longer exists" in second.log_tail(20000)


def test_crash_between_submit_and_status_write_is_adopted_not_resubmitted(
    control_plane: ControlPlane, namespace: str
) -> None:
    # The operator's state after placing the job (an earlier operator's: an id without a nonce);
    # then Ray received the submission but the operator died before recording it.
    control_plane.apply(aijob("adopt", namespace, sleeper(1), resources={"gpus": 1}))
    created = control_plane.get("adopt", namespace)
    uid = created["metadata"]["uid"]
    submission_id = f"koinon-{uid}-1"
    volunteer = json.loads(control_plane.kubectl("get", "vn", "-o", "json"))["items"][0]
    node, address = volunteer["metadata"]["name"], volunteer["status"]["address"]
    status = {
        "phase": "Scheduled", "attempts": 1, "failures": 0, "submissionId": submission_id,
        "assignedNodes": [node], "scheduling": {"addresses": [address], "decision": "Placed"},
    }  # fmt: skip
    control_plane.kubectl(
        "patch", "aijob", "adopt", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip

    async def submit_directly() -> None:
        # What that operator submitted: exactly what this one would (it takes no other job as the
        # attempt's: README, "What a volunteer can still do"), checked against Ray's own record.
        submission = submission_of(
            f"{namespace}/adopt", parse_spec(created["spec"]), AIJobStatus.from_status(status), 0
        )
        assert submission.submission_id == submission_id
        ray = RayJobsClient(control_plane.info.ray_dashboard_url, auth_token=control_plane.info.ray_auth_token())
        try:
            assert await ray.submit(submission)
            recorded = await ray.get(submission_id)
            assert recorded is not None and recorded.submitted is not None
            assert foreign_submission(submission, recorded) is None  # Ray reports it back as submitted
            # and so with the digest a placing write records of it (status.scheduling.submissionDigests)
            assert foreign_submission(submission, recorded, placed=digest_of(submission)) is None
        finally:
            await ray.close()

    asyncio.run(submit_directly())
    operator = control_plane.start_operator(namespace)
    try:
        done = control_plane.wait_phase("adopt", namespace, "Succeeded", timeout=90)
    finally:
        operator.stop(grace_seconds=5)
    assert done["status"]["attempts"] == 1
    assert _submissions_of(control_plane, uid) == [submission_id]
    assert "Submitted" not in _reasons(control_plane, "adopt", namespace)  # it found the job, never resubmitted


def test_a_job_someone_else_submitted_under_the_attempts_id_is_not_taken_as_its_answer(
    control_plane: ControlPlane, namespace: str
) -> None:
    """Anyone with the cluster's Ray token can submit under an id it knows (an earlier operator's
    ids carry no nonce): a job of its own there, pinned to the placed node, with another
    entrypoint, is not adopted; the attempt is placed again, uncounted, under a new id."""
    control_plane.apply(aijob("taken", namespace, sleeper(1), resources={"gpus": 1}))
    created = control_plane.get("taken", namespace)
    uid = created["metadata"]["uid"]
    submission_id = f"koinon-{uid}-1"
    volunteer = json.loads(control_plane.kubectl("get", "vn", "-o", "json"))["items"][0]
    node, address = volunteer["metadata"]["name"], volunteer["status"]["address"]
    status = {
        "phase": "Scheduled", "attempts": 1, "failures": 0, "submissionId": submission_id,
        "assignedNodes": [node], "scheduling": {"addresses": [address], "decision": "Placed"},
    }  # fmt: skip
    control_plane.kubectl(
        "patch", "aijob", "taken", "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip

    async def submit_forged() -> None:
        honest = submission_of(f"{namespace}/taken", parse_spec(created["spec"]), AIJobStatus.from_status(status), 0)
        forged = replace(honest, entrypoint=python_entrypoint("print('KOINON_RESULT forged')"))
        ray = RayJobsClient(control_plane.info.ray_dashboard_url, auth_token=control_plane.info.ray_auth_token())
        try:
            assert await ray.submit(forged)
        finally:
            await ray.close()

    asyncio.run(submit_forged())
    operator = control_plane.start_operator(namespace)
    try:
        done = control_plane.wait_phase("taken", namespace, "Succeeded", timeout=90)
    finally:
        operator.stop(grace_seconds=5)
    assert done["status"]["result"]["value"] == "slept", done["status"]["result"]
    assert (done["status"]["attempts"], done["status"]["failures"]) == (2, 0)
    assert done["status"]["submissionId"].startswith(f"koinon-{uid}-2-")
    assert "SubmissionConflict" in _reasons(control_plane, "taken", namespace)


def test_ray_dashboard_outage_backs_off_without_phase_flapping(control_plane: ControlPlane, namespace: str) -> None:
    dashboard = urlparse(control_plane.info.ray_dashboard_url)
    assert dashboard.hostname is not None and dashboard.port is not None
    forwarder = TcpForwarder(dashboard.hostname, dashboard.port)
    forwarder.start()
    operator = control_plane.start_operator(namespace, dashboard_url=forwarder.url)
    try:
        control_plane.apply(aijob("steady", namespace, sleeper(10), resources={"gpus": 1}))
        control_plane.wait_phase("steady", namespace, "Running", timeout=60)
        forwarder.cut()
        phases: set[str] = set()
        saw_unreachable = False
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:
            status = control_plane.get("steady", namespace)["status"]
            phases.add(status["phase"])
            conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
            saw_unreachable |= conditions.get("RayReachable") == "False"
            time.sleep(0.3)
        assert phases == {"Running"}
        assert saw_unreachable
        forwarder.restore()
        done = control_plane.wait_phase("steady", namespace, "Succeeded", timeout=90)
    finally:
        operator.stop(grace_seconds=5)
        forwarder.cut()
    assert done["status"]["attempts"] == 1
    assert {c["type"]: c["status"] for c in done["status"]["conditions"]}["RayReachable"] == "True"


def test_deleting_a_running_job_stops_its_ray_job_first(
    control_plane: ControlPlane, namespace: str, operator: object
) -> None:
    control_plane.apply(aijob("doomed", namespace, sleeper(120), resources={"gpus": 1}))
    running = control_plane.wait_phase("doomed", namespace, "Running", timeout=60)
    submission_id = running["status"]["submissionId"]
    control_plane.kubectl("delete", "aijob", "doomed", "-n", namespace, "--timeout=60s")
    assert control_plane.kubectl_result("get", "aijob", "doomed", "-n", namespace).returncode != 0
    deadline = time.monotonic() + 30
    while control_plane.ray_job(submission_id)["status"] != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert control_plane.ray_job(submission_id)["status"] == "STOPPED"


def test_deleting_a_running_job_while_ray_is_unreachable_ends_after_the_grace(
    control_plane: ControlPlane, namespace: str
) -> None:
    """`kubectl delete` (and a namespace's deletion) must not hang for as long as the Ray head is
    gone: the finalizer holds for KOINON_STOP_GRACE, then goes with a Warning that names the Ray
    job that may still run."""
    dashboard = urlparse(control_plane.info.ray_dashboard_url)
    assert dashboard.hostname is not None and dashboard.port is not None
    forwarder = TcpForwarder(dashboard.hostname, dashboard.port)
    forwarder.start()
    operator = control_plane.start_operator(
        namespace, dashboard_url=forwarder.url, extra_env={"KOINON_STOP_GRACE": "4"}
    )
    submission_id = ""
    try:
        control_plane.apply(aijob("orphan", namespace, sleeper(120), resources={"gpus": 1}))
        submission_id = control_plane.wait_phase("orphan", namespace, "Running", timeout=60)["status"]["submissionId"]
        forwarder.cut()
        control_plane.kubectl("delete", "aijob", "orphan", "-n", namespace, "--wait=false")
        time.sleep(2)
        held = control_plane.get("orphan", namespace)  # the grace: Ray may come back
        assert held["metadata"].get("deletionTimestamp")
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if control_plane.kubectl_result("get", "aijob", "orphan", "-n", namespace).returncode != 0:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the AIJob kept its finalizer past the grace while Ray was unreachable")
        warnings = [e for e in control_plane.events("orphan", namespace) if e["reason"] == "StopUnconfirmed"]
        assert warnings and submission_id in warnings[0]["message"], warnings
        assert warnings[0]["type"] == "Warning"
    finally:
        operator.stop(grace_seconds=5)
        forwarder.restore()
        if submission_id:  # the test's own leftover: it would hold the simulated GPU
            request = urllib.request.Request(
                f"{control_plane.info.ray_dashboard_url}/api/jobs/{submission_id}/stop",
                data=b"", method="POST", headers=control_plane.info.ray_headers(),
            )  # fmt: skip
            urllib.request.urlopen(request, timeout=10).close()
        forwarder.cut()


def test_suspend_stops_the_attempt_and_resume_starts_a_new_one(
    control_plane: ControlPlane, namespace: str, operator: object
) -> None:
    control_plane.apply(aijob("pausable", namespace, sleeper(120, later_attempts=1), resources={"gpus": 1}))
    running = control_plane.wait_phase("pausable", namespace, "Running", timeout=60)
    first_submission = running["status"]["submissionId"]
    patch = ["patch", "aijob", "pausable", "-n", namespace, "--type=merge", "-p"]
    control_plane.kubectl(*patch, json.dumps({"spec": {"suspend": True}}))
    suspended = control_plane.wait_phase("pausable", namespace, "Suspended", timeout=30)
    assert suspended["status"]["assignedNodes"] == []
    deadline = time.monotonic() + 30
    while control_plane.ray_job(first_submission)["status"] != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert control_plane.ray_job(first_submission)["status"] == "STOPPED"
    control_plane.kubectl(*patch, json.dumps({"spec": {"suspend": False}}))
    done = control_plane.wait_phase("pausable", namespace, "Succeeded", timeout=90)
    assert done["status"]["attempts"] == 2
    assert done["status"]["failures"] == 0  # suspension is not a failure
    reasons = _reasons(control_plane, "pausable", namespace)
    assert "Suspended" in reasons and "Resumed" in reasons


def test_active_deadline_fails_and_stops_the_job(control_plane: ControlPlane, namespace: str, operator: object) -> None:
    control_plane.apply(
        aijob("slow", namespace, sleeper(120), resources={"gpus": 1}, activeDeadlineSeconds=3, backoffLimit=3)
    )
    failed = control_plane.wait_phase("slow", namespace, "Failed", timeout=60)
    assert failed["status"]["reason"] == "DeadlineExceeded"
    assert failed["status"]["attempts"] == 1
    deadline = time.monotonic() + 30
    submission_id = failed["status"]["submissionId"]
    while control_plane.ray_job(submission_id)["status"] != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert control_plane.ray_job(submission_id)["status"] == "STOPPED"


def test_finished_job_is_deleted_after_its_ttl(control_plane: ControlPlane, namespace: str, operator: object) -> None:
    control_plane.apply(aijob("brief", namespace, sleeper(0), resources={"gpus": 0}, ttlSecondsAfterFinished=2))
    control_plane.wait_phase("brief", namespace, "Succeeded", timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if control_plane.kubectl_result("get", "aijob", "brief", "-n", namespace).returncode != 0:
            return
        time.sleep(0.5)
    raise AssertionError("AIJob still exists 30s after ttlSecondsAfterFinished=2")


def test_a_runtime_env_ray_cannot_use_fails_the_job_once_with_rays_reason(
    control_plane: ControlPlane, namespace: str, operator: object
) -> None:
    """Against real Ray: `pip: 3` passes the schema and Ray's submit, then fails creating the job's
    supervisor. It was charged to the volunteer and run backoffLimit + 1 times."""
    control_plane.apply(aijob("badenv", namespace, sleeper(1), runtimeEnv={"pip": 3}, backoffLimit=2))
    done = control_plane.wait_phase("badenv", namespace, "Failed", timeout=60)
    assert (done["status"]["reason"], done["status"]["attempts"]) == ("SubmitRejected", 1), done["status"]
    assert "pip" in done["status"]["message"]
    # Ray took the submission and failed it afterwards (the path this test is about).
    ray_job = control_plane.ray_job(done["status"]["submissionId"])
    assert ray_job["error_type"] == "JOB_SUPERVISOR_ACTOR_START_FAILURE", ray_job
    volunteers = json.loads(control_plane.kubectl("get", "vn", "-o", "json"))["items"]
    assert not [vn["metadata"]["name"] for vn in volunteers if vn["status"].get("jobs", {}).get("failed")]


def test_two_operators_on_one_pool_take_turns(control_plane: ControlPlane, namespace: str) -> None:
    """A second operator (a second replica, one per namespace, a partitioned old pod) placed jobs
    on GPUs the first one held: only the Lease holder reconciles now, and the other takes over when
    the holder stops."""
    first = control_plane.start_operator(namespace, name="first")
    second = control_plane.start_operator(namespace, name="second")
    try:
        control_plane.apply(aijob("once", namespace, sleeper(1), resources={"gpus": 1}))
        done = control_plane.wait_phase("once", namespace, "Succeeded", timeout=90)
        holders = [p for p in (first, second) if "now holds the Lease" in p.log_tail(20000)]
        assert len(holders) == 1, [p.log_tail(2000) for p in (first, second)]
        leader = holders[0]
        follower = second if leader is first else first
        leader.stop(grace_seconds=5)  # hands the Lease over
        control_plane.apply(aijob("after", namespace, sleeper(1), resources={"gpus": 1}))
        control_plane.wait_phase("after", namespace, "Succeeded", timeout=90)
        assert "now holds the Lease" in follower.log_tail(20000)
    finally:
        first.stop(grace_seconds=5)
        second.stop(grace_seconds=5)
    assert done["status"]["attempts"] == 1
    assert _reasons(control_plane, "once", namespace).count("Submitted") == 1
