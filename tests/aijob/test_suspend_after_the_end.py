"""A suspend stops running work; it never throws away work that has ended. An attempt whose Ray
copies all ended on their own before the operator saw spec.suspend (or whose copies that ended
already decide the vote) is concluded as it would be without the suspend (a Kubernetes Job that
completed stays Complete); only an attempt still running is stopped and run again on resume.

Reconciler passes against a fake Ray Job API (tests/aijob/fake_ray.py)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import AIJobReconciler, NodeWork, Outcome, submission_id_for

from .fake_ray import UID, Clock, FakeRay, make_body, make_reconciler, step
from .test_decided_vote import StampingRay, _two_agree_one_runs, answered, started, submit_all
from .test_verification_rounds import FORGED, GOOD, reconciler, replicated_job, volunteers


async def _suspend_and_resume(
    rec: AIJobReconciler, clock: Clock, body: dict[str, Any], vols: dict[str, dict[str, Any]] | None
) -> Outcome:
    """spec.suspend, one pass, spec.suspend false again, four more passes; the suspend's outcome."""
    body["spec"]["suspend"] = True
    body["metadata"]["generation"] += 1
    suspended = await step(rec, body, vols)
    body["spec"]["suspend"] = False
    body["metadata"]["generation"] += 1
    for _ in range(4):
        clock.advance(40)
        await step(rec, body, vols)
    return suspended


async def test_suspend_after_every_copy_succeeded_does_not_throw_the_results_away() -> None:
    clock = Clock()
    ray = StampingRay(["vn-a", "vn-c"], clock)
    rec, body = reconciler(ray, clock), replicated_job(quorum=2)
    ids = await submit_all(rec, ray, clock, body)
    started(ray, clock, ids)
    clock.advance(300)
    for sid in ids:
        answered(ray, clock, sid, GOOD)
    clock.advance(40)
    suspended = await _suspend_and_resume(rec, clock, body, volunteers(ray.present))
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Verified"), status["message"]
    assert len(ray.submissions) == 2 and ray.stopped == []  # ran once
    assert sorted(suspended.reputation) == [("vn-a", "agreement"), ("vn-c", "agreement")]
    assert suspended.work == {"vn-a": NodeWork(300 / 3600, 300.0), "vn-c": NodeWork(300 / 3600, 300.0)}
    assert "Suspended" not in [e.reason for e in suspended.events]


async def test_suspend_after_an_unverified_job_succeeded_keeps_its_result() -> None:
    ray, clock = FakeRay(), Clock()
    rec, body = make_reconciler(ray, clock), make_body({"entrypoint": "python x.py"})
    await step(rec, body)  # placed
    await step(rec, body)  # submitted
    ray.set_state(submission_id_for(UID, 1), RayJobState.SUCCEEDED, exit_code=0)
    clock.advance(10)
    suspended = await _suspend_and_resume(rec, clock, body, None)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Succeeded", "Completed")
    assert body["status"]["result"]["value"] == "42" and len(ray.submissions) == 1
    assert suspended.reputation == [("vn-1", "success")]


async def test_suspend_after_an_attempt_failed_on_its_own_counts_the_failure() -> None:
    """As a Kubernetes Job's failed Pod counts against backoffLimit whatever comes after it: the
    failure is not forgotten (and the attempt rerun uncounted) because a suspend followed it."""
    ray, clock = FakeRay(), Clock()
    rec, body = make_reconciler(ray, clock), make_body({"entrypoint": "python x.py", "backoffLimit": 2})
    await step(rec, body)
    await step(rec, body)
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message="exit code 1")
    clock.advance(10)
    body["spec"]["suspend"] = True
    outcome = await step(rec, body)
    assert (body["status"]["phase"], body["status"]["failures"]) == ("Suspended", 1)
    assert [e.reason for e in outcome.events] == ["RayJobFailed", "Suspended"]
    assert body["status"]["assignedNodes"] == [] and body["status"].get("submissionId") is None


async def test_suspend_waits_a_pass_for_the_log_of_a_copy_that_just_succeeded() -> None:
    """Ray says SUCCEEDED before the driver's log is flushed: the suspend pass neither concludes
    without the result nor suspends (which would throw it away); the next pass concludes."""
    ray, clock = FakeRay(logs_text="starting\n"), Clock()
    rec, body = make_reconciler(ray, clock), make_body({"entrypoint": "python x.py"})
    await step(rec, body)
    await step(rec, body)
    sid = submission_id_for(UID, 1)
    ray.set_state(sid, RayJobState.SUCCEEDED, exit_code=0)
    ray.jobs[sid] = replace(ray.jobs[sid], end_time_ms=int(clock.now.timestamp() * 1000))  # just now
    body["spec"]["suspend"] = True
    await step(rec, body)
    assert body["status"]["phase"] == "Scheduled" and ray.stopped == []
    ray.logs_text = "starting\nKOINON_RESULT 7\n"
    clock.advance(10)
    await step(rec, body)
    assert (body["status"]["phase"], body["status"]["result"]["value"]) == ("Succeeded", "7")


async def test_suspend_of_a_decided_vote_concludes_it_and_stops_the_copy_left() -> None:
    clock = Clock()
    rec, ray, body, ids = await _two_agree_one_runs(clock)
    body["spec"]["suspend"] = True
    outcome = await step(rec, body, volunteers(ray.present))
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Succeeded", "Verified")
    assert ray.stopped == [ids[2]] and sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-c", "agreement")]


async def test_suspend_while_copies_run_stops_them_and_judges_nobody() -> None:
    """alice's copy answered, carol's still runs: one answer decides nothing. The suspend stops the
    attempt as a whole (it is judged only as a whole); nobody is credited or charged for it, each
    node's work up to the stop is counted, and on resume both copies run again."""
    clock = Clock()
    ray = StampingRay(["vn-a", "vn-c"], clock)
    rec, body = reconciler(ray, clock), replicated_job(quorum=2)
    ids = await submit_all(rec, ray, clock, body)
    started(ray, clock, ids)
    clock.advance(120)
    answered(ray, clock, ids[0], FORGED)
    clock.advance(60)
    body["spec"]["suspend"] = True
    outcome = await step(rec, body, volunteers(ray.present))
    assert body["status"]["phase"] == "Suspended" and ray.stopped == ids
    assert outcome.reputation == []
    assert outcome.work == {"vn-a": NodeWork(120 / 3600, 120.0), "vn-c": NodeWork(180 / 3600, 180.0)}
    body["spec"]["suspend"] = False
    for _ in range(4):
        clock.advance(40)
        await step(rec, body, volunteers(ray.present))
    assert body["status"]["attempts"] == 2 and len(ray.submissions) == 4
    assert "earlierResults" not in (body["status"].get("verification") or {})


async def _running_with_a_deadline() -> tuple[FakeRay, Clock, AIJobReconciler, dict[str, Any], str]:
    """A job with activeDeadlineSeconds=60 seen Running (its startTime in status)."""
    ray, clock = FakeRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "activeDeadlineSeconds": 60})
    await step(rec, body)  # placed
    await step(rec, body)  # submitted
    sid = submission_id_for(UID, 1)
    ray.set_state(sid, RayJobState.RUNNING)
    await step(rec, body)
    assert body["status"]["phase"] == "Running" and body["status"].get("startTime")
    return ray, clock, rec, body, sid


async def _ended_past_its_deadline() -> tuple[FakeRay, Clock, AIJobReconciler, dict[str, Any]]:
    ray, clock, rec, body, sid = await _running_with_a_deadline()
    clock.advance(300)  # the operator was down (or slow) meanwhile; the job overran by 4 minutes
    ray.set_state(sid, RayJobState.SUCCEEDED, exit_code=0)
    ray.jobs[sid] = replace(ray.jobs[sid], end_time_ms=int(clock.now.timestamp() * 1000))
    clock.advance(30)
    return ray, clock, rec, body


async def test_a_suspend_concludes_an_attempt_that_ended_past_its_deadline_as_without_it() -> None:
    """It ended after activeDeadlineSeconds: without the suspend it fails DeadlineExceeded; with
    it, it was concluded first and Succeeded with the result of a run that overran."""
    _, _, rec, body = await _ended_past_its_deadline()
    plain = copy.deepcopy(body)
    await step(rec, plain)
    assert (plain["status"]["phase"], plain["status"]["reason"]) == ("Failed", "DeadlineExceeded")

    _, _, rec2, body2 = await _ended_past_its_deadline()
    body2["spec"]["suspend"] = True
    body2["metadata"]["generation"] += 1
    await step(rec2, body2)
    assert (body2["status"]["phase"], body2["status"]["reason"]) == ("Failed", "DeadlineExceeded"), (
        body2["status"]["phase"],
        body2["status"]["reason"],
    )


async def test_a_suspend_whose_status_write_was_lost_is_not_turned_into_deadline_exceeded() -> None:
    """A suspend first seen while the attempt runs past its deadline suspends it (the deadline
    starts over). When that pass's status write is lost, the retry finds the copy STOPPED by the
    suspend itself, past the deadline: it failed the job DeadlineExceeded."""
    ray, clock, rec, body, sid = await _running_with_a_deadline()
    clock.advance(70)  # past the deadline, still running; the suspend arrives before a pass saw it
    body["spec"]["suspend"] = True
    body["metadata"]["generation"] += 1
    before = copy.deepcopy(body)
    await step(rec, body)
    assert body["status"]["phase"] == "Suspended" and sid in ray.stopped
    # Ray records the stop's time as the job's end (the fake stamps 1 ms after the epoch).
    ray.jobs[sid] = replace(ray.jobs[sid], end_time_ms=int(clock.now.timestamp() * 1000))
    # The status write of that pass is lost: the API server still has the Running status.
    body = before
    rec.discard_write("ns/j")
    clock.advance(5)
    await step(rec, body)
    assert (body["status"]["phase"], body["status"].get("reason")) == ("Suspended", "Suspended"), (
        body["status"]["phase"],
        body["status"].get("reason"),
    )


async def test_a_suspend_past_the_deadline_of_a_job_whose_start_ray_alone_recorded() -> None:
    """Ended past its deadline while the operator was down (no startTime in status yet): without
    the suspend the start is taken from Ray and it fails DeadlineExceeded; with it, it Succeeded."""
    ray, clock = FakeRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "activeDeadlineSeconds": 60})
    await step(rec, body)  # placed
    await step(rec, body)  # submitted: phase Scheduled, no startTime
    sid = submission_id_for(UID, 1)
    assert body["status"]["phase"] == "Scheduled" and not body["status"].get("startTime")
    start_ms = int(clock.now.timestamp() * 1000)
    ray.set_state(sid, RayJobState.SUCCEEDED, exit_code=0)
    clock.advance(300)
    ray.jobs[sid] = replace(ray.jobs[sid], start_time_ms=start_ms, end_time_ms=int(clock.now.timestamp() * 1000))
    clock.advance(30)
    plain = copy.deepcopy(body)
    rec_plain = make_reconciler(ray, clock)
    await step(rec_plain, plain)
    assert (plain["status"]["phase"], plain["status"].get("reason")) == ("Failed", "DeadlineExceeded")
    body["spec"]["suspend"] = True
    body["metadata"]["generation"] += 1
    await step(rec, body)
    assert (body["status"]["phase"], body["status"].get("reason")) == ("Failed", "DeadlineExceeded"), (
        body["status"]["phase"],
        body["status"].get("reason"),
    )
