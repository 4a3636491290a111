"""Koinon's newer rules: retroactive invalidation, trusted partner, reservation for waiting big jobs,
crash-rate-aware placement of long jobs."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    MAX_EXPECTED_DURATION_S,
    Gpu,
    JobRequest,
    KoinonPlacer,
    NodeResult,
    NodeSnapshot,
    RandomPlacer,
    ReputationEvidence,
    Revoke,
    from_status,
    recheck_accepted,
    record_work,
    schedule,
    to_status,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from koinon_operator.scheduler.placer import WAITING_FOR_TRUSTED

from bench.scheduler.params import QUICK
from bench.scheduler.simulator import Simulation

NOW = 50_000.0
RC = DEFAULT_CONFIG.reputation


def snap(
    name: str, gpus: int = 1, free: int | None = None, rtt: float = 20.0, ev: ReputationEvidence | None = None
) -> NodeSnapshot:
    return NodeSnapshot(
        name=name,
        owner=f"owner-{name}",
        region="eu",
        ready=True,
        cordoned=False,
        gpus=tuple(Gpu("g", 16384) for _ in range(gpus)),
        free_gpus=gpus if free is None else free,
        cpus_free=64.0,
        rtt_ms=rtt,
        rtt_updated_at=NOW,
        reputation=ev or ReputationEvidence(last_updated=NOW),
    )


# --- retroactive invalidation -----------------------------------------------------------------


def test_result_accepted_on_one_copy_of_a_caught_owner_is_revoked_and_rerun_with_a_full_quorum() -> None:
    single = {"n1": NodeResult("liar", "bad")}
    assert recheck_accepted(single, {"liar"}, quorum=2) == Revoke(keep=(), more_copies=2)


def test_result_confirmed_by_an_uncaught_owner_stands() -> None:
    pair = {"n1": NodeResult("sleeper", "ok"), "n2": NodeResult("honest", "ok")}
    assert recheck_accepted(pair, {"sleeper"}, quorum=2) is None


def test_result_whose_every_voucher_was_caught_is_revoked() -> None:
    colluders = {"n1": NodeResult("adv-1", "bad"), "n2": NodeResult("adv-2", "bad")}
    assert recheck_accepted(colluders, {"adv-1"}, quorum=2) is None  # adv-2 not caught yet
    assert recheck_accepted(colluders, {"adv-1", "adv-2"}, quorum=2) == Revoke(keep=(), more_copies=2)


def test_stricter_standing_support_keeps_the_clean_votes_and_asks_only_for_what_is_missing() -> None:
    pair = {"n1": NodeResult("sleeper", "ok"), "n2": NodeResult("honest", "ok")}
    assert recheck_accepted(pair, {"sleeper"}, quorum=2, standing_support=2) == Revoke(keep=("n2",), more_copies=1)


def test_results_of_owners_never_caught_are_never_revoked() -> None:
    assert recheck_accepted({"n1": NodeResult("trusted", "ok")}, {"someone-else"}, quorum=2) is None


@pytest.mark.parametrize(("quorum", "support"), [(0, 1), (2, 0), (2, 3)])
def test_recheck_rejects_bad_arguments(quorum: int, support: int) -> None:
    with pytest.raises(ValueError, match=r"quorum|standing_support"):
        recheck_accepted({}, set(), quorum=quorum, standing_support=support)


def test_simulated_revocation_flags_sleepers_lies_and_reruns_nothing() -> None:
    # Many sleepers that earn trust quickly and then lie: their lies on skipped (trusted,
    # unreplicated) jobs are accepted; once a spot check catches them, revocation flags those
    # results (ResultRevoked), as the operator does (revocation.py). Nothing reruns them (the
    # simulator used to, and counted the rerun's result instead), so a run with revocation accepts
    # exactly what one without it accepts, and fewer of the results that still stand are wrong.
    revoked_wrong = 0
    standing_with = correct_with = 0.0
    for seed in range(2, 4):  # two seeds whose sleepers get caught (seed 1: none is)
        params = replace(
            QUICK, nodes=100, jobs=600, adversary_share=0.3, sleeper_share=1.0, arrival_window_h=5.0, horizon_h=12.0
        )
        params = replace(params, seed=seed)
        with_revocation = Simulation(params, KoinonPlacer(), verify=True)
        without = Simulation(params, KoinonPlacer(), verify=True)
        without.revocation = False
        a, b = with_revocation.run(), without.run()
        assert b["revoked"] == 0 and b["standing_correct_rate"] == b["correct_rate"]
        assert a["accepted"] + a["unfinished"] == params.jobs
        assert (a["accepted"], a["wrong_accepted"], a["executions"]) == (
            b["accepted"],
            b["wrong_accepted"],
            b["executions"],
        )
        assert a["standing"] == a["accepted"] - a["revoked"]
        revoked_wrong += a["revoked_wrong"]
        standing_with += a["standing_correct_rate"]
        correct_with += a["correct_rate"]
    assert revoked_wrong > 0
    assert standing_with > correct_with


# --- pairing: an untrusted primary is checked by a trusted node ----------------------------------


def test_verification_copy_of_an_untrusted_primary_goes_to_a_trusted_node() -> None:
    # Same (empty) counts, so the same lower bound; only T has BOINC trust, and it is far away.
    nodes = [
        snap("a", rtt=5.0),
        snap("b", rtt=6.0),
        snap("t", rtt=290.0, ev=ReputationEvidence(consecutive_valid=12, last_updated=NOW)),
    ]
    job = JobRequest("ns/j", gpus_per_replica=1, verification_quorum=2)
    placed = schedule([job], nodes, NOW).placements[0]
    assert placed.nodes == ("a", "t")
    no_rule = replace(DEFAULT_CONFIG, verification=replace(DEFAULT_CONFIG.verification, trusted_partner=False))
    assert schedule([job], nodes, NOW, no_rule).placements[0].nodes == ("a", "b")


# --- reservation for the oldest waiting multi-GPU job --------------------------------------------


def test_waiting_big_job_holds_the_node_closest_to_fitting_it() -> None:
    nodes = [snap("big", gpus=8, free=4)]
    big = JobRequest("ns/big", gpus_per_replica=8, creation_index=0)
    small = JobRequest("ns/small", gpus_per_replica=1, creation_index=1)
    koinon = schedule([big, small], nodes, NOW)
    assert not koinon.placements
    held = next(u for u in koinon.unschedulable if u.job_key == "ns/small")
    assert held.reasons == {"held for an earlier job that is waiting for room": 1}
    # A naive baseline lets the small job in, so the 8-GPU node never drains.
    naive = RandomPlacer().place([big, small], nodes, NOW)
    assert [p.job_key for p in naive.placements] == ["ns/small"]


def test_a_job_no_node_has_the_cpus_for_holds_no_node() -> None:
    # The 8-GPU node has 4 of its 16 CPUs free: a 32-CPU job waits for nothing that can come, so it
    # must not keep the small job off the node; a 12-CPU one can run once the node drains, and holds it.
    nodes = [replace(snap("big", gpus=8, free=4), cpus_free=4.0, cpus_total=16.0)]
    small = JobRequest("ns/small", gpus_per_replica=1, cpus_per_replica=1.0, creation_index=1)
    never = JobRequest("ns/never", gpus_per_replica=8, cpus_per_replica=32.0, creation_index=0)
    assert [p.job_key for p in schedule([never, small], nodes, NOW).placements] == ["ns/small"]
    later = JobRequest("ns/later", gpus_per_replica=8, cpus_per_replica=12.0, creation_index=0)
    held = schedule([later, small], nodes, NOW)
    assert not held.placements
    assert next(u for u in held.unschedulable if u.job_key == "ns/small").reasons == {
        "held for an earlier job that is waiting for room": 1
    }
    # Unknown total CPUs are taken as enough (the hold stays, as before the field existed).
    unknown = [replace(nodes[0], cpus_total=None)]
    assert not schedule([never, small], unknown, NOW).placements


def test_a_waiting_job_holds_one_node_per_owner_and_none_when_too_few_owners_could_hold_it() -> None:
    # Two busy 8-GPU nodes of one owner: a 2-replica 8-GPU job needs two owners and never fits,
    # so neither node is held from the small jobs.
    same = [replace(snap(n, gpus=8, free=4), owner="alice") for n in ("a1", "a2")]
    pair = JobRequest("ns/pair", replicas=2, gpus_per_replica=8, creation_index=0)
    smalls = [JobRequest(f"ns/s{i}", gpus_per_replica=1, creation_index=1 + i) for i in range(2)]
    assert len(schedule([pair, *smalls], same, NOW).placements) == 2
    # With a second owner's node, the job can run once they drain: one node of each owner is held
    # (not both of alice's), so alice's other node stays open to small jobs.
    fleet = [*same, replace(snap("b1", gpus=8, free=4), owner="bob")]
    result = schedule([pair, *smalls], fleet, NOW)
    used = {n for p in result.placements for n in p.nodes}
    assert len(used) == 1 and used <= {"a1", "a2"}
    assert len(result.placements) == 2


# --- crash rate per hour of work ----------------------------------------------------------------


def test_long_jobs_go_where_work_gets_finished_and_short_ones_where_latency_is_low() -> None:
    steady = ReputationEvidence(successes=20, exposure_hours=30.0, last_updated=NOW)
    crashy = ReputationEvidence(successes=20, failures=6, exposure_hours=8.0, last_updated=NOW)
    nodes = [snap("crashy-near", rtt=10.0, ev=crashy), snap("steady-far", rtt=200.0, ev=steady)]
    short = JobRequest("ns/short", expected_duration_s=120.0)
    long = JobRequest("ns/long", expected_duration_s=4 * 3600.0)
    assert schedule([short], nodes, NOW).placements[0].nodes == ("crashy-near",)
    assert schedule([long], nodes, NOW).placements[0].nodes == ("steady-far",)


def test_work_hours_are_recorded_decay_and_survive_the_status_round_trip() -> None:
    ev = record_work(ReputationEvidence(last_updated=NOW), NOW, RC, 2.5)
    assert ev.exposure_hours == 2.5
    status = to_status(ev, NOW, RC)
    assert status["exposureHours"] == 2.5
    assert from_status(status) == ev
    later = record_work(ev, NOW + RC.half_life_s, RC, 0.0)
    assert math.isclose(later.exposure_hours, 1.25)
    with pytest.raises(ValueError, match="hours of work"):
        record_work(ev, NOW, RC, -1.0)


# 1e155 s took every node's value below the "left out" mark: the job was refused with a false
# reason (too few distinct owners), and so was an ordinary job of its shape in the same call.
@pytest.mark.parametrize(
    "duration",
    [0.0, -5.0, math.nan, math.inf, 1e155, MAX_EXPECTED_DURATION_S * 1.01, pytest.param(10**400, id="int-1e400")],
)
def test_bad_expected_duration_is_refused_naming_the_field(duration: float) -> None:
    with pytest.raises(ValueError, match=r"ns/j: expected duration \(spec.expectedDurationSeconds\)"):
        JobRequest("ns/j", expected_duration_s=duration)


# --- large replicated jobs wait a while for a trusted node --------------------------------------

TRUSTED = ReputationEvidence(successes=20, agreements=20, consecutive_valid=8, last_updated=NOW)


def big(key: str, pending_since: float | None = None, creation_index: int = 0) -> JobRequest:
    """4 GPU-hours, replicated: a verification copy would double it."""
    return JobRequest(
        key,
        gpus_per_replica=2,
        expected_duration_s=2 * 3600.0,
        verification_quorum=2,
        pending_since=pending_since,
        creation_index=creation_index,
    )


def test_big_replicated_job_waits_for_a_trusted_node_with_a_reason() -> None:
    fresh = [snap(f"fresh{i}", gpus=2) for i in range(3)]
    result = schedule([big("ns/big", NOW - 60.0)], fresh, NOW)
    (u,) = result.unschedulable
    assert not result.placements
    assert u.reasons == {WAITING_FOR_TRUSTED: 3}
    assert u.message.startswith("0/3 nodes are available: 3 not trusted yet")


def test_big_job_goes_to_a_trusted_node_when_one_fits() -> None:
    nodes = [snap("fresh", gpus=2, rtt=5.0), snap("proven", gpus=2, rtt=250.0, ev=TRUSTED)]
    (p,) = schedule([big("ns/big", NOW - 60.0)], nodes, NOW).placements
    assert p.nodes[0] == "proven"


def test_the_wait_is_bounded_and_small_or_unknown_age_jobs_never_wait() -> None:
    fresh = [snap(f"fresh{i}", gpus=2) for i in range(3)]
    waited = big("ns/big", NOW - DEFAULT_CONFIG.verification.trusted_wait_s)
    small = JobRequest("ns/small", expected_duration_s=600.0, verification_quorum=2, pending_since=NOW)
    unknown_age = big("ns/old")
    for job in (waited, small, unknown_age):
        (p,) = schedule([job], fresh, NOW).placements
        assert p.copies == 2 and len(set(p.nodes)) == 2 * job.replicas
    never = replace(DEFAULT_CONFIG, verification=replace(DEFAULT_CONFIG.verification, trusted_wait_s=0.0))
    assert schedule([big("ns/big", NOW)], fresh, NOW, never).placements


def test_a_waiting_job_does_not_block_later_jobs_of_its_shape_from_untrusted_nodes() -> None:
    fresh = [snap(f"fresh{i}", gpus=2) for i in range(4)]
    jobs = [
        big("ns/new", NOW, creation_index=0),
        big("ns/old", creation_index=1),
    ]
    result = schedule(jobs, fresh, NOW)
    assert [p.job_key for p in result.placements] == ["ns/old"]
    assert [u.job_key for u in result.unschedulable] == ["ns/new"]


def test_a_job_waiting_for_trust_holds_no_untrusted_nodes_it_would_not_take() -> None:
    """Its untrusted candidates too few for its replicas, it got the "nothing fits" reasons and,
    as a multi-GPU job, reserve_for: it held untrusted nodes it does not take while it waits, and a
    later 1-GPU job that fitted there was refused."""
    waiting = replace(big("ns/big", NOW - 60.0), replicas=2)
    small = JobRequest("ns/small", expected_duration_s=600.0, creation_index=1)
    # Two untrusted 2-GPU nodes of two owners, one half busy: not room for big's two replicas.
    nodes = [snap("a", gpus=2, free=2), snap("b", gpus=2, free=1)]
    result = schedule([waiting, small], nodes, NOW)
    assert [p.job_key for p in result.placements] == ["ns/small"], result.unschedulable
    (refused,) = result.unschedulable
    assert WAITING_FOR_TRUSTED not in refused.reasons  # it says why nothing fits, not "not trusted yet"
    # Once its wait is over it takes untrusted nodes, and holds them again for itself.
    waited = replace(waiting, pending_since=NOW - DEFAULT_CONFIG.verification.trusted_wait_s)
    assert not schedule([waited, small], nodes, NOW).placements


def test_a_job_waiting_for_trust_holds_the_trusted_node_it_waits_for() -> None:
    """Holding nothing while it waited, the trusted node it waits for went to each later small job
    as it drained: it waited out its whole wait and then ran twice on untrusted nodes."""
    waiting = big("ns/big", NOW - 60.0)
    small = JobRequest("ns/small", expected_duration_s=600.0, creation_index=1)
    # Nothing fits big now (both half busy): the trusted node is held, the small job goes elsewhere.
    nodes = [snap("proven", gpus=2, free=1, ev=TRUSTED), snap("fresh", gpus=2, free=1)]
    result = schedule([waiting, small], nodes, NOW)
    assert {p.job_key: p.nodes for p in result.placements} == {"ns/small": ("fresh",)}
    # Untrusted room for big now (it waits, "not trusted yet"): the half-busy trusted node is held too.
    nodes = [snap("proven", gpus=2, free=1, ev=TRUSTED), snap("fresh", gpus=2, free=2)]
    result = schedule([waiting, small], nodes, NOW)
    assert {p.job_key: p.nodes for p in result.placements} == {"ns/small": ("fresh",)}
    assert next(u for u in result.unschedulable if u.job_key == "ns/big").reasons == {WAITING_FOR_TRUSTED: 1}


@pytest.mark.parametrize("since", [math.inf, math.nan])
def test_bad_pending_since_is_refused(since: float) -> None:
    with pytest.raises(ValueError, match="pending_since"):
        JobRequest("ns/j", pending_since=since)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.booleans(), st.integers(0, 4)), min_size=1, max_size=12))
def test_a_waiting_job_runs_only_on_a_trusted_primary_and_says_why_it_waits(fleet: list[tuple[int, bool, int]]) -> None:
    nodes = [
        snap(f"n{i}", gpus=gpus, free=min(free, gpus), ev=TRUSTED if trusted else None)
        for i, (gpus, trusted, free) in enumerate(fleet)
    ]
    trusted_room = sum(1 for n in nodes if n.free_gpus >= 2 and n.reputation is TRUSTED)
    untrusted_room = sum(1 for n in nodes if n.free_gpus >= 2 and n.reputation is not TRUSTED)
    result = schedule([big("ns/big", NOW)], nodes, NOW)
    if trusted_room:
        (placement,) = result.placements
        assert {n.name: n for n in nodes}[placement.nodes[0]].reputation is TRUSTED
    elif untrusted_room:
        (refused,) = result.unschedulable
        assert refused.reasons == {WAITING_FOR_TRUSTED: untrusted_room}
    else:
        (refused,) = result.unschedulable
        assert WAITING_FOR_TRUSTED not in refused.reasons


@pytest.mark.parametrize("field", ["cpus_per_replica", "max_latency_ms"])
def test_a_job_request_refuses_nan(field: str) -> None:
    """`x < 0` let NaN through: a NaN CPU request was placed whatever the node's CPUs."""
    fields: dict[str, Any] = {field: math.nan}
    with pytest.raises(ValueError):
        JobRequest("ns/j", **fields)


def test_simulated_revocations_are_counted_for_measured_jobs_only() -> None:
    # Like every figure of the simulation, over the measured jobs: the warm-up stream's revocations
    # were counted too, so the warm run's "revoked" was not comparable with a cold start's.
    params = replace(QUICK, nodes=300, jobs=1500, horizon_h=20.0)
    sim = Simulation(params, KoinonPlacer(), verify=True)
    revoked_measured: list[bool] = []
    real_revoke = sim._revoke

    def revoke(job: Any, action: Any, now: float) -> None:
        revoked_measured.append(job.spec.measured)
        real_revoke(job, action, now)

    sim._revoke = revoke  # type: ignore[method-assign]
    metrics = sim.run()
    assert not all(revoked_measured), "no warm-up job was revoked: the run tests nothing"
    assert metrics["revoked"] == sum(revoked_measured)
