"""Failures around the driver that Ray reports by error type: a runtime_env that fails to set up is
the spec's until another node sets up the same spec (then the nodes that failed it are charged),
and nodes that failed it are tried last, as are nodes blamed for a failed attempt; a supervisor that
failed to start for another reason than the spec (a GCS timeout) is retried, not a rejection."""

from __future__ import annotations

from typing import Any

from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import AIJobReconciler, copy_submission_id_from, submission_id_for
from koinon_operator.reputation_book import updated_status
from koinon_operator.scheduler import DEFAULT_CONFIG

from .fake_ray import UID, Clock, FakeRay, make_body, make_reconciler, step
from .test_verification_rounds import GOOD, CopiesRay, reconciler, volunteers


async def _submit_all(
    rec: AIJobReconciler, ray: CopiesRay, clock: Clock, body: dict[str, Any], vols: dict[str, dict[str, Any]]
) -> tuple[list[str], list[str]]:
    for _ in range(10):
        await step(rec, body, vols)
        clock.advance(40)
        status = body["status"]
        nodes = status.get("assignedNodes") or []
        ids = [copy_submission_id_from(status.get("submissionId"), k) or "" for k in range(len(nodes))]
        if nodes and all(i in ray.jobs for i in ids):
            return nodes, ids
    raise AssertionError(body["status"])


async def test_a_copy_whose_node_cannot_set_up_the_env_the_others_set_up_is_charged() -> None:
    """Three copies, same runtime_env: two set it up and agree, the third's node fails the setup
    (its runtime-env agent is the volunteer's own process; a liar can fail it at will). The env
    was fine, so the node is at fault: it must be charged, as any other failed copy is."""
    ray, clock = CopiesRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec = reconciler(ray, clock)
    vols = volunteers(ray.present)
    body = make_body({"entrypoint": "python x.py", "verification": {"mode": "replicated", "quorum": 3}})
    nodes, ids = await _submit_all(rec, ray, clock, body, vols)
    assert len(nodes) == 3, body["status"]
    bad = nodes[2]
    for node, sid in zip(nodes, ids, strict=True):
        if node == bad:
            ray.set_state(sid, RayJobState.FAILED, message="runtime_env setup failed: ...",
                          error_type="RUNTIME_ENV_SETUP_FAILURE")  # fmt: skip
        else:
            ray.logs_by_id[sid] = GOOD
            ray.set_state(sid, RayJobState.SUCCEEDED)
    outcome = await step(rec, body, vols)
    assert body["status"]["reason"] == "Verified", body["status"]
    assert (bad, "failure") in outcome.reputation, outcome.reputation


async def first_node_always_fails(
    error_type: str, message: str
) -> tuple[dict[str, Any], list[str], list[tuple[str, str]]]:
    """A single-copy job (backoffLimit 2) on two nodes: every attempt on the node of the first one
    ends FAILED with ``error_type`` and ``message``, an attempt on the other node succeeds. The
    job's body, the node of each attempt, and the failures charged."""
    ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
    rec = reconciler(ray, clock)
    vols = volunteers(ray.present)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 2})
    used: list[str] = []
    charged: list[tuple[str, str]] = []
    for _ in range(3):
        nodes, ids = await _submit_all(rec, ray, clock, body, vols)
        used.append(nodes[0])
        if nodes[0] == used[0]:
            ray.set_state(ids[0], RayJobState.FAILED, message=message, error_type=error_type)
        else:
            ray.logs_by_id[ids[0]] = GOOD
            ray.set_state(ids[0], RayJobState.SUCCEEDED)
        charged += [e for e in (await step(rec, body, vols)).reputation if e[1] == "failure"]
        clock.advance(40)
        if body["status"]["phase"] in ("Succeeded", "Failed"):
            break
    return body, used, charged


async def test_a_node_that_fails_every_env_setup_is_tried_last_and_charged_once_another_sets_it_up() -> None:
    """A node whose env setup always fails (broken network, or on purpose) was never charged and
    never passed over: every retry landed on it again and the job failed while another node idled."""
    body, used, charged = await first_node_always_fails("RUNTIME_ENV_SETUP_FAILURE", "runtime_env setup failed")
    assert body["status"]["phase"] == "Succeeded", (used, body["status"]["reason"], body["status"]["message"])
    assert used[1] != used[0]  # the retry went elsewhere first
    assert charged == [(used[0], "failure")]  # once the other node set the same spec up


async def test_a_transient_supervisor_start_failure_is_not_a_permanent_rejection() -> None:
    """Ray 2.60 job_manager.submit_job marks JOB_SUPERVISOR_ACTOR_START_FAILURE for any exception
    while creating the supervisor: ray.get_actor's name check and the synchronous RegisterActor
    of a detached actor both raise on a GCS timeout (not a ValueError). _monitor_job marks the same
    type for "failed to get job supervisor" after a dashboard restart. Neither is the spec's doing,
    yet the job is now Failed at once, backoffLimit unused."""
    ray, clock = FakeRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 3})
    await step(rec, body)
    await step(rec, body)
    ray.set_state(
        submission_id_for(UID, 1), RayJobState.FAILED,
        message="Failed to start supervisor actor x: 'Failed to register actor: GCS timed out'. Full traceback:\n...",
        error_type="JOB_SUPERVISOR_ACTOR_START_FAILURE",
    )  # fmt: skip
    await step(rec, body)
    assert body["status"]["phase"] != "Failed", (body["status"]["reason"], body["status"]["message"])


async def test_an_env_that_fails_everywhere_charges_nobody_and_a_one_node_fleet_still_ends() -> None:
    """A pip typo fails on every node alike: no volunteer pays, and with one node the retries still
    go to it (tried last is not left out), so the job ends with Ray's reason instead of Pending."""
    ray, clock = CopiesRay(["vn-a"]), Clock()
    rec = reconciler(ray, clock)
    vols = volunteers(ray.present)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 1})
    charged: list[tuple[str, str]] = []
    for _ in range(2):
        nodes, ids = await _submit_all(rec, ray, clock, body, vols)
        assert nodes == ["vn-a"]
        ray.set_state(ids[0], RayJobState.FAILED, message="runtime_env setup failed: no such package",
                      error_type="RUNTIME_ENV_SETUP_FAILURE")  # fmt: skip
        charged += (await step(rec, body, vols)).reputation
        clock.advance(40)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert "no such package" in body["status"]["message"]
    assert charged == []


async def test_one_env_setup_failure_is_charged_once() -> None:
    """A copy that failed to set up the env, in an attempt another copy failed for the volunteer's
    reasons, was charged at once (every assigned node was) and again once a later attempt set the
    spec up elsewhere."""
    ray, clock = CopiesRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec = reconciler(ray, clock)
    vols = volunteers(ray.present)
    body = make_body(
        {"entrypoint": "python x.py", "backoffLimit": 3, "verification": {"mode": "replicated", "quorum": 2}}
    )
    nodes, ids = await _submit_all(rec, ray, clock, body, vols)
    assert len(nodes) == 2, body["status"]
    env_node = nodes[0]
    ray.set_state(
        ids[0], RayJobState.FAILED, message="runtime_env setup failed", error_type="RUNTIME_ENV_SETUP_FAILURE"
    )
    ray.set_state(ids[1], RayJobState.FAILED, message="raylet died")  # the volunteer's failure, no exit code
    charges = [e for e in (await step(rec, body, vols)).reputation if e == (env_node, "failure")]
    assert body["status"]["reason"] == "BackOff", body["status"]
    clock.advance(40)
    nodes2, ids2 = await _submit_all(rec, ray, clock, body, vols)
    assert env_node not in nodes2, nodes2  # tried last
    for sid in ids2:
        ray.logs_by_id[sid] = GOOD
        ray.set_state(sid, RayJobState.SUCCEEDED)
    charges += [e for e in (await step(rec, body, vols)).reputation if e == (env_node, "failure")]
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert len(charges) == 1, charges


# A long clean record: the scheduler ranks this node first for every placement.
GOOD_HISTORY = {"successes": 40.0, "heartbeatsSeen": 500.0, "lastUpdated": "2026-01-01T00:00:00Z"}


def _vn_a_first(backoff_limit: int) -> tuple[Clock, CopiesRay, dict[str, dict[str, Any]], dict[str, Any]]:
    """Nodes vn-a (with GOOD_HISTORY, the scheduler's first choice) and vn-c, and a job."""
    clock = Clock()
    ray = CopiesRay(["vn-a", "vn-c"])
    vols = volunteers(ray.present)
    vols["vn-a"]["status"]["reputation"] = dict(GOOD_HISTORY)
    return clock, ray, vols, make_body({"entrypoint": "python x.py", "backoffLimit": backoff_limit})


async def test_a_node_blamed_for_a_failed_attempt_is_tried_last_on_the_retry() -> None:
    """A node whose Ray job failed for the volunteer's reasons (no exit code of the job's own) was
    charged a failure but placed again: with a good history it stayed the scheduler's first choice,
    took every retry and the job failed BackoffLimitExceeded while another node idled (the
    scheduler's own on_job_failed keeps a broken machine from eating all attempts)."""
    clock, ray, vols, body = _vn_a_first(backoff_limit=2)
    rec = reconciler(ray, clock)
    used: list[str] = []
    for _ in range(3):
        nodes, ids = await _submit_all(rec, ray, clock, body, vols)
        used.append(nodes[0])
        ray.set_state(ids[0], RayJobState.FAILED, message="raylet died")  # the node's fault, no exit code
        outcome = await step(rec, body, vols)
        # the operator's reputation book applies the evidence before the next pass
        for node, kind in outcome.reputation:
            fields = updated_status(
                vols[node]["status"], kind, clock.now.timestamp(), DEFAULT_CONFIG.reputation, str(len(used))
            )
            vols[node]["status"].update(fields or {})
        clock.advance(40)
        if body["status"]["phase"] == "Failed":
            break
    assert used[:2] == ["vn-a", "vn-c"], (used, body["status"]["reason"])
    # Both failed once: neither is left out, so the last retry still runs (on either).
    assert len(used) == 3 and body["status"]["reason"] == "BackoffLimitExceeded", (used, body["status"])


async def test_a_blamed_node_is_still_tried_last_after_an_operator_restart() -> None:
    """Kept in status.scheduling.failedNodes: a new operator process (or leader) reads it there."""
    clock, ray, vols, body = _vn_a_first(backoff_limit=2)
    nodes, ids = await _submit_all(reconciler(ray, clock), ray, clock, body, vols)
    assert nodes == ["vn-a"]
    ray.set_state(ids[0], RayJobState.FAILED, message="raylet died")
    await step(reconciler(ray, clock), body, vols)
    assert body["status"]["reason"] == "BackOff" and body["status"]["scheduling"]["failedNodes"] == ["vn-a"]
    clock.advance(40)
    nodes, _ = await _submit_all(reconciler(ray, clock), ray, clock, body, vols)  # a restarted operator
    assert nodes == ["vn-c"], body["status"]
    # Placing the retry keeps the record for the retries after it.
    assert body["status"]["scheduling"]["failedNodes"] == ["vn-a"]


async def test_a_job_that_fails_on_its_own_does_not_pass_over_its_node() -> None:
    """A non-zero exit code is the job's failure, not the node's: the node is neither charged nor
    tried last (another node would fail the job's code alike)."""
    clock, ray, vols, body = _vn_a_first(backoff_limit=1)
    rec = reconciler(ray, clock)
    for _ in range(2):
        nodes, ids = await _submit_all(rec, ray, clock, body, vols)
        assert nodes == ["vn-a"], body["status"]
        ray.set_state(ids[0], RayJobState.FAILED, exit_code=1, message="exit 1")
        await step(rec, body, vols)
        clock.advance(40)
    assert body["status"]["reason"] == "BackoffLimitExceeded"
    assert not body["status"]["scheduling"].get("failedNodes")


async def test_a_one_node_fleet_still_retries_on_its_blamed_node() -> None:
    """Tried last, not left out: with no other node the retries run there, and the job ends."""
    clock = Clock()
    ray = CopiesRay(["vn-a"])
    rec = reconciler(ray, clock)
    vols = volunteers(ray.present)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 1})
    for _ in range(2):
        nodes, ids = await _submit_all(rec, ray, clock, body, vols)
        assert nodes == ["vn-a"], body["status"]
        ray.set_state(ids[0], RayJobState.FAILED, message="raylet died")
        await step(rec, body, vols)
        clock.advance(40)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "BackoffLimitExceeded")
