"""The scheduler simulator follows the operator's rules for a verified job whose copy crashes or
whose node leaves, and for a revoked result (reconciler.py, verification.py, revocation.py): what
the benchmark measures is what the operator does."""

from __future__ import annotations

import heapq
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from koinon_operator.api.aijob import AIJobSpec
from koinon_operator.scheduler import KoinonPlacer, Revoke
from koinon_operator.verification import CopyResult, judge

from bench.scheduler.params import QUICK
from bench.scheduler.simulator import ARRIVE, LOST, TICK, Simulation


def _sim_with_a_two_copy_job() -> tuple[Simulation, int, list[int]]:
    params = replace(QUICK, nodes=60, jobs=20, warmup_h=0.0, adversary_share=0.0, churn_per_h=0.0)
    sim = Simulation(params, KoinonPlacer(), verify=True)
    while sim.events:
        t, _, kind, a, b = heapq.heappop(sim.events)
        sim.now = t
        if kind in (ARRIVE, TICK):
            {ARRIVE: sim._on_arrive, TICK: sim._on_tick}[kind](t, a, b)
        for index, job in sim.jobs.items():
            live = [e for e in job.running if sim.execs[e].live]
            if job.planned == 2 and len(live) == 2:
                return sim, index, sorted(live)
    raise AssertionError("no job placed with two copies")


def test_the_simulated_backoff_limit_is_the_aijob_default() -> None:
    default = next(f.default for f in fields(AIJobSpec) if f.name == "backoff_limit")
    assert QUICK.backoff_limit == default == 2


def test_operator_treats_a_crashed_copy_as_no_majority() -> None:
    assert not judge([CopyResult(0, "a", "alice", "X"), CopyResult(1, "b", "bob", None)]).accepted


def test_simulator_reruns_a_full_quorum_after_a_crashed_copy_as_the_operator_does() -> None:
    # Before: one replacement copy (quorum 1) was placed at once beside the survivor, whose answer
    # then counted; the operator waits for the survivor, finds no majority, and reruns a quorum.
    sim, index, (crashed, survivor) = _sim_with_a_two_copy_job()
    job = sim.jobs[index]
    a, b = sim.execs[crashed], sim.execs[survivor]
    sim._on_crash(sim.now, crashed, "")
    sim._on_requeue(sim.now + 30.0, index, "")
    assert index not in sim.pending and sim.execs[survivor].live  # waits for the other copy
    sim._on_done(sim.now + 60.0, survivor, "")
    request = sim.pending[index]
    assert request.verification_quorum == job.quorum == 2, request
    assert job.reruns == 1 and job.failures == 0 and index not in sim.accepted
    # On nodes and owners that took no part; the survivor's answer is judged with the rerun.
    assert {a.node, b.node} <= request.excluded_nodes and {a.owner, b.owner} <= request.excluded_owners
    assert [(c.node, c.digest) for c in job.earlier] == [(b.node, "ok")]
    assert request.least_copies == 1  # earlier answers kept: the coin may skip (as _place)


def test_the_third_vote_without_a_majority_fails_the_job() -> None:
    sim, index, (crashed, survivor) = _sim_with_a_two_copy_job()
    job = sim.jobs[index]
    job.reruns = sim.p.backoff_limit  # two reruns already
    sim._on_crash(sim.now, crashed, "")
    sim._on_requeue(sim.now + 30.0, index, "")
    sim._on_done(sim.now + 60.0, survivor, "")
    assert job.failed == "NoMajority" and index not in sim.pending and index not in sim.accepted
    metrics = sim._figures({index})
    assert metrics["failed_no_majority"] == 1 and metrics["unfinished"] == 1 and metrics["accepted"] == 0


def test_simulator_stops_the_other_copies_when_a_node_is_lost_as_the_operator_does() -> None:
    sim, index, (lost, other) = _sim_with_a_two_copy_job()
    job = sim.jobs[index]
    node = sim.nodes[sim.execs[lost].node]
    sim._on_down(sim.now, node.generation, node.v.name)
    # Noticed 30 s later (lost_detection_s): the operator's _node_lost.
    (notice,) = [e for e in sim.events if e[2] == LOST and e[3] == index]
    sim._on_lost(notice[0], index, notice[4])
    assert not sim.execs[other].live
    request = sim.pending[index]
    # Uncounted; the lost node is tried last, not left out, and the attempt keeps its copies.
    assert job.failures == 0 and job.reruns == 0 and not job.earlier
    assert node.v.name in request.excluded_nodes and node.v.name not in job.excluded_nodes
    assert job.lost_nodes == [node.v.name] and request.least_copies == 2


def test_an_answer_in_before_a_node_is_lost_is_thrown_away() -> None:
    sim, index, (lost, other) = _sim_with_a_two_copy_job()
    job = sim.jobs[index]
    sim._on_done(sim.now + 1.0, other, "")
    node = sim.nodes[sim.execs[lost].node]
    sim._on_down(sim.now + 2.0, node.generation, node.v.name)
    (notice,) = [e for e in sim.events if e[2] == LOST and e[3] == index]
    sim._on_lost(notice[0], index, notice[4])
    assert index in sim.pending and index not in sim.accepted and not job.earlier
    assert sim.job_work.get((index, "discarded"), 0.0) > 0.0


def test_a_revoked_result_is_flagged_not_rerun() -> None:
    # The operator's revocation.py sets ResultRevoked on a job that stays Succeeded; before, the
    # simulator put the job back to pending and counted its rerun's result instead.
    sim, index, (first, second) = _sim_with_a_two_copy_job()
    job = sim.jobs[index]
    sim._on_done(sim.now + 1.0, first, "")
    sim._on_done(sim.now + 2.0, second, "")
    assert job.done and index in sim.accepted
    owners = {r.owner for r in job.vouchers.values()}
    sim._revoke_vouched_by(owners, sim.now + 3.0)
    assert job.revoked and job.done and index in sim.accepted and index not in sim.pending
    assert not any(sim.execs[e].live for e in job.running)
    metrics = sim._figures({index})
    assert metrics["accepted"] == 1 and metrics["standing"] == 0 and metrics["correct_rate"] == 1.0


def test_correctness_is_reported_at_acceptance_and_for_results_that_stand() -> None:
    params = replace(
        QUICK, nodes=100, jobs=600, adversary_share=0.3, sleeper_share=1.0, arrival_window_h=5.0, horizon_h=12.0
    )
    sim = Simulation(params, KoinonPlacer(), verify=True)
    revoked: list[Revoke] = []
    real = sim._revoke

    def revoke(job: Any, action: Revoke, now: float) -> None:
        revoked.append(action)
        real(job, action, now)

    sim._revoke = revoke  # type: ignore[method-assign]
    m = sim.run()
    assert m["revoked"] > 0, "nothing revoked: the run tests nothing"
    assert len(revoked) >= m["revoked"]  # warm-up jobs are flagged too, and not counted
    assert m["accepted"] + m["unfinished"] == params.jobs
    assert m["failed"] == m["failed_backoff_limit"] + m["failed_no_majority"] <= m["unfinished"]
    assert m["standing"] == m["accepted"] - m["revoked"]
    assert m["wrong_standing"] == m["wrong_accepted"] - m["revoked_wrong"]
    # Revocation never changes what was accepted: a run without it accepts the same results.
    without = Simulation(params, KoinonPlacer(), verify=True)
    without.revocation = False
    n = without.run()
    assert n["accepted"] == m["accepted"] and n["wrong_accepted"] == m["wrong_accepted"] and n["revoked"] == 0
    assert n["completion_p95_s"] == m["completion_p95_s"]
