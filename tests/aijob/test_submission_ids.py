"""An attempt's Ray submissions are the operator's own: their ids carry a nonce keyed by the
operator's secret (not to be guessed before the operator submits, the same whoever places the
attempt), a job found under one of them that differs from what the placing write recorded is not
adopted, and a driver that ran on another Ray node than its copy's (or that Ray's record says ran
and names no node for) gives no answer, a single copy's included. Anyone with the cluster's Ray
token (every volunteer: README, "What a volunteer can still do") can submit to the head's Job API
under any id, and rewrite Ray's job records.

Reconciler passes against a fake Ray Job API (tests/aijob/fake_ray.py)."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from koinon_emulator.patching import merge_patch
from koinon_operator import handlers
from koinon_operator.api.aijob import MAX_QUORUM, AIJobStatus, parse_spec
from koinon_operator.inventory import RayNodeCache
from koinon_operator.ray_jobs import RayJobInfo, RayJobState, RayNodeInfo, SubmittedAs
from koinon_operator.reconciler import (
    PLACED_SUBMISSIONS,
    AIJobReconciler,
    Outcome,
    copy_submission_id_from,
    digest_of,
    foreign_submission,
    keyed_submission_nonce,
    submission_of,
)
from koinon_operator.scheduling import ReputationPlacer, spot_check_key

from .fake_ray import UID, Clock, make_body, node_address, step, submitted_as
from .test_spot_check_coin import JOBS, copies_drawn, replicated, trusted_volunteers
from .test_verification_rounds import (
    FORGED,
    GOOD,
    SEED_KEY,
    CopiesRay,
    reconciler,
    replicated_job,
    volunteers,
    with_trusted,
)

NONCED = re.compile(rf"koinon-{UID}-(\d+)-([0-9a-f]{{16}})")


# The operator's key (its Secret, handlers.configure): the same for every operator process of a test.
KEY = bytes(range(32))
NONCE_1 = keyed_submission_nonce(KEY)(UID, 1)


def operator_reconciler(ray: CopiesRay, clock: Clock) -> AIJobReconciler:
    """As the operator builds it (handlers.py): each attempt's nonce keyed by the operator's key."""
    fake: Any = ray
    return AIJobReconciler(
        ray=fake,
        placer=ReputationPlacer(clock=lambda: clock.now.timestamp(), seed_key=SEED_KEY),
        nodes=RayNodeCache(fake, max_age_seconds=0.0),
        clock=lambda: clock.now,
        monotonic=lambda: clock.mono,
        submission_nonce=keyed_submission_nonce(KEY),
    )


def attempt_ids(status: dict[str, Any]) -> list[str]:
    ids = [copy_submission_id_from(status.get("submissionId"), k) for k in range(status["scheduling"]["copies"])]
    return [i for i in ids if i]


async def until_submitted(
    rec: AIJobReconciler, ray: CopiesRay, clock: Clock, body: dict[str, Any], attempt: int = 1
) -> list[str]:
    """Passes until every copy of attempt ``attempt`` is in Ray; their ids."""
    vols = volunteers(ray.present)
    for _ in range(10):
        await step(rec, body, vols)
        clock.advance(40)
        status = body["status"]
        placed = status.get("submissionId") and status.get("attempts") == attempt
        if placed and all(i in ray.jobs for i in attempt_ids(status)):
            return attempt_ids(status)
    raise AssertionError(body["status"])


async def test_a_submission_made_under_the_next_attempts_predictable_id_is_not_adopted_as_its_answer() -> None:
    """The reviewer's case: attempt 2 of a replicated job on trusted nodes skips its copy (one
    submission). A volunteer submitted its own job, printing a forged result, under
    koinon-<uid>-2 before attempt 2 was submitted, pinned to the node attempt 2 is placed on (its
    driver there: no check of the driver's node catches it). That job was adopted ('already
    existed') and its log taken as the answer: Succeeded with the forged value, the honest node
    credited. Now attempt 2's id carries a nonce nobody could know before the operator submits."""
    ray, clock = CopiesRay(["vn-c", "vn-d"]), Clock()
    rec, body = operator_reconciler(ray, clock), replicated_job(quorum=2)
    vols = with_trusted(ray.present, ("vn-c", "vn-d"))
    for _ in range(10):  # attempt 1 runs, and is stopped (any interruption): placed again
        await step(rec, body, vols)
        clock.advance(40)
        if body["status"].get("submissionId") in ray.jobs:
            break
    for submission in attempt_ids(body["status"]):
        ray.set_state(submission, RayJobState.STOPPED)
    await step(rec, body, vols)
    assert body["status"]["phase"] == "Pending", body["status"]
    await step(rec, body, vols)  # attempt 2 placed: the skip was drawn for it
    status = body["status"]
    assert (status["phase"], status["attempts"], status["scheduling"]["copies"]) == ("Scheduled", 2, 1), status
    forged_id = f"koinon-{UID}-2"
    driver = status["rayNodeIds"][0]
    ray.jobs[forged_id] = RayJobInfo(forged_id, RayJobState.SUCCEEDED, "", driver, 1, 2, 0)
    ray.logs_by_id[forged_id] = FORGED
    for _ in range(6):
        outcome = await step(rec, body, vols)
        clock.advance(40)
        if body["status"]["phase"] in ("Succeeded", "Failed"):
            break
        if body["status"]["phase"] == "Scheduled" and body["status"]["submissionId"] in ray.jobs:
            ray.set_state(body["status"]["submissionId"], RayJobState.SUCCEEDED, exit_code=0)
    status = body["status"]
    assert status["result"]["value"] == "42", (status["phase"], status["reason"], status["result"])
    assert NONCED.fullmatch(status["submissionId"]), status["submissionId"]
    assert forged_id not in [s.submission_id for s in ray.submissions]
    assert ("vn-c", "success") in outcome.reputation or ("vn-d", "success") in outcome.reputation


async def test_each_attempt_and_all_its_copies_share_one_nonce_keyed_by_its_uid_and_number() -> None:
    ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
    rec, body = operator_reconciler(ray, clock), replicated_job(quorum=2)
    first = await until_submitted(rec, ray, clock, body)
    match = NONCED.fullmatch(first[0])
    assert match is not None and match.group(1) == "1", first
    assert first[1:] == [f"{first[0]}-copy1"]
    for submission in first:
        ray.set_state(submission, RayJobState.STOPPED)  # stopped by hand: placed again, uncounted
    second = await until_submitted(rec, ray, clock, body, attempt=2)
    again = NONCED.fullmatch(second[0])
    assert again is not None and again.group(1) == "2" and again.group(2) != match.group(2), second
    assert body["status"].get("failures", 0) == 0
    assert (match.group(2), again.group(2)) == (
        keyed_submission_nonce(KEY)(UID, 1),
        keyed_submission_nonce(KEY)(UID, 2),
    )
    # Another key (another pool's operator, or a guess) names other ids.
    assert keyed_submission_nonce(bytes(32))(UID, 1) != match.group(2)


async def test_a_restarted_operator_submits_and_adopts_under_the_ids_the_placing_write_recorded() -> None:
    """Nothing is submitted before the write that places the attempt is read back; an operator
    that restarts after it, or after submitting without a later write, computes the same ids from
    status: each copy is submitted once. One that places it again (the first write lost) names
    the same ids."""
    ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
    body = replicated_job(quorum=2)
    vols = volunteers(ray.present)
    lost = await operator_reconciler(ray, clock).reconcile(copy.deepcopy(body), {}, vols)
    assert lost.status["phase"] == "Scheduled" and not ray.submissions  # its write is lost: a crash
    await step(operator_reconciler(ray, clock), body, vols)  # placed again, by a restarted operator
    assert body["status"]["phase"] == "Scheduled" and not ray.submissions
    recorded = attempt_ids(body["status"])
    assert recorded[0] == lost.status["submissionId"]
    submitting = operator_reconciler(ray, clock)  # restarted again: submits what status names
    await submitting.reconcile(copy.deepcopy(body), {}, vols)  # its outcome is lost too
    assert [s.submission_id for s in ray.submissions] == recorded
    for _ in range(3):  # and again: it finds them all, submits nothing
        await step(operator_reconciler(ray, clock), body, vols)
        clock.advance(10)
    assert [s.submission_id for s in ray.submissions] == recorded
    for submission in recorded:
        ray.set_state(submission, RayJobState.SUCCEEDED, exit_code=0)
    await step(operator_reconciler(ray, clock), body, vols)
    assert (body["status"]["phase"], body["status"]["attempts"]) == ("Succeeded", 1), body["status"]


async def test_an_attempt_an_earlier_operator_placed_keeps_its_ids_after_the_upgrade() -> None:
    """A status without a nonce (koinon-<uid>-<attempt>) is followed under those ids: its Ray
    job, submitted by the earlier operator, is adopted, neither submitted again nor lost."""
    ray, clock = CopiesRay(["vn-a"]), Clock()
    body = make_body({"entrypoint": "python x.py"})
    earlier = reconciler(ray, clock)  # no nonce: as operators before nonces placed
    await until_submitted(earlier, ray, clock, body)
    assert body["status"]["submissionId"] == f"koinon-{UID}-1"
    upgraded = operator_reconciler(ray, clock)
    await step(upgraded, body, volunteers(ray.present))
    ray.set_state(f"koinon-{UID}-1", RayJobState.SUCCEEDED, exit_code=0)
    await step(upgraded, body, volunteers(ray.present))
    status = body["status"]
    assert (status["phase"], status["attempts"], status["result"]["value"]) == ("Succeeded", 1, "42"), status
    assert [s.submission_id for s in ray.submissions] == [f"koinon-{UID}-1"]


def _forged_in_place(ray: CopiesRay, body: dict[str, Any], entrypoint: str) -> str:
    """Someone else's job under the attempt's (known) id: what the operator submits there, but
    for ``entrypoint``; pinned to, and run on, the copy's own node; it succeeded, printing FORGED."""
    status = AIJobStatus.from_status(body["status"])
    honest = submission_of("ns/j", parse_spec(body["spec"]), status, 0)
    forged = replace(honest, entrypoint=entrypoint)
    ray.jobs[forged.submission_id] = RayJobInfo(
        forged.submission_id, RayJobState.SUCCEEDED, "", status.ray_node_ids[0], 1, 2, 0, None, submitted_as(forged)
    )
    ray.logs_by_id[forged.submission_id] = FORGED
    return forged.submission_id


async def test_a_job_someone_else_submitted_under_a_known_id_is_stopped_and_the_attempt_placed_again_uncounted() -> (
    None
):
    """An attempt an earlier operator placed has a predictable id (so does a copy's once the
    attempt's first copy is listed by the head). A job under it with another entrypoint, pinned to
    the placed node and run there, is no answer of the attempt's: not adopted, nobody charged or
    credited, stopped, and the attempt placed again (uncounted) under a new, nonced id."""
    ray, clock = CopiesRay(["vn-a"]), Clock()
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 0})
    vols = volunteers(ray.present)
    await step(reconciler(ray, clock), body, vols)  # an earlier operator placed it...
    assert body["status"]["phase"] == "Scheduled" and not ray.submissions, body["status"]
    forged_id = _forged_in_place(ray, body, "python -c 'print(\"KOINON_RESULT forged\")'")  # ...and died
    upgraded = operator_reconciler(ray, clock)
    outcome = await step(upgraded, body, vols)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Pending", "SubmissionConflict"), status
    assert outcome.reputation == [] and status.get("failures", 0) == 0
    assert forged_id in ray.stopped
    assert "result" not in status or status["result"] is None
    assert forged_id not in [s.submission_id for s in ray.submissions]
    submitted = await until_submitted(upgraded, ray, clock, body, attempt=2)
    assert NONCED.fullmatch(submitted[0]) and body["status"]["attempts"] == 2
    ray.set_state(submitted[0], RayJobState.SUCCEEDED, exit_code=0)
    outcome = await step(upgraded, body, vols)
    assert (body["status"]["phase"], body["status"]["result"]["value"]) == ("Succeeded", "42"), body["status"]
    assert outcome.reputation == [("vn-a", "success")]


async def test_a_copy_submitted_by_someone_else_is_no_answer_of_a_verified_attempt() -> None:
    """A verification copy's id is listed by the head as soon as the attempt's first copy is
    submitted: a job under it, pinned to the copy's node with another entrypoint, would have been
    that node's answer (its driver ran where it was placed)."""
    ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
    rec, body = operator_reconciler(ray, clock), replicated_job(quorum=2)
    ids = await until_submitted(rec, ray, clock, body)
    status = AIJobStatus.from_status(body["status"])
    honest = submission_of("ns/j", parse_spec(body["spec"]), status, 1)
    taken = replace(honest, entrypoint="python forge.py")
    ray.jobs[ids[1]] = replace(ray.jobs[ids[1]], submitted=submitted_as(taken))  # deleted, submitted again
    for submission in ids:
        ray.set_state(submission, RayJobState.SUCCEEDED, exit_code=0)
    outcome = await step(rec, body, volunteers(ray.present))
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "SubmissionConflict"), body["status"]
    assert outcome.reputation == []


async def test_a_single_copy_whose_driver_ran_on_another_ray_node_gives_no_answer() -> None:
    """A job whose only copy's driver ran on another Ray node than the one placed (another node
    claiming its address, or a job someone else submitted where Ray reports no submission) was
    taken as the job's answer, its log read from that node, and the placed node credited a
    success. As a verification copy: no answer, nobody charged or credited, the attempt fails
    (DriverMisplaced, counted, so an impostor cannot hold the job for ever)."""
    ray, clock = CopiesRay(["vn-a"]), Clock()
    rec, body = reconciler(ray, clock), make_body({"entrypoint": "python x.py", "backoffLimit": 0})
    [submission] = await until_submitted(rec, ray, clock, body)
    ray.jobs[submission] = RayJobInfo(submission, RayJobState.SUCCEEDED, "", "r-elsewhere", 1, 2, 0)
    ray.logs_by_id[submission] = FORGED
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "BackoffLimitExceeded"), status
    assert "DriverMisplaced" in [e.reason for e in outcome.events] or "another Ray node" in status["message"]
    assert outcome.reputation == []
    assert (status.get("result") or {}).get("value") != "forged"


async def test_an_edit_while_the_attempt_runs_does_not_make_its_own_copies_foreign() -> None:
    """What the operator would submit now is not what it submitted before an edit (applied from
    the next attempt): only what status gives is compared then."""
    ray, clock = CopiesRay(["vn-a"]), Clock()
    rec, body = operator_reconciler(ray, clock), make_body({"entrypoint": "python x.py"})
    [submission] = await until_submitted(rec, ray, clock, body)
    body["spec"]["entrypoint"] = "python y.py"
    body["metadata"]["generation"] = 2
    ray.set_state(submission, RayJobState.SUCCEEDED, exit_code=0)
    await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert (status["phase"], status["attempts"], status["result"]["value"]) == ("Succeeded", 1, "42"), status


def test_what_differs_from_the_operators_submission_is_named() -> None:
    body = make_body({"entrypoint": "python x.py"})
    body["status"] = {
        "attempts": 1, "submissionId": f"koinon-{UID}-1-{NONCE_1}", "assignedNodes": ["vn-a"],
        "traceId": "0" * 31 + "1", "scheduling": {"addresses": ["127.0.0.9"], "copies": 1},
    }  # fmt: skip
    ours = submission_of("ns/j", parse_spec(body["spec"]), AIJobStatus.from_status(body["status"]), 0)
    found = RayJobInfo(ours.submission_id, RayJobState.RUNNING, "", None, 1, None, None)
    assert foreign_submission(ours, found) is None  # Ray did not say: nothing to compare
    assert foreign_submission(ours, replace(found, submitted=submitted_as(ours))) is None
    other = replace(ours, entrypoint="python z.py", metadata={**ours.metadata, "koinon.dev/copy": "1"})
    assert foreign_submission(ours, replace(found, submitted=submitted_as(other))) == "entrypoint, metadata"
    # After an edit only what status gives is compared (metadata, the driver's pin, what it reserves).
    assert foreign_submission(ours, replace(found, submitted=submitted_as(other)), whole=False) == "metadata"
    # Ray 2.60 does not report the entrypoint's resources (the driver's pin): compared where reported.
    reported = replace(submitted_as(ours), entrypoint_resources=dict(ours.entrypoint_resources), entrypoint_num_gpus=0)
    assert foreign_submission(ours, replace(found, submitted=reported)) is None
    greedy = replace(reported, entrypoint_num_gpus=1, entrypoint_resources={"node:10.0.0.1": 0.001})
    assert foreign_submission(ours, replace(found, submitted=greedy), whole=False) == (
        "entrypoint_resources, entrypoint_num_gpus"
    )
    assert SubmittedAs("x", None, None).entrypoint_resources is None


async def test_a_pass_on_a_body_older_than_the_placing_write_adopts_the_attempts_job_instead_of_running_it_twice() -> (
    None
):
    """Operator 1 places attempt 1, reads its write back and submits it. Operator 2 (a new leader
    whose watch still holds the Pending body, or operator 1 itself past STALE_BODY_GRACE_SECONDS
    with its watch stalled) acts on that older body: it places attempt 1 again, and its write
    lands over the first. With a nonce drawn at random per placement that named another Ray job,
    submitted while the first ran on, referenced by nothing (never stopped, its nodes free in the
    ledger); keyed by (uid, attempt), both placements name the same ids, and the second adopts."""
    ray, clock = CopiesRay(["vn-a"]), Clock()
    body = make_body({"entrypoint": "python x.py"})
    vols = volunteers(ray.present)
    first = operator_reconciler(ray, clock)
    stale = copy.deepcopy(body)  # as the other pass sees it: before the placing write
    await step(first, body, vols)  # accepted and placed
    await step(first, body, vols)  # submitted
    assert len(ray.submissions) == 1
    second = operator_reconciler(ray, clock)  # another process, the same key (the operator's Secret)
    late = await second.reconcile(copy.deepcopy(stale), {}, vols)
    assert late.status["phase"] == "Scheduled", late.status
    body["status"] = merge_patch(body["status"], late.status)
    await step(second, body, vols)
    running = {s.submission_id for s in ray.submissions} - set(ray.stopped)
    assert running == {body["status"]["submissionId"]}, (running, body["status"]["submissionId"])
    ray.set_state(body["status"]["submissionId"], RayJobState.SUCCEEDED, exit_code=0)
    await step(second, body, vols)
    status = body["status"]
    assert (status["phase"], status["attempts"], status["result"]["value"]) == ("Succeeded", 1, "42"), status


async def test_a_late_pass_that_places_the_attempt_on_other_nodes_stops_the_first_placements_job() -> None:
    """The same late pass, where the first node has gone from its view: it places attempt 1 on
    another node, under the same ids. The job the first placement submitted there is not what the
    second records (other nodes in its env): stopped, and the attempt placed again, uncounted;
    never two running."""
    ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
    body = make_body({"entrypoint": "python x.py"})
    first = operator_reconciler(ray, clock)
    stale = copy.deepcopy(body)
    [submitted] = await until_submitted(first, ray, clock, body)
    placed_on = body["status"]["assignedNodes"]
    ray.present = [n for n in ("vn-a", "vn-c") if n not in placed_on]  # as the late pass sees Ray
    second = operator_reconciler(ray, clock)
    late = await second.reconcile(copy.deepcopy(stale), {}, volunteers(ray.present))
    assert late.status["assignedNodes"] != placed_on and late.status["submissionId"] == submitted, late.status
    body["status"] = merge_patch(body["status"], late.status)
    await step(second, body, volunteers(ray.present))
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Pending", "SubmissionConflict"), status
    assert submitted in ray.stopped and status.get("failures", 0) == 0
    again = await until_submitted(second, ray, clock, body, attempt=2)
    running = {s.submission_id for s in ray.submissions} - set(ray.stopped)
    assert running == set(again), running


async def test_after_a_spec_edit_a_job_with_another_entrypoint_under_the_attempts_id_is_not_adopted() -> None:
    """The owner edits a running job's entrypoint (applies from the next attempt). A volunteer that
    saw the attempt's id listed deletes the ended honest job and submits under its id a job of its
    own: any entrypoint, the (predictable) metadata, pinned to the copy's own node (its address is
    in the listed job's runtime_env), so its driver runs there. Compared only by its metadata once
    the spec was edited, its log was taken as the answer and the honest node credited; it is
    compared with what the placing write recorded (status.scheduling.submissionDigests)."""
    ray, clock = CopiesRay(["vn-a"]), Clock()
    rec, body = operator_reconciler(ray, clock), make_body({"entrypoint": "python x.py"})
    [submission] = await until_submitted(rec, ray, clock, body)
    assert len(body["status"]["scheduling"][PLACED_SUBMISSIONS]) == 1
    body["spec"]["entrypoint"] = "python y.py"  # the owner's edit, mid-attempt
    body["metadata"]["generation"] = 2
    status = AIJobStatus.from_status(body["status"])
    honest = submission_of("ns/j", parse_spec({"entrypoint": "python x.py"}), status, 0)
    forged = replace(honest, entrypoint="python -c 'print(\"KOINON_RESULT forged\")'")
    # deleted and submitted again under the same id; Ray ran it on the copy's own node
    ray.jobs[submission] = RayJobInfo(
        submission, RayJobState.SUCCEEDED, "", status.ray_node_ids[0], 1, 2, 0, None, submitted_as(forged)
    )
    ray.logs_by_id[submission] = FORGED
    outcome = await step(rec, body, volunteers(ray.present))
    status_after = body["status"]
    assert (status_after["phase"], status_after["reason"]) == ("Pending", "SubmissionConflict"), status_after
    assert (status_after.get("result") or {}).get("value") != "forged"
    assert outcome.reputation == [] and submission in ray.stopped


def test_the_digests_recorded_at_placement_are_what_ray_echoes_of_the_operators_own_submissions() -> None:
    """What Ray reports back of a submission (a JSON round trip of its entrypoint, runtime_env with
    the KOINON_* variables and TRACEPARENT, and metadata) has the digest recorded for it."""
    body = make_body({"entrypoint": "python x.py", "runtimeEnv": {"env_vars": {"A": "1"}, "pip": ["numpy"]}})
    body["status"] = {
        "attempts": 1, "submissionId": f"koinon-{UID}-1-{NONCE_1}", "assignedNodes": ["vn-a"],
        "traceId": "0" * 31 + "1", "scheduling": {"addresses": ["127.0.0.9"], "copies": 1},
    }  # fmt: skip
    ours = submission_of("ns/j", parse_spec(body["spec"]), AIJobStatus.from_status(body["status"]), 0)
    assert "TRACEPARENT" in ours.runtime_env["env_vars"] and "KOINON_NODE_ADDRESSES" in ours.runtime_env["env_vars"]
    found = RayJobInfo(ours.submission_id, RayJobState.SUCCEEDED, "", "r0", 1, 2, 0, None, submitted_as(ours))
    assert foreign_submission(ours, found, placed=digest_of(ours)) is None
    for changed in (
        replace(ours, entrypoint="python z.py"),
        replace(
            ours, runtime_env={**ours.runtime_env, "env_vars": {**ours.runtime_env["env_vars"], "TRACEPARENT": "x"}}
        ),
        replace(ours, metadata={**ours.metadata, "koinon.dev/copy": "1"}),
    ):
        other = replace(found, submitted=submitted_as(changed))
        assert foreign_submission(ours, other, placed=digest_of(ours)) is not None, changed
        # Whatever the spec says now (``whole`` False: edited): the recorded digest decides.
        assert foreign_submission(ours, other, whole=False, placed=digest_of(ours)) is not None, changed


async def test_an_attempt_placed_without_submission_digests_is_compared_with_its_unedited_spec() -> None:
    """A status from an operator before submissionDigests: a job under the attempt's id is compared
    with what the spec, unedited, gives (the rule before them)."""
    ray, clock = CopiesRay(["vn-a"]), Clock()
    rec, body = operator_reconciler(ray, clock), make_body({"entrypoint": "python x.py"})
    await until_submitted(rec, ray, clock, body)
    del body["status"]["scheduling"][PLACED_SUBMISSIONS]
    forged_id = _forged_in_place(ray, body, "python forge.py")
    await step(rec, body, volunteers(ray.present))
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "SubmissionConflict"), body["status"]
    assert forged_id in ray.stopped


async def test_an_attempt_placed_with_a_random_nonce_is_followed_under_the_id_its_status_records() -> None:
    """Attempts placed by the operator that drew each nonce at random keep their ids: every id is
    read from status, whatever made it."""
    ray, clock = CopiesRay(["vn-a"]), Clock()
    body = make_body({"entrypoint": "python x.py"})
    drawn = "0123456789abcdef"
    earlier = reconciler(ray, clock, nonce=lambda uid, attempt: drawn)
    [submission] = await until_submitted(earlier, ray, clock, body)
    assert submission == f"koinon-{UID}-1-{drawn}"
    upgraded = operator_reconciler(ray, clock)
    await step(upgraded, body, volunteers(ray.present))
    ray.set_state(submission, RayJobState.SUCCEEDED, exit_code=0)
    await step(upgraded, body, volunteers(ray.present))
    status = body["status"]
    assert (status["phase"], status["attempts"], status["result"]["value"]) == ("Succeeded", 1, "42"), status
    assert [s.submission_id for s in ray.submissions] == [submission]


async def test_a_succeeded_copy_whose_ray_record_names_no_driver_node_gives_no_answer() -> None:
    """Ray names the driver's node in the record of every job whose driver ran (Ray 2.60
    JobSupervisor.run, before it starts the driver); the record lives in GCS KV, which any Ray-token
    holder can write. A job under the attempt's id with what the operator submits there, whose
    record says SUCCEEDED and names no driver node, passed the check of where its driver ran, and
    its log was read through the head's /api/jobs/<id>/logs, which Ray serves from the agent
    address the record names: taken as the answer, and the placed node credited."""
    ray, clock = LogsSeenRay(["vn-a"]), Clock()
    rec = operator_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 0})
    [submission] = await until_submitted(rec, ray, clock, body)
    same = ray.jobs[submission].submitted
    ray.jobs[submission] = RayJobInfo(submission, RayJobState.SUCCEEDED, "", None, 1, 2, 0, None, same)
    ray.logs_by_id[submission] = FORGED
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert (status.get("result") or {}).get("value") != "forged", (status, outcome.reputation)
    assert (status["phase"], status["reason"]) == ("Failed", "BackoffLimitExceeded"), status
    assert "DriverMisplaced" in status["message"] or "another Ray node" in status["message"], status["message"]
    assert outcome.reputation == []
    assert ray.read == []  # its log was not asked for, anywhere


async def test_a_placed_copy_that_failed_before_its_driver_started_is_judged_without_asking_the_head_for_its_log() -> (
    None
):
    """A job whose runtime_env could not be set up never had a driver: Ray's record names no driver
    node, honestly. It is still an env failure of the spec's (not a misplaced driver), and no log
    is read for it (the head would serve one from whatever agent address the record names)."""
    ray, clock = LogsSeenRay(["vn-a"]), Clock()
    rec = operator_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 0})
    [submission] = await until_submitted(rec, ray, clock, body)
    ray.set_state(
        submission, RayJobState.FAILED, message="runtime_env setup failed: no such package",
        error_type="RUNTIME_ENV_SETUP_FAILURE",
    )  # fmt: skip
    assert ray.jobs[submission].driver_node_id is None
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert status["phase"] == "Failed" and "DriverMisplaced" not in status["message"], status
    assert "runtime_env setup failed" in status["message"], status["message"]
    assert outcome.reputation == []  # an env failure is charged only once another node sets it up
    assert ray.read == []


class LogsSeenRay(CopiesRay):
    """Ray that records each driver log read: (submission, driver node asked for)."""

    def __init__(self, present: list[str]) -> None:
        super().__init__(present)
        self.read: list[tuple[str, str | None]] = []

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        self.read.append((submission_id, driver_node_id))
        return await super().logs(submission_id, driver_node_id, lines)


def keyed_reconciler(ray: CopiesRay, clock: Clock, placer: ReputationPlacer) -> AIJobReconciler:
    """An operator process with the shared submission key, placing with ``placer``."""
    fake: Any = ray
    return AIJobReconciler(
        ray=fake,
        placer=placer,
        nodes=RayNodeCache(fake, max_age_seconds=0.0),
        clock=lambda: clock.now,
        monotonic=lambda: clock.mono,
        submission_nonce=keyed_submission_nonce(KEY),
    )


async def placed_twice(
    first: AIJobReconciler, second: AIJobReconciler, ray: CopiesRay, clock: Clock, body: dict[str, Any]
) -> tuple[list[str], Outcome]:
    """``first`` places and submits the attempt of ``body`` (its copies then run); ``second``, a new
    leader whose watch is behind, acts on the body from before the placing write. The ids
    ``first`` submitted, and the late pass (its write not applied)."""
    vols = trusted_volunteers(ray.present)
    stale = copy.deepcopy(body)
    for _ in range(10):
        if not (body.get("status") or {}).get("assignedNodes"):
            stale = copy.deepcopy(body)  # the last body before the placing write
        await step(first, body, vols)
        clock.advance(40)
        status = body["status"]
        ids = attempt_ids(status) if status.get("assignedNodes") else []
        if ids and all(x in ray.jobs for x in ids):
            break
    else:
        raise AssertionError(body["status"])
    for x in ids:
        ray.set_state(x, RayJobState.RUNNING)
    return ids, await second.reconcile(stale, {}, vols)


def test_every_operator_process_draws_the_same_spot_check_coin_from_the_shared_key() -> None:
    """handlers.configure keys the coin from the submission key (its Secret): every replica, and
    every restart, draws the same copies for an attempt; another key (another pool's, or a guess)
    draws otherwise, and so does the coin a volunteer can compute (test_spot_check_coin)."""
    drawn = copies_drawn(handlers.operator_placer(KEY), JOBS)
    assert 1 in drawn and 2 in drawn  # trusted nodes: the coin decides
    assert copies_drawn(handlers.operator_placer(KEY), JOBS) == drawn
    assert copies_drawn(handlers.operator_placer(bytes(32)), JOBS) != drawn
    assert spot_check_key(KEY) != KEY and len(spot_check_key(KEY)) == 32  # BLAKE2b takes up to 64


async def test_a_new_leader_on_a_body_older_than_the_placing_write_places_the_copies_that_write_placed() -> None:
    """Review repro (dsub2): the coin was keyed with a random key per operator process, so a new
    leader placing an attempt again from a body older than the placing write could draw one copy
    where two were submitted, dropping the attempt's check. Keyed from the shared key, both
    placements draw the same, spot-checked or not."""
    drawn = []
    for i in range(24):
        ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
        # Two operator processes, each with its placer as handlers.configure builds it.
        first = keyed_reconciler(ray, clock, handlers.operator_placer(KEY))
        second = keyed_reconciler(ray, clock, handlers.operator_placer(KEY))
        ids, late = await placed_twice(first, second, ray, clock, replicated(f"job-{i}"))
        assert late.status["submissionId"] == ids[0]
        assert late.status["scheduling"]["copies"] == len(ids), (i, late.status["scheduling"], ids)
        drawn.append(len(ids))
    assert 1 in drawn and 2 in drawn, drawn


async def test_a_placement_again_with_fewer_copies_stops_those_left_over_and_keeps_checked_copies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review repro (dsub2): a late placement can still draw fewer copies than the placing write
    (another trust record behind the coin; here, an operator whose coin is keyed apart). Its write
    named copy 0 only: copy 0 was adopted, `-copy1` ran on referenced by no status (never
    stopped, its node free in the ledger), and checkedCopies went back to 1, so later attempts
    could skip the check. The pass that follows the attempt stops `-copy1`; checkedCopies stays 2."""
    found = 0
    for i in range(40):
        ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
        first = keyed_reconciler(ray, clock, ReputationPlacer(seed_key=SEED_KEY))
        second = keyed_reconciler(ray, clock, ReputationPlacer(seed_key=SEED_KEY + b"-other-process"))
        body = replicated(f"job-{i}")
        ids, late = await placed_twice(first, second, ray, clock, body)
        if len(ids) != 2 or late.status["scheduling"]["copies"] != 1:
            continue
        found += 1
        assert "checkedCopies" not in late.status["scheduling"], late.status["scheduling"]  # nothing to raise
        body["status"] = merge_patch(body["status"], late.status)
        assert body["status"]["scheduling"]["checkedCopies"] == 2
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="koinon_operator.reconciler"):
            for _ in range(3):
                clock.advance(40)
                await step(second, body, trusted_volunteers(ray.present))
        status = body["status"]
        assert attempt_ids(status) == ids[:1] and status["phase"] == "Running", status
        assert ray.jobs[ids[1]].state is RayJobState.STOPPED and ray.stopped == [ids[1]], ray.stopped
        assert any(ids[1] in r.getMessage() and "stopping it" in r.getMessage() for r in caplog.records)
        assert status["scheduling"]["checkedCopies"] == 2  # the next attempt is checked
        if found == 3:
            return
    raise AssertionError(f"only {found} job(s) drew 2 then 1: the test did not exercise the path")


async def test_copies_left_over_are_looked_for_once_per_attempt_not_every_pass() -> None:
    """The look for copies beyond those status records costs reads of Ray: made on the pass that
    follows the attempt once placed (phase Scheduled), not again while it runs."""
    ray, clock = GetsCountedRay(["vn-a", "vn-c"]), Clock()
    rec, body = operator_reconciler(ray, clock), replicated_job(quorum=2)
    ids = await until_submitted(rec, ray, clock, body)
    beyond = {f"{ids[0]}-copy{k}" for k in range(2, MAX_QUORUM)}
    assert beyond <= set(ray.asked), ray.asked
    assert all(ray.asked.count(x) == 1 for x in beyond)
    for x in ids:
        ray.set_state(x, RayJobState.RUNNING)
    ray.asked.clear()
    for _ in range(3):
        clock.advance(40)
        await step(rec, body, volunteers(ray.present))
    assert body["status"]["phase"] == "Running" and set(ray.asked) == set(ids), ray.asked


class GetsCountedRay(CopiesRay):
    """Ray that records the submission ids asked about."""

    def __init__(self, present: list[str]) -> None:
        super().__init__(present)
        self.asked: list[str] = []

    async def get(self, submission_id: str) -> RayJobInfo | None:
        self.asked.append(submission_id)
        return await super().get(submission_id)


async def test_a_copy_left_over_is_stopped_though_the_late_placements_scheduled_body_was_never_acted_on() -> None:
    """Passes act on the latest body the watch delivered: a pass on the first placement's body
    (watch behind) writes Running over the late placement's Scheduled write, so no pass here ever
    sees that attempt Scheduled. The sweep for left-over copies ran only on Scheduled bodies and
    never ran: the first placement's second copy ran on, referenced by no status."""
    for i in range(40):
        ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
        first = keyed_reconciler(ray, clock, ReputationPlacer(seed_key=SEED_KEY))
        second = keyed_reconciler(ray, clock, ReputationPlacer(seed_key=SEED_KEY + b"-other-process"))
        body = replicated(f"job-{i}")
        ids, late = await placed_twice(first, second, ray, clock, body)
        if len(ids) != 2 or late.status["scheduling"]["copies"] != 1:
            continue
        first_body = copy.deepcopy(body)  # the first placement: Scheduled, 2 copies running in Ray
        assert first_body["status"]["phase"] == "Scheduled", first_body["status"]
        server = merge_patch(body["status"], late.status)  # the late placement lands: 1 copy
        volunteers_now = trusted_volunteers(ray.present)
        behind = await second.reconcile(copy.deepcopy(first_body), {}, volunteers_now)
        server = merge_patch(server, behind.status)
        assert server["phase"] == "Running" and server["scheduling"]["copies"] == 1, server
        body["status"] = server  # the watch catches up; the Scheduled body was never acted on
        for _ in range(5):
            clock.advance(40)
            await step(second, body, volunteers_now)
        assert attempt_ids(body["status"]) == ids[:1]
        assert ray.jobs[ids[1]].state is RayJobState.STOPPED, (ids[1], ray.jobs[ids[1]].state)
        return
    raise AssertionError("no job drew 2 copies and then 1")


class RestartedAgentRay(CopiesRay):
    """vn-a's agent restarted: the same volunteer (name, address) back as a new Ray node."""

    restarted = False

    async def nodes(self) -> list[RayNodeInfo]:
        if not self.restarted:
            return await super().nodes()
        labels = {"koinon.dev/node": "vn-a"}
        return [RayNodeInfo("r-new", node_address("vn-a"), True, False, {"GPU": 1, "CPU": 4}, labels)]


async def test_a_single_copy_that_ran_on_its_volunteers_restarted_ray_node_fails_over_uncounted() -> None:
    """The driver is pinned to the volunteer's address; after its agent restarted (before a pass
    saw the copy running) Ray ran it there on a new Ray node id. Taken for a misplaced driver, the
    job failed as DriverMisplaced, counted (with backoffLimit 0: Failed), for an honest restart."""
    ray, clock = RestartedAgentRay(["vn-a"]), Clock()
    rec, body = reconciler(ray, clock), make_body({"entrypoint": "python x.py", "backoffLimit": 0})
    [submission] = await until_submitted(rec, ray, clock, body)
    ray.restarted = True
    ray.jobs[submission] = RayJobInfo(submission, RayJobState.SUCCEEDED, "", "r-new", 1, 2, 0)
    ray.logs_by_id[submission] = GOOD
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert (status["phase"], status["reason"], status.get("failures", 0)) == ("Pending", "NodeLost", 0), status
    assert status["scheduling"]["lostNodes"] == ["vn-a"]
    assert "result" not in status and ("vn-a", "success") not in outcome.reputation


Landed = tuple[Any, Clock, Any, dict[str, Any], list[str]]


async def late_placement_landed(edit: Callable[[dict[str, Any]], None]) -> Landed:
    """The first placement ran 2 copies; a late pass on an older body placed the attempt again
    with 1, and its write landed; then ``edit`` (before any pass swept for left-over copies)."""
    for i in range(40):
        ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
        first = keyed_reconciler(ray, clock, ReputationPlacer(seed_key=SEED_KEY))
        second = keyed_reconciler(ray, clock, ReputationPlacer(seed_key=SEED_KEY + b"-other-process"))
        body = replicated(f"job-{i}")
        ids, late = await placed_twice(first, second, ray, clock, body)
        if len(ids) != 2 or late.status["scheduling"]["copies"] != 1:
            continue
        body["status"] = merge_patch(body["status"], late.status)
        edit(body)
        return ray, clock, second, body, ids
    raise AssertionError("no job drew 2 copies and then 1")


async def test_a_suspend_before_any_sweep_stops_the_copy_a_late_placement_left_over() -> None:
    def suspend(body: dict[str, Any]) -> None:
        body["spec"]["suspend"] = True

    ray, clock, second, body, ids = await late_placement_landed(suspend)
    for _ in range(3):
        clock.advance(40)
        await step(second, body, trusted_volunteers(ray.present))
    assert body["status"]["phase"] == "Suspended", body["status"]
    assert [ray.jobs[i].state for i in ids] == [RayJobState.STOPPED, RayJobState.STOPPED]


async def test_a_delete_before_any_sweep_stops_the_copy_a_late_placement_left_over() -> None:
    ray, _, second, body, ids = await late_placement_landed(lambda body: None)
    assert await second.stop(copy.deepcopy(body))
    assert [ray.jobs[i].state for i in ids] == [RayJobState.STOPPED, RayJobState.STOPPED]
