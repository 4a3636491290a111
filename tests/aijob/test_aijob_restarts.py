"""A crash or restart never double-counts or fails a job that did nothing wrong: an attempt the
operator stopped itself (its status write lost), a Ray head that forgot a running job, a pass
replayed after a crash that concludes otherwise, and a deletion racing a submission. And an edit
of a running job, which its running attempt does not run, is said once, also across a restart."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from koinon_emulator.patching import merge_patch
from koinon_emulator.schema import admit
from koinon_operator.ray_jobs import RayJobState, RayNodeInfo, Submission
from koinon_operator.reconciler import allocation_of, submission_id_for
from koinon_operator.reputation_book import outcome_key, updated_status
from koinon_operator.scheduler import DEFAULT_CONFIG

from tests.aijob.fake_ray import NODES, UID, VOLUNTEERS, Clock, FakeRay, make_body, make_reconciler, step
from tests.aijob.test_verification_rounds import CopiesRay, volunteers
from tests.aijob.test_verification_rounds import reconciler as verified_reconciler


async def _running(ray: FakeRay, clock: Clock, spec: dict[str, Any]) -> dict[str, Any]:
    reconciler = make_reconciler(ray, clock)
    body = make_body(spec)
    await step(reconciler, body)  # Pending -> Scheduled (attempt 1)
    await step(reconciler, body)  # submitted
    ray.set_state(submission_id_for(UID, 1), RayJobState.RUNNING)
    await step(reconciler, body)
    assert body["status"]["phase"] == "Running"
    return body


async def test_a_suspend_whose_write_was_lost_then_a_resume_is_not_a_failure() -> None:
    ray, clock = FakeRay(), Clock()
    body = await _running(ray, clock, {"entrypoint": "python x.py", "backoffLimit": 0})
    body["spec"]["suspend"] = True
    body["metadata"]["generation"] = 2
    crashed = await make_reconciler(ray, clock).reconcile(copy.deepcopy(body), {}, VOLUNTEERS)
    assert crashed.status["phase"] == "Suspended"  # computed; the operator dies before it is written
    assert ray.jobs[submission_id_for(UID, 1)].state is RayJobState.STOPPED
    body["spec"]["suspend"] = False  # resumed while the operator was down
    body["metadata"]["generation"] = 3
    clock.advance(10)
    restarted = make_reconciler(ray, clock)
    outcome = await step(restarted, body)
    assert ("vn-1", "failure") not in outcome.reputation
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "RayJobStopped")
    assert body["status"].get("failures", 0) == 0
    await step(restarted, body)  # placed again: a new attempt, a new Ray job
    await step(restarted, body)
    assert body["status"]["attempts"] == 2 and submission_id_for(UID, 2) in ray.jobs


async def test_a_resume_seen_before_the_suspend_write_is_not_a_failure() -> None:
    ray, clock = FakeRay(), Clock()
    body = await _running(ray, clock, {"entrypoint": "python x.py", "backoffLimit": 0})
    reconciler = make_reconciler(ray, clock)
    body["spec"]["suspend"] = True
    body["metadata"].update(generation=2, resourceVersion="10")
    suspend_pass = await reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS)
    resumed = copy.deepcopy(body)
    resumed["spec"]["suspend"] = False
    resumed["metadata"].update(generation=3, resourceVersion="11")
    clock.advance(5)
    lagging_pass = await reconciler.reconcile(copy.deepcopy(resumed), {}, VOLUNTEERS)
    server = merge_patch(merge_patch(resumed["status"], suspend_pass.status), lagging_pass.status)
    assert server.get("failures", 0) == 0 and server["phase"] == "Pending"


async def test_a_ray_head_restart_neither_fails_a_running_job_nor_blames_its_volunteer() -> None:
    ray, clock = FakeRay(), Clock()
    body = await _running(ray, clock, {"entrypoint": "python x.py", "backoffLimit": 0})
    ray.jobs.clear()  # the head restarted; vn-1's Ray node is still alive
    clock.advance(10)
    outcome = await step(make_reconciler(ray, clock), body)
    assert ("vn-1", "failure") not in outcome.reputation
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "RayJobLost")
    assert body["status"].get("failures", 0) == 0


async def test_a_ray_head_restart_blames_no_volunteer_of_a_job_placed_but_not_yet_running() -> None:
    """As above, but the head restarts between the write that places the attempt and the pass that
    sees it running. A restarted head is a new Ray cluster: vn-1's agent rejoins it as a new Ray
    node (same name and address, new id). The operator submitted the attempt again into it (its
    driver ran on the new node, by address), then found the recorded node gone and charged vn-1 a
    timeout (NodeLost) for the head's restart. Now it is placed again, uncounted, on the new node."""
    ray, clock = NodesRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 3})
    await step(rec, body)  # Scheduled, attempt 1, on vn-1's Ray node r1
    assert body["status"]["phase"] == "Scheduled" and body["status"]["rayNodeIds"] == ["r1"]
    await step(rec, body)  # submitted
    ray.jobs.clear()
    ray.node_list = [replace(NODES[0], node_id="r1b")]
    clock.advance(10)
    blamed: list[str] = []
    reasons: list[str] = []
    for _ in range(5):
        outcome = await step(rec, body)
        blamed += [kind for node, kind in outcome.reputation if kind != "success"]
        reasons += [event.reason for event in outcome.events]
        for sid, info in list(ray.jobs.items()):
            if not info.state.terminal:
                ray.set_state(sid, RayJobState.RUNNING)
        clock.advance(5)
    assert blamed == [], f"charged {blamed} for the head's restart; status {body['status'].get('reason')}"
    assert reasons[0] == "PlacedNodeGone" and "NodeLost" not in reasons
    assert submission_id_for(UID, 1) not in ray.jobs  # not submitted into the new cluster
    status = body["status"]
    assert (status["phase"], status["attempts"], status["rayNodeIds"]) == ("Running", 2, ["r1b"])
    assert status.get("failures", 0) == 0


async def test_a_node_gone_before_its_attempt_was_submitted_is_placed_again_blaming_nobody() -> None:
    """The volunteer's agent left Ray between the placement and the submission: nothing ran there,
    so nobody is charged; the attempt goes elsewhere (here: nowhere, the job waits)."""
    ray, clock = NodesRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 3})
    await step(rec, body)
    ray.node_list = [replace(NODES[0], alive=False)]
    outcome = await step(rec, body)
    assert outcome.reputation == [] and not ray.jobs
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "PlacedNodeGone")


async def test_a_ray_job_that_failed_still_counts() -> None:
    ray, clock = FakeRay(), Clock()
    body = await _running(ray, clock, {"entrypoint": "python x.py", "backoffLimit": 0})
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, message="worker died")
    clock.advance(10)
    outcome = await step(make_reconciler(ray, clock), body)
    assert ("vn-1", "failure") in outcome.reputation
    assert body["status"]["phase"] == "Failed"


@dataclass
class NodesRay(FakeRay):
    node_list: list[RayNodeInfo] = field(default_factory=lambda: list(NODES))

    async def nodes(self) -> list[RayNodeInfo]:
        return self.node_list


async def test_a_replayed_pass_that_concludes_otherwise_does_not_charge_the_volunteer_twice() -> None:
    ray, clock = NodesRay(), Clock()
    body = await _running(ray, clock, {"entrypoint": "python x.py", "backoffLimit": 3})
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, message="worker died")
    key = outcome_key(UID, body["status"])  # as handlers.reconcile_aijob keys the evidence
    first = await make_reconciler(ray, clock).reconcile(copy.deepcopy(body), {}, VOLUNTEERS)
    assert first.reputation == [("vn-1", "failure")]  # recorded; the operator dies before the status write
    ray.node_list = [replace(NODES[0], alive=False)]  # vn-1 disconnects meanwhile
    clock.advance(10)
    second = await make_reconciler(ray, clock).reconcile(copy.deepcopy(body), {}, VOLUNTEERS)
    assert second.reputation == [("vn-1", "timeout")]  # the replay sees a lost node instead
    volunteer: dict[str, Any] = {}
    for _node, kind in [*first.reputation, *second.reputation]:
        fields = updated_status(volunteer, kind, 1000.0, DEFAULT_CONFIG.reputation, key)
        if fields is not None:
            volunteer = {**volunteer, **fields}
    assert volunteer["jobs"] == {"failed": 1}


@dataclass
class SlowSubmitRay(FakeRay):
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    submitting: asyncio.Event = field(default_factory=asyncio.Event)

    async def submit(self, submission: Submission) -> bool:
        self.submitting.set()
        await self.gate.wait()  # the POST is on the wire
        return await super().submit(submission)


async def test_a_deletion_while_the_attempt_is_being_submitted_leaves_no_ray_job_running() -> None:
    # kopf runs the deletion handler while a timer pass that began before the deletion is still in
    # flight (only removing the finalizer waits for the timer).
    ray, clock = SlowSubmitRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    ray.gate.set()
    await step(reconciler, body)  # Scheduled, attempt 1
    ray.gate.clear()
    timer_pass = asyncio.create_task(reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS))
    await asyncio.wait_for(ray.submitting.wait(), 5)
    deleting = copy.deepcopy(body)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    stopping = asyncio.create_task(reconciler.stop(deleting))
    await asyncio.sleep(0.05)
    assert not stopping.done()  # it waits for the pass in flight
    ray.gate.set()
    await timer_pass
    assert await stopping
    assert not [job for job in ray.jobs.values() if not job.state.terminal]
    # A pass that was queued behind the deletion starts nothing.
    assert (await reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS)).events == []


async def test_an_aijob_created_again_under_a_deleted_ones_name_runs() -> None:
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    old = make_body({"entrypoint": "python x.py"})
    await step(reconciler, old)
    await reconciler.stop(old)
    again = make_body({"entrypoint": "python x.py"}, uid="11111111-2222-3333-4444-555555555555")
    await step(reconciler, again)
    assert again["status"]["phase"] == "Scheduled"


async def test_a_resumed_job_runs_before_its_deadline_is_judged() -> None:
    """As a Kubernetes Job's: startTime is reset on suspend, so activeDeadlineSeconds counts from the
    resumed run. It was kept, and a job suspended longer than its deadline failed DeadlineExceeded
    the moment it was resumed, without running again."""
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "activeDeadlineSeconds": 600})
    await step(reconciler, body)
    await step(reconciler, body)
    ray.set_state(submission_id_for(UID, 1), RayJobState.RUNNING)
    await step(reconciler, body)
    assert body["status"]["phase"] == "Running"
    body["spec"]["suspend"] = True
    await step(reconciler, body)
    assert body["status"]["phase"] == "Suspended" and "startTime" not in body["status"]
    clock.advance(3600)  # suspended for an hour: the platform team lent the GPUs to a demo
    body["spec"]["suspend"] = False
    await step(reconciler, body)  # Resumed, placed again
    await step(reconciler, body)  # submitted
    ray.set_state(submission_id_for(UID, 2), RayJobState.RUNNING)
    await step(reconciler, body)
    assert body["status"]["phase"] == "Running", body["status"]
    clock.advance(601)  # the resumed run passes its own deadline: that one still counts
    await step(reconciler, body)
    assert body["status"]["reason"] == "DeadlineExceeded", body["status"]


async def test_a_running_jobs_gpus_stay_held_after_a_restart_when_its_resources_were_edited() -> None:
    """The ledger a restarted operator rebuilds (the kopf index, allocation_of) read GPUs per
    replica from the current spec: a running job edited to gpus 0 looked as if it held none, and a
    second job was placed on the GPU it still ran on."""
    ray, clock = FakeRay(), Clock()
    running = await _running(ray, clock, {"entrypoint": "python a.py", "resources": {"gpus": 1}})
    running["spec"]["resources"]["gpus"] = 0  # for its next attempt; the running one is unchanged
    running["metadata"]["generation"] = 2
    allocation = allocation_of(running)
    assert allocation is not None and allocation.gpus_per_replica == 1
    restarted = make_reconciler(ray, clock)
    other = make_body({"entrypoint": "python b.py", "resources": {"gpus": 1}}, name="k", uid="u-other")
    outcome = await restarted.reconcile(copy.deepcopy(other), {"ns/j": allocation}, VOLUNTEERS)
    assert outcome.status.get("phase") == "Pending", outcome.status  # vn-1's one GPU is taken


async def test_the_operator_forgets_deleted_jobs_after_an_hour() -> None:
    """Each deleted job's uid was kept for good (a pass queued behind the deletion must not start
    it): a long-lived operator grew by one entry per job ever deleted."""
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    for number in range(3):
        body = make_body({"entrypoint": "python x.py"}, name=f"j{number}", uid=f"u-{number}")
        body["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
        await reconciler.stop(body)
    assert len(reconciler._stopped) == 3
    clock.advance(3601)
    body = make_body({"entrypoint": "python x.py"}, name="late", uid="u-late")
    await reconciler.stop(body)
    assert list(reconciler._stopped) == ["u-late"]


async def test_verified_copies_that_ran_between_two_passes_still_get_a_start_time() -> None:
    ray = CopiesRay(["vn-a", "vn-b", "vn-c"])
    clock = Clock()
    rec = verified_reconciler(ray, clock)
    vols = volunteers(ray.present)
    body = make_body({"entrypoint": "python x.py", "verification": {"mode": "replicated", "quorum": 3}})
    await step(rec, body, vols)  # placed
    clock.advance(40)
    await step(rec, body, vols)  # submitted
    for submission in ray.submissions:
        ray.set_state(submission.submission_id, RayJobState.SUCCEEDED, exit_code=0)
    clock.advance(40)
    await step(rec, body, vols)
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert body["status"]["startTime"]


async def test_a_deletion_stops_the_attempt_that_runs_after_a_finishing_pass_whose_write_was_discarded() -> None:
    """The reconciler remembers the jobs its passes finished (a deletion racing that pass must not
    stop them again): a finishing pass whose write was discarded (the Lease ran out) finished
    nothing, and the attempt the job ran next must be stopped on deletion."""
    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "activeDeadlineSeconds": 60})
    for _ in range(2):  # Accepted; Scheduled and submitted
        await step(reconciler, body)
    ray.set_state(submission_id_for(UID, 1), RayJobState.RUNNING)
    await step(reconciler, body)
    assert body["status"]["phase"] == "Running"

    clock.advance(61)
    # The pass that fails it (DeadlineExceeded) runs, but the Lease ran out meanwhile: as
    # handlers.reconcile_aijob does, nothing is written and the write is discarded.
    lost = await reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS)
    assert lost.status.get("phase") == "Failed"
    reconciler.discard_write("ns/j")
    assert body["status"]["phase"] == "Running"

    # The owner raises the deadline; the job (still Running in the API) is run again.
    body["spec"]["activeDeadlineSeconds"] = 3600
    body["metadata"]["generation"] = 2
    clock.advance(1)
    for _ in range(6):
        await step(reconciler, body)
        clock.advance(1)
        if body["status"].get("attempts") == 2 and body["status"].get("phase") == "Scheduled":
            break
    assert body["status"]["phase"] == "Scheduled" and body["status"]["attempts"] == 2, body["status"]
    second = submission_id_for(UID, 2)
    ray.set_state(second, RayJobState.RUNNING)
    await step(reconciler, body)
    assert body["status"]["phase"] == "Running"

    ray.stopped.clear()
    await reconciler.stop(copy.deepcopy(body))  # kubectl delete aijob j
    assert second in ray.stopped, "the running attempt 2 was not stopped on deletion"


def _edit(body: dict[str, Any], **spec: Any) -> None:
    """An edit of the spec, as `kubectl apply` makes it: metadata.generation goes up."""
    body["spec"].update(spec)
    body["metadata"]["generation"] += 1


async def _passes(reconciler: Any, body: dict[str, Any], clock: Clock, count: int) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    for _ in range(count):
        clock.advance(6)
        events += [(e.reason, e.message) for e in (await step(reconciler, body)).events]
    return events


async def test_an_edit_that_a_succeeding_attempt_never_ran_is_said_once_and_in_the_success() -> None:
    """A Kubernetes Job refuses an edit of its pod template; an AIJob takes an edit of its
    entrypoint while it runs, for its next attempt (README). observedGeneration follows the edit at
    once, so when the running attempt then succeeded (no next attempt) nothing told that its result
    came from the spec before the edit: `kubectl apply` said "configured", then Succeeded."""
    ray, clock = FakeRay(), Clock()
    body = await _running(ray, clock, {"entrypoint": "python train.py --lr 0.1"})
    assert body["status"]["attemptGeneration"] == 1
    reconciler = make_reconciler(ray, clock)
    _edit(body, entrypoint="python train.py --lr 0.001")  # the owner's fix: generation 2
    events = await _passes(reconciler, body, clock, 5)
    # A restarted operator (a new process: nothing of the old one's memory) says it no more.
    events += await _passes(make_reconciler(ray, clock), body, clock, 3)
    deferred = [message for reason, message in events if reason == "SpecChangeDeferred"]
    assert deferred == [
        "generation 2 changes entrypoint, runtimeEnv, replicas or resources; running attempt 1 keeps "
        "generation 1's spec, and the change applies from the next attempt, if there is one (none if "
        "this one succeeds)"
    ], events
    status = body["status"]
    assert (status["phase"], status["observedGeneration"], status["attemptGeneration"]) == ("Running", 2, 1)

    _edit(body, ttlSecondsAfterFinished=3600)  # generation 3: nothing the attempt runs with
    assert not [e for e in await _passes(reconciler, body, clock, 2) if e[0] == "SpecChangeDeferred"]
    _edit(body, entrypoint="python train.py --lr 0.01")  # generation 4: another program again
    events = await _passes(reconciler, body, clock, 3)
    assert [reason for reason, _ in events] == ["SpecChangeDeferred"], events
    assert "generation 4 changes" in events[0][1] and "keeps generation 1's spec" in events[0][1]

    ray.logs_text = "KOINON_RESULT 0.42\n"
    ray.set_state(submission_id_for(UID, 1), RayJobState.SUCCEEDED, exit_code=0)
    events = await _passes(reconciler, body, clock, 3)
    status = body["status"]
    assert (status["phase"], status["observedGeneration"], status["attemptGeneration"]) == ("Succeeded", 4, 1)
    said = (
        "attempt 1 succeeded with generation 1's spec: the entrypoint, runtimeEnv, replicas or resources as "
        "edited up to generation 4 never ran; result: 0.42"
    )
    assert status["message"] == said
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert (complete["status"], complete["message"]) == ("True", said)
    assert [(reason, message) for reason, message in events] == [("Completed", said)]
    # The CRD keeps the field (a structural schema prunes what it does not declare).
    crd = yaml.safe_load((Path(__file__).parents[2] / "manifests" / "crds" / "aijobs.koinon.dev.yaml").read_text())
    admitted = admit({"status": status}, crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"], only="status")
    assert admitted.obj["status"]["attemptGeneration"] == 1 and not admitted.unknown_fields


async def test_an_edit_the_running_attempt_is_unaffected_by_is_not_said() -> None:
    """backoffLimit, a TTL, a deadline: the running attempt follows them, nothing is deferred."""
    ray, clock = FakeRay(), Clock()
    body = await _running(ray, clock, {"entrypoint": "python x.py"})
    reconciler = make_reconciler(ray, clock)
    _edit(body, backoffLimit=5, ttlSecondsAfterFinished=60)
    events = await _passes(reconciler, body, clock, 2)
    ray.set_state(submission_id_for(UID, 1), RayJobState.SUCCEEDED, exit_code=0)
    events += await _passes(reconciler, body, clock, 2)
    assert [reason for reason, _ in events] == ["Completed"], events
    assert body["status"]["message"] == "attempt 1 succeeded; result: 42"
    assert (body["status"]["observedGeneration"], body["status"]["attemptGeneration"]) == (2, 1)


async def test_a_deferred_edit_runs_from_the_next_attempt_and_its_success_is_plain() -> None:
    ray, clock = FakeRay(), Clock()
    body = await _running(ray, clock, {"entrypoint": "python x.py", "backoffLimit": 1})
    reconciler = make_reconciler(ray, clock)
    _edit(body, entrypoint="python y.py")
    events = await _passes(reconciler, body, clock, 1)
    assert [reason for reason, _ in events] == ["SpecChangeDeferred"]
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message="boom")
    events = await _passes(reconciler, body, clock, 4)  # BackOff, placed again, submitted
    second = submission_id_for(UID, 2)
    assert [s.entrypoint for s in ray.submissions if s.submission_id == second] == ["python y.py"]
    status = body["status"]
    assert (status["attempts"], status["attemptGeneration"]) == (2, 2), status
    assert "deferredSpecDigest" not in status["scheduling"]
    ray.set_state(second, RayJobState.SUCCEEDED, exit_code=0)
    events += await _passes(reconciler, body, clock, 2)
    assert "SpecChangeDeferred" not in [reason for reason, _ in events], events
    assert body["status"]["message"] == "attempt 2 succeeded; result: 42"


async def test_a_verified_success_of_a_spec_edited_since_names_the_generation_it_ran() -> None:
    ray = CopiesRay(["vn-a", "vn-b", "vn-c"])
    clock = Clock()
    rec = verified_reconciler(ray, clock)
    vols = volunteers(ray.present)
    body = make_body({"entrypoint": "python x.py", "verification": {"mode": "replicated", "quorum": 3}})
    await step(rec, body, vols)  # placed
    clock.advance(40)
    await step(rec, body, vols)  # submitted, every copy
    _edit(body, entrypoint="python y.py")
    clock.advance(40)
    events = [(e.reason, e.message) for e in (await step(rec, body, vols)).events]
    assert [reason for reason, _ in events] == ["SpecChangeDeferred"], events
    for submission in ray.submissions:
        ray.set_state(submission.submission_id, RayJobState.SUCCEEDED, exit_code=0)
    clock.advance(40)
    await step(rec, body, vols)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Verified"), status
    assert status["message"].startswith("attempt 1: 3/3 copies agree with generation 1's spec: "), status["message"]
    assert "as edited up to generation 2 never ran" in status["message"]
