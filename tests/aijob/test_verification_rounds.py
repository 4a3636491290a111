"""Replicated jobs whose copies give no majority: nobody is charged a disagreement until a later
attempt decides, the rerun goes to fresh owners, and the attempts are judged together.

Reconciler passes against a fake Ray Job API (tests/aijob/fake_ray.py) and the real scheduler."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from koinon_operator.api.aijob import AIJobStatus
from koinon_operator.inventory import RayNodeCache
from koinon_operator.ray_jobs import RayJobState, RayNodeInfo, RayUnavailableError, Submission
from koinon_operator.reconciler import AIJobReconciler, Outcome, copy_submission_id, copy_submission_id_from
from koinon_operator.scheduling import ReputationPlacer
from koinon_operator.verification import CopyResult, judge

from .fake_ray import UID, Clock, FakeRay, make_body, no_nonce, node_address, step, stop_stamped, volunteer

OWNERS = {"vn-a": "alice", "vn-b": "bob", "vn-b2": "bob", "vn-c": "carol", "vn-d": "dave"}
GOOD, FORGED = "KOINON_RESULT 42\n", "KOINON_RESULT forged\n"
# The skip coin's key (the operator derives one from its Secret): fixed, so which jobs on
# trusted nodes are spot-checked is the same on every run.
SEED_KEY = b"koinon tests"


def ray_node(index: int, name: str) -> RayNodeInfo:
    return RayNodeInfo(f"r{index}", node_address(name), True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": name})


class CopiesRay(FakeRay):
    """Ray with the volunteers in ``present``; each submission's log is the one set for it."""

    def __init__(self, present: list[str]) -> None:
        super().__init__()
        self.present = present
        self.logs_by_id: dict[str, str] = {}

    async def nodes(self) -> list[RayNodeInfo]:
        return [ray_node(i, name) for i, name in enumerate(self.present)]

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        return self.logs_by_id.get(submission_id, GOOD)


def volunteers(names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: volunteer(OWNERS[n], node_address(n), connected=True) for n in names}


def reconciler(
    ray: CopiesRay, clock: Clock, seed_key: bytes = SEED_KEY, nonce: Callable[[str, int], str] = no_nonce
) -> AIJobReconciler:
    fake: Any = ray
    return AIJobReconciler(
        ray=fake,
        placer=ReputationPlacer(clock=lambda: clock.now.timestamp(), seed_key=seed_key),
        nodes=RayNodeCache(fake, max_age_seconds=0.0),
        clock=lambda: clock.now,
        monotonic=lambda: clock.mono,
        submission_nonce=nonce,
    )


async def run_copies(
    rec: AIJobReconciler,
    ray: CopiesRay,
    clock: Clock,
    body: dict[str, Any],
    answers: dict[str, str | None],
    vols: dict[str, dict[str, Any]] | None = None,
) -> Outcome:
    """Passes until the attempt's copies are submitted, then each copy ends as ``answers`` says for
    its node (a log line, or None: the copy failed); returns the pass that judges them."""
    vols = vols if vols is not None else volunteers(ray.present)
    for _ in range(10):
        await step(rec, body, vols)
        clock.advance(40)
        status = body["status"]
        nodes = status.get("assignedNodes") or []
        ids = [copy_submission_id_from(status.get("submissionId"), k) for k in range(len(nodes))]
        if nodes and all(i in ray.jobs for i in ids):
            break
    else:
        raise AssertionError(f"copies never submitted: {body['status']}")
    for node, submission in zip(nodes, ids, strict=True):
        assert submission is not None
        answer = answers[node]
        if answer is None:
            ray.set_state(submission, RayJobState.FAILED)
        else:
            ray.logs_by_id[submission] = answer
            ray.set_state(submission, RayJobState.SUCCEEDED)
    return await step(rec, body, vols)


def replicated_job(quorum: int = 2) -> dict[str, Any]:
    return make_body({"entrypoint": "python x.py", "verification": {"mode": "replicated", "quorum": quorum}})


def test_a_copy_is_no_dissenter_when_there_is_no_majority() -> None:
    crashed = judge([CopyResult(0, "vn-a", "alice", "sha256:good"), CopyResult(1, "vn-b", "bob", None)])
    assert not crashed.accepted and crashed.disagreeing == () and crashed.failed == ("vn-b",)
    split = judge([CopyResult(0, "vn-a", "alice", "sha256:good"), CopyResult(1, "vn-b", "bob", "sha256:bad")])
    assert not split.accepted and split.disagreeing == ()


def test_earlier_answers_count_with_a_later_attempt() -> None:
    earlier = [CopyResult(-1, "vn-a", "alice", "sha256:good"), CopyResult(-1, "vn-b", "bob", "sha256:bad")]
    now = [CopyResult(0, "vn-c", "carol", "sha256:good"), CopyResult(1, "vn-d", "dave", "sha256:good")]
    verdict = judge(now, earlier)
    assert verdict.accepted_digest == "sha256:good"
    assert verdict.agreeing == ("vn-a", "vn-c", "vn-d") and verdict.disagreeing == ("vn-b",)
    # One good answer more is no majority of the four owners that answered.
    assert not judge([*now[:1], CopyResult(1, "vn-d", "dave", None)], earlier).accepted


async def test_a_partner_that_crashes_costs_the_honest_copy_nothing() -> None:
    ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
    body = replicated_job()
    outcome = await run_copies(reconciler(ray, clock), ray, clock, body, {"vn-a": GOOD, "vn-c": None})
    assert body["status"]["reason"] == "NoMajority"
    assert outcome.reputation == [("vn-c", "failure")]  # vn-a used to get a disagreement


async def test_a_liar_without_majority_is_caught_by_the_next_attempt_on_fresh_owners() -> None:
    ray, clock = CopiesRay(["vn-a", "vn-b"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job()
    first = await run_copies(rec, ray, clock, body, {"vn-a": GOOD, "vn-b": FORGED})
    status = body["status"]
    assert status["reason"] == "NoMajority" and first.reputation == []  # both used to be charged
    assert status["scheduling"]["excludedOwners"] == ["alice", "bob"]
    assert {r["node"] for r in status["verification"]["earlierResults"]} == {"vn-a", "vn-b"}
    # bob's other node is left out of the rerun; carol and dave take it and agree with alice.
    ray.present = ["vn-a", "vn-b", "vn-b2", "vn-c", "vn-d"]
    second = await run_copies(rec, ray, clock, body, {"vn-c": GOOD, "vn-d": GOOD, "vn-b2": FORGED})
    status = body["status"]
    assert sorted(status["assignedNodes"]) == ["vn-c", "vn-d"]
    assert status["phase"] == "Succeeded" and status["reason"] == "Verified"
    assert status["result"]["value"] == "42"
    assert sorted(second.reputation) == [
        ("vn-a", "agreement"),
        ("vn-b", "disagreement"),
        ("vn-c", "agreement"),
        ("vn-d", "agreement"),
    ]
    assert status["verification"]["disagreeing"] == ["vn-b"]


async def test_a_rerun_never_goes_to_another_node_of_an_owner_that_took_part() -> None:
    ray, clock = CopiesRay(["vn-a", "vn-b"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job()
    await run_copies(rec, ray, clock, body, {"vn-a": GOOD, "vn-b": FORGED})
    ray.present = ["vn-a", "vn-b", "vn-b2", "vn-c"]  # only one fresh owner: no rerun can be placed
    vols = volunteers(ray.present)
    for _ in range(3):
        await step(rec, body, vols)
        clock.advance(40)
    assert body["status"]["reason"] == "Unschedulable", body["status"]
    assert not body["status"].get("assignedNodes")


def test_a_hand_edited_earlier_result_is_skipped() -> None:
    from koinon_operator.api.aijob import AIJobStatus

    raw = {"verification": {"earlierResults": [{"node": "vn-a", "owner": "alice", "digest": "d"}, {"node": 3}, "x"]}}
    assert AIJobStatus.from_status(raw).earlier_results == (("vn-a", "alice", "d"),)
    assert AIJobStatus.from_status({"verification": {"earlierResults": "junk"}}).earlier_results == ()


def with_trusted(names: list[str], trusted: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    vols = volunteers(names)
    for name in trusted:
        vols[name]["status"]["reputation"] = {"consecutiveValid": 50, "successes": 50}
    return vols


async def test_a_rerun_on_trusted_nodes_is_judged_with_the_earlier_answers() -> None:
    """Trusted nodes may skip replication (this job's coin gives the rerun one copy): that copy
    alone used to decide, unchecked against the earlier answers (a third digest was accepted and
    the forger never charged)."""
    ray, clock = CopiesRay(["vn-a", "vn-b"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job()
    await run_copies(rec, ray, clock, body, {"vn-a": GOOD, "vn-b": FORGED})
    ray.present = ["vn-a", "vn-b", "vn-c", "vn-d"]
    vols = with_trusted(ray.present, ("vn-c", "vn-d"))
    third = "KOINON_RESULT third\n"
    await run_copies(rec, ray, clock, body, {"vn-c": third, "vn-d": third}, vols)
    status = body["status"]
    assert status["scheduling"]["copies"] == 1  # the skip was drawn
    assert (status["phase"], status["reason"]) == ("Pending", "NoMajority"), status
    assert len(status["verification"]["earlierResults"]) == 3


async def test_one_trusted_copy_agreeing_with_an_earlier_answer_decides_and_catches_the_forger() -> None:
    """Quorum 2 after alice (good) and bob (forged): one fresh owner agreeing with alice makes 2 of
    3. Asking for two fresh owners here would leave the job Pending for as long as carol is the
    only one."""
    ray, clock = CopiesRay(["vn-a", "vn-b"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job()
    await run_copies(rec, ray, clock, body, {"vn-a": GOOD, "vn-b": FORGED})
    ray.present = ["vn-a", "vn-b", "vn-c"]
    outcome = await run_copies(rec, ray, clock, body, {"vn-c": GOOD}, with_trusted(ray.present, ("vn-c",)))
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Verified"), status
    assert status["message"].startswith("attempt 2: 1/1 copies agree, with 1 earlier answer")
    assert sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-b", "disagreement"), ("vn-c", "agreement")]


class FlakyCopiesRay(CopiesRay):
    """Refuses the first submission of the ids in ``flaky`` as a restarting dashboard does."""

    def __init__(self, present: list[str], flaky: set[str]) -> None:
        super().__init__(present)
        self.flaky = flaky

    async def submit(self, submission: Submission) -> bool:
        if submission.submission_id in self.flaky:
            self.flaky.discard(submission.submission_id)
            raise RayUnavailableError("dashboard restarting")
        return await super().submit(submission)


async def test_copies_of_one_attempt_never_run_different_programs() -> None:
    """Copies go out one by one: one refused for a moment and the entrypoint edited before its
    retry ran the new program beside the old, and the copies were judged against each other (an
    honest volunteer outvoted and charged a disagreement). The edit now starts a new attempt,
    uncounted, whose copies all run the new spec."""
    ray = FlakyCopiesRay(["vn-a", "vn-b", "vn-c"], {copy_submission_id(UID, 1, 2)})
    clock = Clock()
    rec = reconciler(ray, clock)
    vols = volunteers(ray.present)
    body = make_body({"entrypoint": "python v1.py", "verification": {"mode": "replicated", "quorum": 3}})
    await step(rec, body, vols)  # placed: 3 copies
    clock.advance(40)
    await step(rec, body, vols)  # copies 0 and 1 submitted; copy 2 refused for now
    assert body["status"]["scheduling"]["copies"] == 3
    body["spec"]["entrypoint"] = "python v2.py"
    body["metadata"]["generation"] = 2
    for _ in range(4):
        clock.advance(40)
        await step(rec, body, vols)
    by_attempt: dict[str, set[str]] = {}
    for submission in ray.submissions:
        attempt = submission.submission_id.split(f"{UID}-")[1].split("-")[0]
        by_attempt.setdefault(attempt, set()).add(submission.entrypoint)
    assert all(len(entrypoints) == 1 for entrypoints in by_attempt.values()), by_attempt
    assert by_attempt["2"] == {"python v2.py"}
    assert body["status"]["failures"] == 0  # the edit is nobody's failure
    assert {copy_submission_id(UID, 1, 0), copy_submission_id(UID, 1, 1)} <= set(ray.stopped)


FOUR_OWNERS = {"vn-a": "alice", "vn-b": "bob", "vn-c": "carol", "vn-d": "dave"}


def _four_owner_volunteers(names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: volunteer(FOUR_OWNERS[n], node_address(n), connected=True) for n in names}


async def test_after_an_edit_the_old_programs_answers_are_not_judged_with_the_new() -> None:
    """A split vote's answers were kept for the next attempt even when an edit made it run another
    program: honest copies of v2 were outvoted by v1's answers (NoMajority 2 vs 1 vs 1)."""
    ray = FlakyCopiesRay(["vn-a", "vn-b"], {copy_submission_id(UID, 2, 1)})
    clock = Clock()
    rec, body = reconciler(ray, clock), replicated_job()
    await run_copies(rec, ray, clock, body, {"vn-a": GOOD, "vn-b": FORGED}, _four_owner_volunteers(ray.present))
    assert body["status"]["reason"] == "NoMajority"
    ray.present = ["vn-a", "vn-b", "vn-c", "vn-d"]
    v = _four_owner_volunteers(ray.present)
    await step(rec, body, v)  # attempt 2 placed on carol and dave
    clock.advance(40)
    await step(rec, body, v)  # copy 0 submitted, copy 1 refused for now
    assert body["status"]["attempts"] == 2 and body["status"]["phase"] == "Scheduled", body["status"]
    body["spec"]["entrypoint"] = "python v2.py"  # v2 prints 43, honestly
    body["metadata"]["generation"] = 2
    v2 = "KOINON_RESULT 43\n"
    for _ in range(8):
        clock.advance(40)
        await step(rec, body, v)
        status = body["status"]
        nodes = status.get("assignedNodes") or []
        ids = [copy_submission_id_from(status.get("submissionId"), k) or "" for k in range(len(nodes))]
        if status.get("attempts") == 3 and nodes and all(i in ray.jobs for i in ids):
            break
    assert body["status"]["attempts"] == 3, body["status"]
    for sid in ids:
        ray.logs_by_id[sid] = v2
        ray.set_state(sid, RayJobState.SUCCEEDED)
    outcome = await step(rec, body, v)
    status = body["status"]
    # Every copy of v2 agrees: the job should be Verified with 43, and nobody charged for a v1 answer.
    assert (status["phase"], status.get("result", {}).get("value")) == ("Succeeded", "43"), (
        status["reason"], status["message"], status.get("verification"), outcome.reputation,
    )  # fmt: skip


def test_judge_can_accept_an_answer_only_earlier_attempts_gave() -> None:
    """Earlier failures are not owners of a later vote: alice and bob agreeing are 2 of the 3 owners
    that answered once tom's rerun dissents, though no copy of tom's attempt agrees."""
    earlier = [CopyResult(-1, "vn-a", "alice", "sha256:x"), CopyResult(-1, "vn-b", "bob", "sha256:x")]
    verdict = judge([CopyResult(0, "vn-t", "tom", "sha256:y")], earlier)
    assert verdict.accepted_digest == "sha256:x" and verdict.agreeing == ("vn-a", "vn-b")
    assert verdict.disagreeing == ("vn-t",)


# Four owners for a vote of quorum 4, and tom, trusted enough to be drawn alone for the rerun.
TOM_OWNERS = {"vn-a": "alice", "vn-b": "bob", "vn-c": "carol", "vn-d": "dave", "vn-t": "tom"}


def _tom_volunteers(names: list[str]) -> dict[str, dict[str, Any]]:
    vols = {n: volunteer(TOM_OWNERS[n], node_address(n), connected=True) for n in names}
    if "vn-t" in vols:
        vols["vn-t"]["status"]["reputation"] = {"consecutiveValid": 50, "successes": 50, "agreements": 50}
    return vols


async def _alice_and_bob_agree(ray: CopiesRay, clock: Clock) -> dict[str, Any]:
    """Quorum 4: alice and bob answer 42, carol's and dave's copies fail (2 of 4 owners: no majority)."""
    body = replicated_job(quorum=4)
    first = {"vn-a": GOOD, "vn-b": GOOD, "vn-c": None, "vn-d": None}
    await run_copies(reconciler(ray, clock), ray, clock, body, first, _tom_volunteers(ray.present))
    assert body["status"]["reason"] == "NoMajority", body["status"]
    return body


async def _tom_alone(
    ray: CopiesRay, clock: Clock, body: dict[str, Any], tom: str | None
) -> tuple[dict[str, Any], Outcome]:
    """The rerun goes to tom alone (a skip drawn for a trusted node), who answers ``tom`` (None: his
    copy fails). Returns the job and the pass that judged tom's attempt."""
    ray.present = [*ray.present, "vn-t"]
    vols = _tom_volunteers(ray.present)
    for k in range(50):  # a key of the skip coin that leaves tom's attempt one copy
        placed = copy.deepcopy(body)
        rec = reconciler(ray, clock, seed_key=f"key{k}".encode())
        await step(rec, placed, vols)
        if placed["status"].get("assignedNodes") == ["vn-t"]:
            return placed, await run_copies(rec, ray, clock, placed, {"vn-t": tom}, vols)
    raise AssertionError("no skip drawn")


async def _alice_and_bob_then_tom_alone(tom: str | None) -> tuple[dict[str, Any], Outcome]:
    ray, clock = CopiesRay(["vn-a", "vn-b", "vn-c", "vn-d"]), Clock()
    return await _tom_alone(ray, clock, await _alice_and_bob_agree(ray, clock), tom)


async def test_the_answer_a_majority_of_earlier_answers_gave_is_kept_with_its_result() -> None:
    """What the job would report if a later vote accepts it, kept once (not for every answer:
    earlierResults grows with every rerun)."""
    body = await _alice_and_bob_agree(CopiesRay(["vn-a", "vn-b", "vn-c", "vn-d"]), Clock())
    kept = [r for r in body["status"]["verification"]["earlierResults"] if "result" in r]
    assert len(kept) == 1 and kept[0]["result"]["value"] == "42", body["status"]["verification"]
    assert kept[0]["result"]["digest"] == kept[0]["digest"]
    assert AIJobStatus.from_status(body["status"]).earlier_answers == {kept[0]["node"]: kept[0]["result"]}


async def test_a_majority_of_earlier_answers_alone_decides_a_rerun_whose_copy_dissents() -> None:
    """judge accepts alice's and bob's 42 (2 of the 3 owners that answered): the job used to run
    again as "no majority ... (owners per answer: none)", tom's wrong answer uncharged, and end
    NoMajority at the rerun limit though a majority existed."""
    body, outcome = await _alice_and_bob_then_tom_alone(FORGED)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Verified"), (status["message"], outcome.reputation)
    assert status["result"]["value"] == "42"
    assert status["message"].startswith("attempt 2: 0/1 copies agree, with 2 earlier answers"), status["message"]
    assert sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-b", "agreement"), ("vn-t", "disagreement")]
    assert status["verification"]["agreeing"] == ["vn-a", "vn-b"]
    assert status["verification"]["disagreeing"] == ["vn-t"]


async def test_a_majority_of_earlier_answers_alone_decides_a_rerun_whose_copy_fails() -> None:
    """The same vote with tom's copy failed: judge still accepts 42 (2 of 3 owners; a failed copy
    is an owner that did not agree), but the attempt was counted a failure and run again."""
    body, outcome = await _alice_and_bob_then_tom_alone(None)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Verified"), (status["message"], outcome.reputation)
    assert status["result"]["value"] == "42"
    assert sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-b", "agreement"), ("vn-t", "failure")]


async def test_an_earlier_majority_without_its_result_kept_succeeds_with_the_result_unavailable() -> None:
    """A status written before the result was kept (an older operator) names the accepted digest
    only: the job succeeds with it, and says that its value is not at hand."""
    ray, clock = CopiesRay(["vn-a", "vn-b", "vn-c", "vn-d"]), Clock()
    body = await _alice_and_bob_agree(ray, clock)
    for entry in body["status"]["verification"]["earlierResults"]:
        entry.pop("result", None)
    body, outcome = await _tom_alone(ray, clock, body, FORGED)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Verified"), status["message"]
    assert "unavailable" in status["result"] and status["result"]["digest"].startswith("sha256:")
    assert "ResultUnavailable" in [e.reason for e in outcome.events]
    assert ("vn-t", "disagreement") in outcome.reputation


async def test_result_less_copies_that_ended_together_settle_together() -> None:
    """Three copies, all SUCCEEDED at once, each log served without a KOINON_RESULT line (it is
    optional: the digest covers the whole log). Each copy's settle clock started only once the
    copies before it had settled (_answers stopped at the first unsettled one): the waits ran one
    after another, LOG_SETTLE_SECONDS and a poll per copy."""
    from koinon_operator.reconciler import LOG_SETTLE_SECONDS

    names = ["vn-a", "vn-c", "vn-d"]
    ray, clock = CopiesRay(names), Clock()
    rec = reconciler(ray, clock)
    body = replicated_job(quorum=3)
    await run_copies(rec, ray, clock, body, {n: "training done, loss 0.1\n" for n in names})
    waited, vols = 0.0, volunteers(names)
    while body["status"]["phase"] not in ("Succeeded", "Failed") and waited < 120:
        clock.advance(2)  # the operator's poll interval
        waited += 2
        await step(rec, body, vols)
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert waited <= LOG_SETTLE_SECONDS + 2, f"concluded {waited:.0f} s after the copies ended"


class LeavesAfterAPartialLog(CopiesRay):
    """The copy whose log is set to start with "leaver:" serves its log once, before the driver's
    last line is flushed, and its node then leaves (an agent's drain stops Ray within a second of
    its last task)."""

    partial_served = False

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        if not self.logs_by_id.get(submission_id, "").startswith("leaver:"):
            return await super().logs(submission_id, driver_node_id, lines)
        if self.partial_served:
            raise RayUnavailableError("job logs: 500 (its node is gone)")
        self.partial_served = True
        return "training\n"  # its log so far: "training done", as the others', not flushed yet


async def test_a_verified_copy_whose_node_left_before_its_log_settled_is_no_dissenter() -> None:
    """A result-less log (the digest covers the whole log) read on the first pass that found the
    copy SUCCEEDED may still miss the driver's last lines; LOG_SETTLE_SECONDS later it is read
    again. A node that left in between (an honest drain) has only that early text to show: taken
    as its answer, it disagreed with the others and its honest owner was charged a disagreement.
    Unsettled, it is no answer: the copy counts as gone."""
    names = ["vn-a", "vn-c", "vn-d"]
    ray, clock = LeavesAfterAPartialLog(names), Clock()
    rec = reconciler(ray, clock)
    body = replicated_job(quorum=3)
    answers: dict[str, str | None] = {n: "training\ntraining done\n" for n in names}
    answers["vn-d"] = "leaver:training\ntraining done\n"
    await run_copies(rec, ray, clock, body, answers)
    vols = volunteers(names)
    ray.present = ["vn-a", "vn-c"]  # vn-d's node left after serving its early log
    waited, reputation = 0.0, []
    while body["status"]["phase"] not in ("Succeeded", "Failed") and waited < 60:
        clock.advance(2)
        waited += 2
        reputation += (await step(rec, body, vols)).reputation
    assert ray.partial_served
    assert ("vn-d", "disagreement") not in reputation, reputation


class OneFlushesLateOneLeaves(CopiesRay):
    """vn-a's log ("late:") is first served before its result line is flushed; vn-d's ("leaver:")
    is served whole, result line and all, once: then its node leaves (an honest drain)."""

    late_served = False
    leaver_served = False

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        text = self.logs_by_id.get(submission_id, "")
        if text.startswith("late:") and not self.late_served:
            self.late_served = True
            return "late:training\n"
        if text.startswith("leaver:"):
            if self.leaver_served:
                raise RayUnavailableError("job logs: 500 (its node is gone)")
            self.leaver_served = True
        return await super().logs(submission_id, driver_node_id, lines)


@pytest.mark.parametrize("quorum", [2, 3])
async def test_a_whole_answer_read_while_another_copy_settles_is_kept_when_its_node_leaves(quorum: int) -> None:
    """vn-d's whole log (its KOINON_RESULT line in it) was served on the pass that found every
    copy SUCCEEDED, but vn-a's had no result line yet, so the pass waited for it to settle. vn-d's
    node then drained and left: its delivered answer was dropped (LOG_GONE) and the honest
    volunteer charged a timeout; with 2 copies there was no majority and the job ran again."""
    names = ["vn-a", "vn-d"] if quorum == 2 else ["vn-a", "vn-c", "vn-d"]
    ray, clock = OneFlushesLateOneLeaves(names), Clock()
    rec = reconciler(ray, clock)
    body = replicated_job(quorum=quorum)
    answers: dict[str, str | None] = {n: "other:training\n" + GOOD for n in names}
    answers["vn-a"], answers["vn-d"] = "late:training\n" + GOOD, "leaver:training\n" + GOOD
    reputation = list((await run_copies(rec, ray, clock, body, answers)).reputation)
    assert ray.late_served and ray.leaver_served
    ray.present = [n for n in names if n != "vn-d"]  # vn-d's node left after serving its whole log
    vols, waited = volunteers(names), 0.0
    while body["status"]["phase"] not in ("Succeeded", "Failed") and waited < 60:
        clock.advance(2)
        waited += 2
        reputation += (await step(rec, body, vols)).reputation
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert body["status"]["attempts"] == 1
    assert ("vn-d", "timeout") not in reputation, reputation


class LeavingRay(CopiesRay):
    """Ray whose volunteers in ``gone`` have left (the others keep their Ray node ids)."""

    def __init__(self, present: list[str]) -> None:
        super().__init__(present)
        self.gone: set[str] = set()

    async def nodes(self) -> list[RayNodeInfo]:
        return [ray_node(i, name) for i, name in enumerate(self.present) if name not in self.gone]


async def copies_ending(
    rec: AIJobReconciler, ray: CopiesRay, clock: Clock, body: dict[str, Any], ends: dict[str, str]
) -> None:
    """Passes until the attempt's copies are submitted, then each copy ends as ``ends`` says for its
    node: "good" (answers GOOD), "stopped" (by someone through the head's Job API: any volunteer
    can), "own" (its driver exited 1: the job's own failure) or "crashed" (failed without an exit
    code of its own: its volunteer's)."""
    vols = volunteers(ray.present)
    for _ in range(10):
        await step(rec, body, vols)
        clock.advance(40)
        status = body["status"]
        nodes = status.get("assignedNodes") or []
        ids = [copy_submission_id_from(status.get("submissionId"), k) or "" for k in range(len(nodes))]
        if nodes and all(i in ray.jobs for i in ids):
            break
    else:
        raise AssertionError(f"copies never submitted: {body['status']}")
    for node, submission in zip(nodes, ids, strict=True):
        end = ends[node]
        if end == "good":
            ray.logs_by_id[submission] = GOOD
            ray.set_state(submission, RayJobState.SUCCEEDED, exit_code=0)
        elif end == "stopped":
            ray.set_state(submission, RayJobState.STOPPED)
        elif end == "own":
            ray.set_state(submission, RayJobState.FAILED, exit_code=1, message="exit 1")
        else:
            ray.set_state(submission, RayJobState.FAILED, message="raylet died")


async def test_copies_another_volunteer_stopped_are_not_charged_for_its_own_exit() -> None:
    """dave stops alice's and carol's copies (`ray job stop` through the head) and exits his own
    with code 1, which is the job's failure and charged to nobody. The stopped copies gave no
    answer and did not fail: alice and carol were charged a failure each and put in failedNodes.
    The attempt still counts against backoffLimit, for the failure of the job's own it had (else
    dave could hold the job for ever)."""
    ray, clock = CopiesRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    await copies_ending(rec, ray, clock, body, {"vn-a": "stopped", "vn-c": "stopped", "vn-d": "own"})
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert outcome.reputation == [], (outcome.reputation, status.get("message"))
    assert (status["phase"], status["reason"], status["failures"]) == ("Pending", "BackOff", 1), status["message"]
    assert not status["scheduling"].get("failedNodes")


async def test_a_volunteer_that_stops_the_other_copies_is_still_charged_for_its_own_failure() -> None:
    """As above, but dave's copy failed without an exit code of the job's own: that failure is his,
    and stopping the others does not make the attempt an uncounted interruption that hides it."""
    ray, clock = CopiesRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    await copies_ending(rec, ray, clock, body, {"vn-a": "stopped", "vn-c": "stopped", "vn-d": "crashed"})
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert outcome.reputation == [("vn-d", "failure")], (outcome.reputation, status.get("message"))
    assert (status["reason"], status["failures"]) == ("BackOff", 1), status["message"]
    assert status["scheduling"]["failedNodes"] == ["vn-d"]


async def test_a_stopped_copy_is_no_answer_of_a_vote_without_majority() -> None:
    """alice's copy was stopped, carol's answered, dave's exited 1: alice was charged a failure. She
    gave no answer; carol's alone is no majority of three owners, so the attempt reruns on fresh
    owners with carol's answer kept, and nobody is charged."""
    ray, clock = CopiesRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    await copies_ending(rec, ray, clock, body, {"vn-a": "stopped", "vn-c": "good", "vn-d": "own"})
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert outcome.reputation == [], (outcome.reputation, status.get("message"))
    assert (status["reason"], status["verificationReruns"]) == ("NoMajority", 1), status["message"]
    assert status["verification"]["stopped"] == ["vn-a"] and status["verification"]["failed"] == ["vn-d"]
    assert [r["node"] for r in status["verification"]["earlierResults"]] == ["vn-c"]


async def test_copies_stopped_with_nothing_failed_and_no_decided_vote_run_again_uncounted() -> None:
    ray, clock = CopiesRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    await copies_ending(rec, ray, clock, body, {"vn-a": "stopped", "vn-c": "good", "vn-d": "stopped"})
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert outcome.reputation == []
    assert (status["phase"], status["reason"]) == ("Pending", "RayJobStopped"), status["message"]
    assert not status.get("failures") and not status.get("verificationReruns")


async def test_a_stopped_copys_node_that_went_home_is_not_charged_for_leaving() -> None:
    """alice's copy was stopped (by anyone: any volunteer can, through the head's Job API) and her
    node then left, as a node whose copy has ended may; carol's copy answered, dave's exited 1.
    Her node must not count as lost: charged a timeout, the attempt sent back."""
    ray, clock = LeavingRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    await copies_ending(rec, ray, clock, body, {"vn-a": "stopped", "vn-c": "good", "vn-d": "own"})
    ray.gone = {"vn-a"}
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert outcome.reputation == [], (outcome.reputation, status.get("message"))
    assert status["reason"] == "NoMajority", status["message"]
    assert not status["scheduling"].get("lostNodes")


async def running_copies(
    rec: AIJobReconciler, ray: CopiesRay, clock: Clock, body: dict[str, Any], vols: dict[str, dict[str, Any]]
) -> dict[str, str]:
    """Passes until every copy of the attempt is submitted and running; its node -> its id."""
    for _ in range(10):
        await step(rec, body, vols)
        clock.advance(40)
        status = body["status"]
        nodes = status.get("assignedNodes") or []
        ids = [copy_submission_id_from(status.get("submissionId"), k) or "" for k in range(len(nodes))]
        if nodes and all(i in ray.jobs for i in ids):
            break
    else:
        raise AssertionError(f"copies never submitted: {body['status']}")
    for sub in ids:
        ray.set_state(sub, RayJobState.RUNNING)
    await step(rec, body, vols)
    assert body["status"]["phase"] == "Running", body["status"]
    return dict(zip(nodes, ids, strict=True))


@pytest.mark.parametrize("own_copy", ["answers", "stopped an hour later"])
async def test_a_volunteer_that_stops_anothers_copy_cannot_have_it_charged_once_it_goes_home(own_copy: str) -> None:
    """Review repro (dsub2): carol stops alice's copy of their spot-checked job through the head's
    Job API and keeps her own running. An hour later alice, whose copy ended long ago, goes home
    (or her agent restarts as a new Ray node); then carol's copy ends, answering, or stopped by
    carol too. A copy found stopped on a node gone counted that node lost, whatever ran beside it:
    alice was charged a timeout and put in lostNodes. Only an attempt whose copies were all found
    stopped together (as _node_lost leaves one) counts it so."""
    ray, clock = LeavingRay(["vn-a", "vn-c"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=2)
    vols = volunteers(ray.present)
    by_node = await running_copies(rec, ray, clock, body, vols)
    stop_stamped(ray, by_node["vn-a"], clock)  # carol: `ray job stop` on alice's copy
    for _ in range(5):  # carol's copy runs on for an hour; alice is still there
        clock.advance(720)
        out = await step(rec, body, vols)
        assert out.reputation == [] and body["status"]["phase"] == "Running", body["status"]
    ray.gone = {"vn-a"}  # alice goes home: her copy ended an hour ago
    clock.advance(60)
    await step(rec, body, vols)
    assert body["status"]["phase"] == "Running", body["status"]
    if own_copy == "answers":
        ray.logs_by_id[by_node["vn-c"]] = GOOD
        ray.set_state(by_node["vn-c"], RayJobState.SUCCEEDED, exit_code=0)
    else:
        stop_stamped(ray, by_node["vn-c"], clock)
    outcome = await step(rec, body, vols)
    status = body["status"]
    assert outcome.reputation == [], (outcome.reputation, status.get("reason"), status.get("message"))
    assert not status["scheduling"].get("lostNodes"), status["scheduling"]
    assert (status["phase"], status["reason"]) == ("Pending", "RayJobStopped"), status["message"]


async def test_a_stopped_copys_node_still_there_is_not_charged() -> None:
    """As above with alice's node still there: her copy is no answer and no evidence, carol's
    answer alone is no majority of three owners, and nobody is charged."""
    ray, clock = LeavingRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    await copies_ending(rec, ray, clock, body, {"vn-a": "stopped", "vn-c": "good", "vn-d": "own"})
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert outcome.reputation == [], (outcome.reputation, status.get("message"))
    assert status["reason"] == "NoMajority", status["message"]


async def test_a_lost_node_is_still_lost_when_the_pass_that_stopped_its_attempt_is_replayed() -> None:
    """Review repro (dver1): vn-d leaves while its copy runs: the pass finds it lost mid-attempt,
    _node_lost stops the attempt's copies and writes NodeLost (vn-d charged a timeout, put in
    lostNodes). That status write is lost (the operator crashed, or lost its lease, right after the
    stops). The replayed pass found every copy stopped and took a stopped copy's node for never
    lost: RayJobStopped, vn-d neither charged nor tried last. It concludes NodeLost again."""
    ray, clock = LeavingRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    vols = volunteers(ray.present)
    ids: list[str] = []
    for _ in range(10):
        await step(rec, body, vols)
        clock.advance(40)
        status = body["status"]
        nodes = status.get("assignedNodes") or []
        ids = [copy_submission_id_from(status.get("submissionId"), k) or "" for k in range(len(nodes))]
        if nodes and all(i in ray.jobs for i in ids):
            break
    for sub in ids:
        ray.set_state(sub, RayJobState.RUNNING)
    await step(rec, body, vols)  # Running
    ray.gone = {"vn-d"}
    lost_pass = await rec.reconcile(copy.deepcopy(body), {}, vols)  # its status write is lost
    assert lost_pass.status.get("reason") == "NodeLost" and ("vn-d", "timeout") in lost_pass.reputation
    assert all(ray.jobs[s].state is RayJobState.STOPPED for s in ids)
    replay = await step(rec, body, vols)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Pending", "NodeLost"), (status["reason"], replay.reputation)
    assert replay.reputation == lost_pass.reputation  # the same evidence: recorded once (outcome key)
    assert status["scheduling"]["lostNodes"] == ["vn-d"]


async def test_after_a_spec_edit_the_nodes_of_the_old_programs_split_vote_are_tried_again() -> None:
    """A spec edit forgot the old program's answers and excluded owners but kept its split vote's
    nodes left out: on a fleet of only those nodes the fixed job waited Unschedulable for ever."""
    ray, clock = CopiesRay(["vn-a", "vn-b"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=2)
    body["spec"]["backoffLimit"] = 5
    await run_copies(rec, ray, clock, body, {"vn-a": GOOD, "vn-b": FORGED})
    assert body["status"]["reason"] == "NoMajority", body["status"]
    body["spec"]["entrypoint"] = "python fixed.py"
    body["metadata"]["generation"] = body["metadata"].get("generation", 1) + 1
    for _ in range(3):
        clock.advance(40)
        await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert not status["scheduling"].get("excludedOwners") and not status["scheduling"].get("excludedNodes")
    assert status["phase"] in ("Scheduled", "Running"), (status["phase"], status.get("message"))


async def _split_vote_then_backoff_limit(limit: int) -> tuple[dict[str, Any], CopiesRay]:
    """A replicated job whose copies split (one rerun so far), its backoffLimit then set to
    ``limit`` while it waits, with fresh owners for a rerun; its status three passes later."""
    ray, clock = CopiesRay(["vn-a", "vn-b"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=2)
    await run_copies(rec, ray, clock, body, {"vn-a": GOOD, "vn-b": FORGED})
    status = body["status"]
    assert (status["phase"], status["reason"], status["verificationReruns"]) == ("Pending", "NoMajority", 1)
    ray.present = ["vn-a", "vn-b", "vn-c", "vn-d"]
    body["spec"]["backoffLimit"] = limit
    body["metadata"]["generation"] = body["metadata"].get("generation", 1) + 1
    for _ in range(3):
        clock.advance(40)
        await step(rec, body, volunteers(ray.present))
    return body["status"], ray


async def test_lowering_backoff_limit_below_the_reruns_so_far_fails_a_waiting_replicated_job_at_once() -> None:
    """CRD: backoffLimit also bounds the reruns after copies without a majority. Lowered below
    status.failures while the job waits, it failed at once; below status.verificationReruns,
    another whole replicated attempt (quorum x replicas volunteers) was placed instead."""
    status, ray = await _split_vote_then_backoff_limit(0)
    assert (status["phase"], status["reason"]) == ("Failed", "NoMajority"), status
    assert "backoffLimit=0" in status["message"] and status["completionTime"]
    assert status["attempts"] == 1 and len(ray.jobs) == 2  # no rerun was placed


async def test_lowering_backoff_limit_to_the_reruns_so_far_leaves_the_last_rerun() -> None:
    status, _ = await _split_vote_then_backoff_limit(1)
    assert status["attempts"] == 2 and status["phase"] in ("Scheduled", "Running"), status
