"""A node lost mid-attempt is tried last on the next attempts, never left out (a volunteer whose
agent restarted, or whose connection dropped, comes back under the same name), also for a status an
earlier operator wrote with it in excludedNodes; and backoffLimit is checked on every pass of a
waiting job, as a Kubernetes Job's is, not only when an attempt fails.

Reconciler passes against a fake Ray Job API (tests/aijob/fake_ray.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from koinon_operator.api.aijob import AIJobStatus
from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import submission_id_for

from .fake_ray import NODES, UID, Clock, FakeRay, make_body, make_reconciler, step
from .test_ends_seen_late import SUBMISSION, TWO_NODES, TWO_OWNERS, ChangingRay, running


async def _lost_after_an_agent_restart(ray: ChangingRay, clock: Clock, body: dict[str, Any]) -> None:
    """vn-1's agent restarts mid-job: the same name, a new Ray node; the attempt fails over."""
    ray.node_list = [replace(NODES[0], alive=False), replace(NODES[0], node_id="r2")]
    ray.set_state(SUBMISSION, RayJobState.FAILED, message="Job supervisor actor died")
    clock.advance(10)
    await step(make_reconciler(ray, clock), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "NodeLost"), body["status"]


async def _placed_again(ray: ChangingRay, clock: Clock, body: dict[str, Any]) -> dict[str, Any]:
    reconciler = make_reconciler(ray, clock)
    for _ in range(5):
        clock.advance(60)
        await step(reconciler, body)
    status: dict[str, Any] = body["status"]
    return status


async def test_a_job_whose_only_volunteer_reconnected_runs_on_it_again() -> None:
    """One volunteer, back Ready under its name after an agent restart: the job waited for ever
    ("excluded after a failed attempt", with failures 0) while the lost node was left out for good."""
    ray, clock = ChangingRay(), Clock()
    body = await running(ray, clock, {"entrypoint": "python x.py"})
    await _lost_after_an_agent_restart(ray, clock, body)
    assert body["status"]["scheduling"]["lostNodes"] == ["vn-1"]
    status = await _placed_again(ray, clock, body)
    assert status["phase"] in ("Scheduled", "Running"), (status["phase"], status.get("message"))
    assert (status["attempts"], status["failures"], status["assignedNodes"]) == (2, 0, ["vn-1"])
    assert submission_id_for(UID, 2) in ray.jobs
    # Still tried last next time, and nothing is left out.
    assert status["scheduling"]["lostNodes"] == ["vn-1"] and status["scheduling"]["excludedNodes"] == []


async def test_a_lost_node_is_tried_after_the_other_nodes() -> None:
    """vn-a (first in the placer's order) comes back at once, but the retry goes to vn-b first."""
    ray, clock = ChangingRay(node_list=list(TWO_NODES)), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    await step(reconciler, body, TWO_OWNERS)
    await step(reconciler, body, TWO_OWNERS)
    assert body["status"]["assignedNodes"] == ["vn-a"]
    ray.node_list = [replace(TWO_NODES[0], alive=False), replace(TWO_NODES[0], node_id="a2"), TWO_NODES[1]]
    ray.set_state(SUBMISSION, RayJobState.FAILED, message="Job supervisor actor died")
    clock.advance(10)
    await step(reconciler, body, TWO_OWNERS)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "NodeLost"), body["status"]
    clock.advance(10)
    await step(reconciler, body, TWO_OWNERS)
    assert (body["status"]["phase"], body["status"]["assignedNodes"]) == ("Scheduled", ["vn-b"]), body["status"]


async def test_a_job_an_earlier_operator_left_waiting_for_its_lost_node_is_placed_on_it() -> None:
    """After an upgrade: the status has the lost node in excludedNodes, as earlier operators wrote
    it, and the job is stuck Unschedulable. With no rerun for a split vote, every excludedNodes
    entry is a lost node: tried last, so the job runs again, and the status is rewritten so."""
    ray, clock = ChangingRay(), Clock()
    body = await running(ray, clock, {"entrypoint": "python x.py"})
    await _lost_after_an_agent_restart(ray, clock, body)
    scheduling = body["status"]["scheduling"]
    scheduling["excludedNodes"] = scheduling.pop("lostNodes")
    body["status"].update(reason="Unschedulable", message="0/1 nodes are available: 1 excluded after a failed attempt")
    status = await _placed_again(ray, clock, body)
    assert (status["phase"], status["assignedNodes"]) in (("Scheduled", ["vn-1"]), ("Running", ["vn-1"])), status
    assert status["scheduling"]["excludedNodes"] == [] and status["scheduling"]["lostNodes"] == ["vn-1"]


def test_excluded_nodes_after_a_split_vote_stay_left_out() -> None:
    """excludedNodes keeps its meaning where a rerun without a majority wrote it: those nodes'
    answers were outvoted or split, and a rerun needs fresh ones."""
    split = AIJobStatus.from_status(
        {"verificationReruns": 1, "scheduling": {"excludedNodes": ["vn-a"], "lostNodes": ["vn-b"]}}
    )
    assert (split.excluded_nodes, split.lost_nodes) == (("vn-a",), ("vn-b",))
    earlier = AIJobStatus.from_status({"scheduling": {"excludedNodes": ["vn-a"], "lostNodes": ["vn-b", 3]}})
    assert (earlier.excluded_nodes, earlier.lost_nodes) == ((), ("vn-a", "vn-b"))


async def _waiting_to_retry(backoff_limit: int) -> tuple[FakeRay, Clock, dict[str, Any]]:
    """A job whose first attempt failed on its own (failures 1), waiting in BackOff."""
    ray, clock = FakeRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": backoff_limit})
    await step(rec, body)
    await step(rec, body)
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message="boom")
    clock.advance(10)
    await step(rec, body)
    assert (body["status"]["phase"], body["status"]["reason"], body["status"]["failures"]) == ("Pending", "BackOff", 1)
    return ray, clock, body


def _edit_backoff_limit(body: dict[str, Any], limit: int) -> None:
    body["spec"]["backoffLimit"] = limit
    body["metadata"]["generation"] += 1


async def test_lowering_backoff_limit_below_the_failures_so_far_fails_the_waiting_job_at_once() -> None:
    ray, clock, body = await _waiting_to_retry(backoff_limit=2)
    _edit_backoff_limit(body, 0)  # the owner wants no more retries
    clock.advance(10)
    await step(make_reconciler(ray, clock), body)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "BackoffLimitExceeded"), status
    assert "backoffLimit=0" in status["message"]
    assert status["completionTime"]
    assert any(c["type"] == "Failed" and c["status"] == "True" for c in status["conditions"])
    for _ in range(3):
        clock.advance(60)
        await step(make_reconciler(ray, clock), body)
    assert submission_id_for(UID, 2) not in ray.jobs and status["attempts"] == 1


async def test_lowering_backoff_limit_to_the_failures_so_far_leaves_the_last_retry() -> None:
    """failures 1 with backoffLimit 1: one retry is still allowed (the job fails past the limit)."""
    ray, clock, body = await _waiting_to_retry(backoff_limit=2)
    _edit_backoff_limit(body, 1)
    rec = make_reconciler(ray, clock)
    for _ in range(3):
        clock.advance(10)
        await step(rec, body)
    assert submission_id_for(UID, 2) in ray.jobs, body["status"]
    assert body["status"]["phase"] in ("Scheduled", "Running"), body["status"]
