"""AIJob end to end through the real pieces: kubectl → API emulator → kopf operator → Ray jobs."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from koinon_operator.kube import SUBMISSION_KEY_SECRET
from koinon_operator.reconciler import keyed_submission_nonce

from tests.aijob.conftest import ControlPlane, aijob, python_entrypoint

pytestmark = pytest.mark.slow

PI_JOB = "python -m koinon_examples.monte_carlo_pi --tasks 4 --samples 50000"


def _reasons(events: list[dict[str, object]]) -> list[str]:
    return [str(e["reason"]) for e in events]


def test_job_runs_to_success_with_status_conditions_and_events(
    control_plane: ControlPlane, namespace: str, operator: object
) -> None:
    control_plane.apply(aijob("pi", namespace, PI_JOB, resources={"gpus": 1}))
    done = control_plane.wait_phase("pi", namespace, "Succeeded")
    status = done["status"]
    assert status["attempts"] == 1
    # The attempt's id, with its nonce keyed by the Secret the operator made at its start (the
    # Lease's namespace: default, outside a pod), not to be guessed before it is submitted.
    uid = done["metadata"]["uid"]
    secret = json.loads(control_plane.kubectl("get", "secret", SUBMISSION_KEY_SECRET, "-n", "default", "-o", "json"))
    key = base64.b64decode(secret["data"]["key"])
    assert len(key) == 32
    assert status["submissionId"] == f"koinon-{uid}-1-{keyed_submission_nonce(key)(uid, 1)}"
    # What it submitted, as Ray echoes it back, matched the digest the placing write recorded.
    assert len(status["scheduling"]["submissionDigests"]) == 1
    assert "SubmissionConflict" not in _reasons(control_plane.events("pi", namespace))
    assert status["assignedNodes"][0].startswith(("volunteer-1-", "volunteer-2-"))
    assert '"pi": 3.1' in status["result"].get("value", ""), status["result"]
    assert status["result"]["digest"].startswith("sha256:")
    assert re.fullmatch(r"[0-9a-f]{32}", status["traceId"])
    assert status["observedGeneration"] == done["metadata"]["generation"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["status"] == "True"
    assert conditions["Scheduled"]["status"] == "True"
    assert status["startTime"] <= status["completionTime"]
    reasons = _reasons(control_plane.events("pi", namespace))
    for expected in ("Accepted", "Scheduled", "Submitted", "Completed"):
        assert expected in reasons
    # The driver ran on the assigned volunteer, not on the head (which has no CPUs).
    ray_job = control_plane.ray_job(status["submissionId"])
    assert ray_job["status"] == "SUCCEEDED"
    assert ray_job["driver_node_id"] == status["rayNodeIds"][0]
    table = control_plane.kubectl("get", "aij", "-n", namespace)
    assert re.search(r"pi\s+Succeeded\s+1\s+1\s+1", table), table


def ready_volunteer_nodes(control_plane: ControlPlane, timeout: float = 30) -> list[dict[str, Any]]:
    """The VolunteerNodes once every volunteer the control plane runs shows Ready: `up` returns when
    their Ray nodes are alive, and the gateway writes Ready a moment later (a test that ran first in
    its module on a fresh control plane found none Ready)."""
    expected = len(control_plane.cluster.agents)
    deadline = time.monotonic() + timeout
    while True:
        nodes = json.loads(control_plane.kubectl("get", "volunteernodes", "-o", "json"))["items"]
        ready = [n for n in nodes if (n.get("status") or {}).get("phase") == "Ready"]
        if len(ready) >= expected or time.monotonic() > deadline:
            assert len(ready) >= expected, f"{len(ready)} of {expected} volunteers Ready after {timeout:.0f}s"
            return ready
        time.sleep(0.5)


def test_finished_jobs_give_their_gpus_back(control_plane: ControlPlane, namespace: str, operator: object) -> None:
    # Each job takes every GPU of the largest volunteers; the second can run only once the first,
    # finished, no longer counts against them (it used to stay booked in the operator's index).
    ready = ready_volunteer_nodes(control_plane)
    most = max(len(n["spec"]["gpus"]) for n in ready)
    largest = sum(1 for n in ready if len(n["spec"]["gpus"]) == most)
    for name in ("first", "second"):
        control_plane.apply(aijob(name, namespace, PI_JOB, resources={"gpus": most}, replicas=largest))
        done = control_plane.wait_phase(name, namespace, "Succeeded")
        assert done["status"]["attempts"] == 1


@pytest.mark.parametrize(
    ("spec_change", "field_in_error"),
    [
        ({"replicas": "two"}, "spec.replicas"),
        ({"entrypoint": None}, "spec.entrypoint"),
        ({"resources": {"gpus": -1}}, "spec.resources.gpus"),
        ({"colour": "blue"}, "colour"),
        ({"verification": {"mode": "trust-me"}}, "spec.verification.mode"),
    ],
)
def test_invalid_spec_is_rejected_by_the_api_naming_the_field(
    control_plane: ControlPlane, namespace: str, spec_change: dict[str, object], field_in_error: str
) -> None:
    document = aijob("bad", namespace, "python -c pass")
    document["spec"].update(spec_change)
    document["spec"] = {k: v for k, v in document["spec"].items() if v is not None}
    import yaml

    result = control_plane.kubectl_result("apply", "-f", "-", input_text=yaml.safe_dump(document))
    assert result.returncode != 0
    assert field_in_error in result.stderr, result.stderr
    missing = control_plane.kubectl_result("get", "aijob", "bad", "-n", namespace)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


def test_unsatisfiable_job_waits_with_reason_and_runs_when_capacity_appears(
    control_plane: ControlPlane, namespace: str, operator: object
) -> None:
    control_plane.apply(aijob("big", namespace, PI_JOB, resources={"gpus": 4}))
    pending = control_plane.wait_for(
        "big", namespace, lambda o: o.get("status", {}).get("reason") == "Unschedulable", timeout=60
    )
    assert pending["status"]["phase"] == "Pending"
    assert "0/2 nodes are available: 2 too few GPUs (need 4)" in pending["status"]["message"]
    scheduled = {c["type"]: c for c in pending["status"]["conditions"]}["Scheduled"]
    assert scheduled["status"] == "False" and scheduled["reason"] == "Unschedulable"
    assert "Unschedulable" in _reasons(control_plane.events("big", namespace))

    control_plane.cluster.add_volunteer("volunteer-big", gpus=4)
    done = control_plane.wait_phase("big", namespace, "Succeeded", timeout=120)
    assert [n.rsplit("-", 1)[0] for n in done["status"]["assignedNodes"]] == ["volunteer-big"]


def test_failing_job_is_retried_up_to_backoff_limit_then_failed_with_log_tail(
    control_plane: ControlPlane, namespace: str, operator: object
) -> None:
    failing = python_entrypoint("import sys; print('model exploded: marker-7731'); sys.exit(3)")
    control_plane.apply(aijob("boom", namespace, failing, resources={"gpus": 1}, backoffLimit=1))
    failed = control_plane.wait_phase("boom", namespace, "Failed", timeout=120)
    status = failed["status"]
    assert status["attempts"] == 2
    assert status["failures"] == 2
    assert status["reason"] == "BackoffLimitExceeded"
    assert "marker-7731" in status["message"]
    uid = failed["metadata"]["uid"]
    submissions = sorted(j["submission_id"] for j in control_plane.ray_jobs() if uid in (j["submission_id"] or ""))
    assert [re.sub(r"-[0-9a-f]{16}$", "", s) for s in submissions] == [f"koinon-{uid}-1", f"koinon-{uid}-2"]
    reasons = _reasons(control_plane.events("boom", namespace))
    assert reasons.count("RayJobFailed") == 1 and "BackoffLimitExceeded" in reasons


def test_volunteers_joined_through_the_gateway_show_ready_with_latency_and_address(
    control_plane: ControlPlane, namespace: str, operator: object
) -> None:
    import json
    import time

    deadline = time.monotonic() + 30
    nodes: dict[str, Any] = {}
    while time.monotonic() < deadline:
        listed = json.loads(control_plane.kubectl("get", "vn", "-o", "json"))
        nodes = {item["metadata"]["name"].rsplit("-", 1)[0]: item for item in listed["items"]}
        if all(nodes.get(n, {}).get("status", {}).get("phase") == "Ready" for n in ("volunteer-1", "volunteer-2")):
            break
        time.sleep(0.5)
    first = nodes["volunteer-1"]
    status = first["status"]
    assert status["phase"] == "Ready" and status["connected"] is True, status
    assert first["metadata"]["annotations"]["koinon.dev/connection-owner"] == "gateway"
    assert first["spec"]["owner"] == "owner-1" and len(first["spec"]["gpus"]) == 2
    assert status["latency"]["smoothedMs"] > 0
    assert re.fullmatch(r"127\.\d+\.\d+\.\d+", status["address"])
    assert len(str(status["rayNodeId"])) == 56
    table = control_plane.kubectl("get", "vn")
    assert re.search(r"volunteer-1-\w+\s+owner-1\s+local\s+Ready", table), table
    # The gateway's /metrics, where `dev up` says (and `dev status` records) it is, for SREs.
    import urllib.request

    url = control_plane.info.gateway_metrics_url
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), url
    metrics = urllib.request.urlopen(url, timeout=10).read().decode()
    connected = re.search(r"^koinon_gateway_sessions_connected (\d+)$", metrics, re.M)
    assert connected is not None and int(connected.group(1)) >= 2, metrics[:1000]


def test_ray_refuses_requests_without_the_cluster_token(control_plane: ControlPlane) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{control_plane.info.ray_dashboard_url}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    assert isinstance(control_plane.ray_jobs(), list)  # with the token it answers


def test_the_heads_temporary_sockets_live_in_the_work_dir(control_plane: ControlPlane) -> None:
    """Ray's dashboard starts multiprocessing helpers whose listener sockets go to $TMPDIR: under
    the work dir, `down` removes them; in the host's /tmp they were left behind by every run."""
    work_dir = control_plane.info.work_dir
    assert work_dir is not None
    listeners = [
        line.split()[-1] for line in Path("/proc/net/unix").read_text().splitlines()[1:] if "/pymp-" in line.split()[-1]
    ]
    assert [path for path in listeners if path.startswith(f"{work_dir}/")], listeners  # the dashboard's
