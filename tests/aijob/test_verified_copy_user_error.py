"""In a replicated job, a copy whose driver exited with its own non-zero code (the job's fault, by the
rule _attempt_failed applies to unreplicated jobs) is not charged to its volunteer when the other
copies reach a majority (it was charged a failure)."""

from __future__ import annotations

from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import copy_submission_id_from

from .fake_ray import Clock, step
from .test_verification_rounds import GOOD, CopiesRay, reconciler, replicated_job, volunteers


async def test_a_copy_that_exits_on_its_own_is_not_charged_to_its_volunteer() -> None:
    ray, clock = CopiesRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    vols = volunteers(ray.present)
    for _ in range(10):
        await step(rec, body, vols)
        clock.advance(40)
        status = body["status"]
        nodes = status.get("assignedNodes") or []
        ids = [copy_submission_id_from(status.get("submissionId"), k) for k in range(len(nodes))]
        if nodes and all(i in ray.jobs for i in ids):
            break
    crashed = nodes[-1]
    for node, submission in zip(nodes, ids, strict=True):
        assert submission is not None
        if node == crashed:
            ray.set_state(submission, RayJobState.FAILED, exit_code=1, message="Traceback: user bug")
        else:
            ray.logs_by_id[submission] = GOOD
            ray.set_state(submission, RayJobState.SUCCEEDED)
    outcome = await step(rec, body, vols)
    assert body["status"]["reason"] == "Verified"
    assert (crashed, "failure") not in outcome.reputation, outcome.reputation
