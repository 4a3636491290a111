"""A verified attempt is decided as soon as the copies that answered are a majority the others can
no longer overturn: a copy that never ends (its node alive, its driver running for ever) neither
keeps the job Running nor holds its nodes. The copies still running are stopped and count as no
answer, with no evidence either way: with a quorum of 3 the slowest honest copy would otherwise be
charged every time (a slower GPU punished for being one). Their work is still counted.

Reconciler passes against a fake Ray Job API (tests/aijob/fake_ray.py) and the real scheduler."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import AIJobReconciler, NodeWork
from koinon_operator.telemetry import JobIdGenerator, JobTracer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from .fake_ray import Clock, node_address, step, stop_stamped, volunteer
from .test_driver_node_check import DriverNodeRay
from .test_spot_check_coin import submit_all as submit_all_with
from .test_verification_rounds import (
    FORGED,
    GOOD,
    OWNERS,
    CopiesRay,
    LeavingRay,
    copies_ending,
    reconciler,
    replicated_job,
    run_copies,
    volunteers,
)


async def submit_all(
    rec: AIJobReconciler,
    ray: CopiesRay,
    clock: Clock,
    body: dict[str, Any],
    vols: dict[str, dict[str, Any]] | None = None,
) -> list[str]:
    """Passes until every copy of the attempt is submitted, with ``vols`` (by default the
    VolunteerNodes of the nodes present); their submission ids."""
    return await submit_all_with(rec, ray, clock, body, volunteers(ray.present) if vols is None else vols)


class StampingRay(CopiesRay):
    """Ray that stamps a stopped copy's end time, as Ray does."""

    def __init__(self, present: list[str], clock: Clock) -> None:
        super().__init__(present)
        self.clock = clock

    async def stop(self, submission_id: str) -> None:
        stop_stamped(self, submission_id, self.clock)


def started(ray: CopiesRay, clock: Clock, ids: list[str]) -> None:
    """Ray's start time for each copy (the fake's submit records none): their work is counted."""
    start_ms = int(clock.now.timestamp() * 1000)
    for sid in ids:
        # Ray names the driver's node as it starts it (the node the copy's driver is pinned to).
        driver = ray.driver_nodes.get(sid)
        ray.jobs[sid] = replace(
            ray.jobs[sid], state=RayJobState.RUNNING, start_time_ms=start_ms, end_time_ms=None, driver_node_id=driver
        )


def answered(ray: CopiesRay, clock: Clock, sid: str, log: str) -> None:
    ray.logs_by_id[sid] = log
    driver = ray.jobs[sid].driver_node_id or ray.driver_nodes.get(sid)  # named by a record whose driver ran
    ray.jobs[sid] = replace(
        ray.jobs[sid],
        state=RayJobState.SUCCEEDED,
        end_time_ms=int(clock.now.timestamp() * 1000),
        driver_exit_code=0,
        driver_node_id=driver,
    )


async def _two_agree_one_runs(clock: Clock) -> tuple[AIJobReconciler, StampingRay, dict[str, Any], list[str]]:
    """Quorum 3 on alice, carol and dave: alice's and carol's copies agree after 10 minutes;
    dave's copy runs on (its node alive)."""
    ray = StampingRay(["vn-a", "vn-c", "vn-d"], clock)
    rec = reconciler(ray, clock)
    body = replicated_job(quorum=3)
    ids = await submit_all(rec, ray, clock, body)
    assert len(ids) == 3 and body["status"]["assignedNodes"] == ["vn-a", "vn-c", "vn-d"]
    started(ray, clock, ids)
    await step(rec, body, volunteers(ray.present))
    assert body["status"]["phase"] == "Running"
    clock.advance(600)
    answered(ray, clock, ids[0], GOOD)
    answered(ray, clock, ids[1], GOOD)
    clock.advance(10)
    return rec, ray, body, ids


async def test_a_copy_that_never_ends_does_not_hold_a_decided_vote_forever() -> None:
    clock = Clock()
    rec, ray, body, ids = await _two_agree_one_runs(clock)
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Verified"), status["message"]
    assert status["result"]["value"] == "42"
    assert ray.jobs[ids[2]].state is RayJobState.STOPPED and ray.stopped == [ids[2]]  # not left running
    # dave's copy did not answer, and did nothing wrong: no evidence on him either way.
    assert sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-c", "agreement")]
    assert status["verification"]["agreeing"] == ["vn-a", "vn-c"]
    assert status["verification"]["stopped"] == ["vn-d"] and status["verification"]["failed"] == []
    # Each node worked until its copy ended; dave's until it was stopped in this pass.
    assert outcome.work == {
        "vn-a": NodeWork(600 / 3600, 600.0),
        "vn-c": NodeWork(600 / 3600, 600.0),
        "vn-d": NodeWork(610 / 3600, 610.0),
    }
    assert "CopiesStopped" in [e.reason for e in outcome.events]


async def test_a_vote_the_running_copy_could_still_turn_waits_for_it() -> None:
    """Quorum 3 with alice and carol disagreeing: dave's answer decides, so his copy runs on."""
    ray, clock = CopiesRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    ids = await submit_all(rec, ray, clock, body)
    started(ray, clock, ids)
    answered(ray, clock, ids[0], GOOD)
    answered(ray, clock, ids[1], FORGED)
    for _ in range(3):
        clock.advance(3600)
        outcome = await step(rec, body, volunteers(ray.present))
        assert body["status"]["phase"] == "Running" and outcome.reputation == [] and ray.stopped == []
    answered(ray, clock, ids[2], FORGED)
    clock.advance(10)
    outcome = await step(rec, body, volunteers(ray.present))
    assert body["status"]["reason"] == "Verified" and ("vn-a", "disagreement") in outcome.reputation


async def test_one_answer_of_two_decides_nothing() -> None:
    """Quorum 2: the other copy's answer is needed for any majority."""
    ray, clock = CopiesRay(["vn-a", "vn-c"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=2)
    ids = await submit_all(rec, ray, clock, body)
    started(ray, clock, ids)
    answered(ray, clock, ids[0], GOOD)
    for _ in range(3):
        clock.advance(3600)
        await step(rec, body, volunteers(ray.present))
    assert body["status"]["phase"] == "Running" and ray.stopped == []


async def test_earlier_answers_count_toward_an_early_decision() -> None:
    """After alice and bob split, the rerun (carol, dave, and bob's other node left out) is judged
    with their answers: carol's answer agreeing with alice's is 2 of the 5 owners, no majority;
    dave's too makes 3 of 5, whatever erin's copy returns."""
    ray, clock = CopiesRay(["vn-a", "vn-b"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=2)
    await run_copies(rec, ray, clock, body, {"vn-a": GOOD, "vn-b": FORGED})
    assert body["status"]["reason"] == "NoMajority"
    ray.present = ["vn-a", "vn-b", "vn-b2", "vn-c", "vn-d", "vn-e"]
    owners = {"vn-e": "erin"}
    vols = {**volunteers([n for n in ray.present if n != "vn-e"]),
            "vn-e": volunteer(owners["vn-e"], node_address("vn-e"), connected=True)}  # fmt: skip
    body["spec"]["verification"]["quorum"] = 3
    ids = await submit_all(rec, ray, clock, body, vols)
    assert sorted(body["status"]["assignedNodes"]) == ["vn-c", "vn-d", "vn-e"]
    started(ray, clock, ids)
    await step(rec, body, vols)
    by_node = dict(zip(body["status"]["assignedNodes"], ids, strict=True))
    answered(ray, clock, by_node["vn-c"], GOOD)
    clock.advance(10)
    await step(rec, body, vols)
    assert body["status"]["phase"] == "Running" and ray.stopped == []
    answered(ray, clock, by_node["vn-d"], GOOD)
    clock.advance(10)
    outcome = await step(rec, body, vols)
    assert body["status"]["reason"] == "Verified", body["status"]["message"]
    assert ray.stopped == [by_node["vn-e"]]
    assert ("vn-b", "disagreement") in outcome.reputation
    assert not [charge for charge in outcome.reputation if charge[0] == "vn-e"], outcome.reputation
    assert body["status"]["verification"]["stopped"] == ["vn-e"]


async def test_a_restart_between_the_stop_and_the_status_write_concludes_the_same() -> None:
    """The pass that decided stopped dave's copy, then the operator died before its status write:
    the next operator finds the copy STOPPED (or, Ray's stop being asynchronous, still RUNNING).
    Either way it concludes as decided: not a rerun of an interrupted attempt, no copy left
    running, and the same evidence (counted once by its outcome key)."""
    for still_running in (False, True):
        clock = Clock()
        rec, ray, body, ids = await _two_agree_one_runs(clock)
        crashed = await rec.reconcile(copy.deepcopy(body), {}, volunteers(ray.present))
        assert crashed.status["phase"] == "Succeeded"  # computed, never written
        if still_running:
            ray.jobs[ids[2]] = replace(ray.jobs[ids[2]], state=RayJobState.RUNNING, end_time_ms=None)
        clock.advance(5)
        outcome = await step(reconciler(ray, clock), body, volunteers(ray.present))
        assert (body["status"]["phase"], body["status"]["reason"]) == ("Succeeded", "Verified"), still_running
        assert ray.jobs[ids[2]].state is RayJobState.STOPPED
        assert (
            sorted(outcome.reputation) == sorted(crashed.reputation) == [("vn-a", "agreement"), ("vn-c", "agreement")]
        )
        assert body["status"]["verification"]["stopped"] == ["vn-d"]
        assert sorted(outcome.work) == ["vn-a", "vn-c", "vn-d"]
        assert len(ray.submissions) == 3  # nothing ran again


async def test_the_trace_of_a_decided_vote_says_which_copy_was_stopped() -> None:
    provider = TracerProvider(id_generator=JobIdGenerator())
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = JobTracer(provider)
    clock = Clock()
    rec, ray, body, _ = await _two_agree_one_runs(clock)
    before = copy.deepcopy(body)
    outcome = await step(rec, body, volunteers(ray.present))
    tracer.record(before, outcome.status, [(e.type, e.reason, e.message) for e in outcome.events])
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {"aijob.CopiesStopped", "aijob.Verified", "ray.job", "aijob"} <= set(spans), sorted(spans)
    stopped = dict(spans["aijob.CopiesStopped"].attributes or {})
    assert "vn-d" in str(stopped["koinon.message"]) and stopped["koinon.nodes"] == "vn-a,vn-c,vn-d"
    root = dict(spans["aijob"].attributes or {})
    assert root["koinon.verification.agreeing"] == "vn-a,vn-c"
    assert root["koinon.verification.stopped"] == "vn-d", root  # neither agreeing nor failed
    assert dict(spans["aijob.Verified"].attributes or {})["koinon.verification.stopped"] == "vn-d"
    assert spans["aijob"].status.is_ok


async def test_an_answer_whose_log_may_be_incomplete_is_read_again_before_deciding() -> None:
    """carol's copy has just ended and its log has no result line yet (Ray reports SUCCEEDED before
    the driver's log is flushed): dave's copy is not stopped on alice's answer alone, and the next
    pass, with carol's result in the log, decides."""
    clock = Clock()
    ray = StampingRay(["vn-a", "vn-c", "vn-d"], clock)
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    ids = await submit_all(rec, ray, clock, body)
    started(ray, clock, ids)
    await step(rec, body, volunteers(ray.present))
    answered(ray, clock, ids[0], GOOD)
    clock.advance(600)
    answered(ray, clock, ids[1], "loading\n")
    outcome = await step(rec, body, volunteers(ray.present))
    assert body["status"]["phase"] == "Running" and ray.stopped == [] and outcome.reputation == []
    ray.logs_by_id[ids[1]] = "loading\n" + GOOD
    clock.advance(3)
    await step(rec, body, volunteers(ray.present))
    assert body["status"]["reason"] == "Verified" and ray.stopped == [ids[2]]


async def test_an_answer_the_conclusion_would_not_count_decides_nothing_early() -> None:
    """Quorum 5. Alice's and dave's copies answered on their own nodes; carol's copy answered too,
    but Ray ran its driver on alice's node, which the conclusion counts as no answer. Counted here,
    it made 3 of 5 owners: erin's and frank's copies were stopped for a vote the conclusion then
    found undecided (2 of 5), and the job ran again. It decides once erin's answer makes 3, and
    frank's copy, still running, is stopped with no evidence on him."""
    names = ["vn-a", "vn-c", "vn-d", "vn-e", "vn-f"]
    ray, clock = DriverNodeRay(names), Clock()
    owners = {**OWNERS, "vn-e": "erin", "vn-f": "frank"}
    vols = {n: volunteer(owners[n], node_address(n), connected=True) for n in names}
    rec, body = reconciler(ray, clock), replicated_job(quorum=5)
    ids = await submit_all_with(rec, ray, clock, body, vols)
    status = body["status"]
    by_node = dict(zip(status["assignedNodes"], ids, strict=True))
    ray_ids = dict(zip(status["assignedNodes"], status["rayNodeIds"], strict=True))
    for sid in ids:
        ray.set_state(sid, RayJobState.RUNNING)
    ray.ended(by_node["vn-a"], ray_ids["vn-a"], GOOD)
    ray.ended(by_node["vn-c"], ray_ids["vn-a"], GOOD)  # carol's copy, its driver on alice's node
    ray.ended(by_node["vn-d"], ray_ids["vn-d"], GOOD)
    for _ in range(3):
        clock.advance(40)
        outcome = await step(rec, body, vols)
        assert body["status"]["phase"] == "Running", body["status"]["message"]
        assert ray.stopped == [] and outcome.reputation == []
    ray.ended(by_node["vn-e"], ray_ids["vn-e"], GOOD)
    clock.advance(40)
    outcome = await step(rec, body, vols)
    verification = body["status"]["verification"]
    assert body["status"]["reason"] == "Verified", body["status"]["message"]
    assert ray.stopped == [by_node["vn-f"]] and verification["stopped"] == ["vn-f"]
    assert verification["agreeing"] == ["vn-a", "vn-d", "vn-e"] and verification["failed"] == ["vn-c"]
    assert sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-d", "agreement"), ("vn-e", "agreement")]


async def test_a_decided_vote_is_concluded_though_the_running_copys_node_left() -> None:
    """dave's node leaves while his copy runs, after alice's and carol's answers decided the vote:
    the vote stands (not a failover that runs every copy again), and his copy, which the vote no
    longer needs, is stopped like any other, with no evidence on him."""
    clock = Clock()
    rec, ray, body, ids = await _two_agree_one_runs(clock)
    ray.present = ["vn-a", "vn-c"]
    outcome = await step(rec, body, volunteers(["vn-a", "vn-c", "vn-d"]))
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Verified"), status["message"]
    assert ray.stopped == [ids[2]] and status["verification"]["stopped"] == ["vn-d"]
    assert sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-c", "agreement")]


async def test_a_decided_vote_stands_when_a_failed_copy_and_a_stopped_copys_departure_meet() -> None:
    """The node of a copy stopped for a decided vote left, and another copy had crashed: the crash
    was blamed on the departure, and the decided vote went back to a rerun of every copy."""
    names = ["vn-a", "vn-c", "vn-d", "vn-e", "vn-f"]
    clock = Clock()
    ray = StampingRay(names, clock)
    owners = {**OWNERS, "vn-e": "erin", "vn-f": "frank"}

    def vols(present: list[str]) -> dict[str, Any]:
        return {n: volunteer(owners[n], node_address(n), connected=True) for n in present}

    rec, body = reconciler(ray, clock), replicated_job(quorum=5)
    ids = await submit_all_with(rec, ray, clock, body, vols(names))
    by_node = dict(zip(body["status"]["assignedNodes"], ids, strict=True))
    assert sorted(by_node) == names
    started(ray, clock, ids)
    await step(rec, body, vols(names))
    assert body["status"]["phase"] == "Running"
    clock.advance(600)
    for node in ("vn-a", "vn-c", "vn-d"):  # 3 of 5 owners agree: decided whatever the others say
        ray.logs_by_id[by_node[node]] = GOOD
        ray.set_state(by_node[node], RayJobState.SUCCEEDED, exit_code=0)
    ray.set_state(by_node["vn-e"], RayJobState.FAILED, exit_code=None, message="raylet died")  # erin's copy crashed
    ray.present = ["vn-a", "vn-c", "vn-d", "vn-e"]  # frank's node leaves while his copy runs (last: ids keep)
    clock.advance(10)
    outcome = await step(rec, body, vols(names))
    status = body["status"]
    assert by_node["vn-f"] in ray.stopped  # the decision stopped frank's copy, and keeps the vote
    assert (status["phase"], status.get("reason")) == ("Succeeded", "Verified"), status.get("message")
    assert ("vn-a", "agreement") in outcome.reputation


async def test_a_node_that_left_after_its_copy_answered_does_not_undo_a_decided_vote() -> None:
    """alice's and carol's copies agree (2 of 3 owners: decided) and dave's failed without an exit
    code of the job's own; then alice's agent drained, as a node whose copy has ended may (its
    answer already had). Her node was taken for lost mid-attempt because some copy had failed: the
    decided vote was thrown away for a rerun of every copy, alice charged a timeout, and dave's
    failure, on a node still there, charged to nobody."""
    ray, clock = LeavingRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    await copies_ending(rec, ray, clock, body, {"vn-a": "good", "vn-c": "good", "vn-d": "crashed"})
    ray.gone = {"vn-a"}
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Verified"), status["message"]
    assert sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-c", "agreement"), ("vn-d", "failure")]


async def test_a_copy_that_failed_as_its_node_left_still_sends_the_attempt_back() -> None:
    """The failure is the loss's when the failed copy is the lost node's: that node is charged a
    timeout (not a failure), and the attempt fails over uncounted; alice, whose copy answered and
    whose node is still there, is charged nothing."""
    ray, clock = LeavingRay(["vn-a", "vn-c", "vn-d"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=3)
    await copies_ending(rec, ray, clock, body, {"vn-a": "good", "vn-c": "crashed", "vn-d": "crashed"})
    ray.gone = {"vn-a", "vn-d"}  # vn-a went home after answering; vn-d's copy failed as it left
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Pending", "NodeLost"), status["message"]
    assert outcome.reputation == [("vn-d", "timeout")]
    assert status["scheduling"]["lostNodes"] == ["vn-d"]
