"""Reputation, verification and failover through the whole stack: tunnelled volunteers, the kopf
operator with the reputation scheduler, real Ray jobs."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.aijob.conftest import ControlPlane, aijob, python_entrypoint

pytestmark = pytest.mark.slow

# Every honest copy computes the same value; a node started with KOINON_TEST_CORRUPT_RESULT set
# (in the environment its Ray node passes to job drivers) returns a wrong one, as a cheating
# volunteer would.
DIGEST_JOB = python_entrypoint(
    "import os, hashlib; value = hashlib.sha256(b'koinon').hexdigest()[:12]; "
    "value = ('forged-' + value) if os.environ.get('KOINON_TEST_CORRUPT_RESULT') else value; "
    "print('KOINON_RESULT', value)"
)

# The same, with every honest copy answering 5 s after the liar's: the liar's wrong answer is
# always in when the vote is decided. Otherwise two honest answers decide it first now and then (a
# freshly joined liar's worker starts slowest), and the liar's copy is stopped unjudged.
LIAR_ANSWERS_FIRST_JOB = python_entrypoint(
    "import os, time, hashlib; corrupt = os.environ.get('KOINON_TEST_CORRUPT_RESULT'); "
    "time.sleep(0 if corrupt else 5); value = hashlib.sha256(b'koinon').hexdigest()[:12]; "
    "value = ('forged-' + value) if corrupt else value; "
    "print('KOINON_RESULT', value)"
)


def _volunteers(control_plane: ControlPlane) -> dict[str, dict[str, Any]]:
    listed = json.loads(control_plane.kubectl("get", "vn", "-o", "json"))
    return {item["metadata"]["name"]: item for item in listed["items"]}


def _node_named(control_plane: ControlPlane, prefix: str) -> str:
    return next(name for name in _volunteers(control_plane) if name.rsplit("-", 1)[0] == prefix)


def test_a_lying_volunteer_loses_reputation_and_stops_getting_verified_work(
    control_plane: ControlPlane, namespace: str, operator: object
) -> None:
    control_plane.cluster.add_volunteer("liar", gpus=2, owner="owner-3",
                                        extra_env={"KOINON_TEST_CORRUPT_RESULT": "1"})  # fmt: skip
    liar = _node_named(control_plane, "liar")
    verified = {"mode": "replicated", "quorum": 3}
    control_plane.apply(
        aijob("checked", namespace, LIAR_ANSWERS_FIRST_JOB, resources={"gpus": 1}, verification=verified)
    )
    done = control_plane.wait_phase("checked", namespace, "Succeeded", timeout=120)
    status = done["status"]
    assert status["reason"] == "Verified"
    assert status["verification"]["disagreeing"] == [liar]
    assert len(status["verification"]["agreeing"]) == 2
    assert not status["result"]["value"].startswith("forged")
    assert "ResultDisagreement" in [e["reason"] for e in control_plane.events("checked", namespace)]

    def evidence() -> dict[str, dict[str, Any]]:
        return {name: vn.get("status", {}).get("reputation", {}) for name, vn in _volunteers(control_plane).items()}

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not evidence().get(liar, {}).get("disagreements"):
        time.sleep(0.5)
    reputation = evidence()
    assert reputation[liar]["disagreements"] >= 1
    honest = [name for name in reputation if name != liar and name in status["verification"]["agreeing"]]
    assert all(reputation[name]["agreements"] >= 1 for name in honest)
    assert all(reputation[liar]["score"] < reputation[name]["score"] for name in honest)

    # With the liar quarantined, a job that needs three distinct owners cannot be placed any more.
    control_plane.apply(aijob("needs-three", namespace, DIGEST_JOB, resources={"gpus": 1}, verification=verified))
    pending = control_plane.wait_for(
        "needs-three", namespace, lambda o: o.get("status", {}).get("reason") == "Unschedulable", timeout=60
    )
    assert "quarantined" in pending["status"]["message"], pending["status"]["message"]
    # Work that two honest owners can verify still runs, and never on the liar.
    control_plane.apply(aijob("needs-two", namespace, DIGEST_JOB, resources={"gpus": 1},
                              verification={"mode": "replicated", "quorum": 2}))  # fmt: skip
    second = control_plane.wait_phase("needs-two", namespace, "Succeeded", timeout=120)
    assert liar not in second["status"]["assignedNodes"]
    control_plane.kubectl("delete", "aijob", "needs-three", "-n", namespace, "--timeout=60s")


def test_a_volunteer_lost_mid_job_fails_over_without_counting_a_failure(
    control_plane: ControlPlane, namespace: str, operator: object
) -> None:
    # Only volunteers with 4 GPUs fit this job: first the one that will die, later a spare.
    control_plane.cluster.add_volunteer("doomed", gpus=4, owner="owner-doomed")
    doomed = _node_named(control_plane, "doomed")
    # Long enough for the first attempt to be running when its node dies; the attempt that fails
    # over has nothing to wait for (30 s more of suite time).
    sleeper = python_entrypoint(
        "import os, time; time.sleep(30 if os.environ['KOINON_ATTEMPT'] == '1' else 0); print('KOINON_RESULT survived')"
    )
    control_plane.apply(aijob("resilient", namespace, sleeper, resources={"gpus": 3}, backoffLimit=0))
    running = control_plane.wait_phase("resilient", namespace, "Running", timeout=90)
    assert running["status"]["assignedNodes"] == [doomed]

    control_plane.cluster.kill_volunteer("doomed")
    lost = control_plane.wait_for(
        "resilient", namespace, lambda o: o.get("status", {}).get("reason") == "NodeLost", timeout=120
    )
    assert doomed in lost["status"]["scheduling"]["lostNodes"]
    control_plane.cluster.add_volunteer("spare", gpus=4, owner="owner-spare")
    done = control_plane.wait_phase("resilient", namespace, "Succeeded", timeout=150)
    status = done["status"]
    assert status["attempts"] == 2
    assert status["failures"] == 0  # the job itself never failed: backoffLimit=0 was not used up
    assert status["assignedNodes"][0].rsplit("-", 1)[0] == "spare"
    assert "NodeLost" in [e["reason"] for e in control_plane.events("resilient", namespace)]
