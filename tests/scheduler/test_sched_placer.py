"""Placement: capacity, constraints, distinct owners, determinism, reasons (property tests)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from koinon_operator.placement import PlacementRequest
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    MAX_EXPECTED_DURATION_S,
    Gpu,
    JobRequest,
    KoinonPlacer,
    LeastLatencyPlacer,
    NodeSnapshot,
    Placer,
    RandomPlacer,
    ReputationEvidence,
    ReputationOnlyPlacer,
    RoundRobinPlacer,
    SchedulingResult,
    lower_bound,
    schedule,
)
from koinon_operator.scheduler.reputation import score
from koinon_operator.scheduling import to_job

NOW = 10_000.0
REGIONS = ("eu", "us", "ap")
RC = DEFAULT_CONFIG.reputation


@st.composite
def node(draw: st.DrawFn, i: int) -> NodeSnapshot:
    mems = draw(st.lists(st.sampled_from([8192, 16384, 24576]), min_size=0, max_size=4))
    ok = draw(st.integers(0, 30))
    return NodeSnapshot(
        name=f"n{i:03d}",
        owner=f"o{draw(st.integers(0, 12))}",
        region=draw(st.sampled_from(REGIONS)),
        ready=draw(st.booleans()) or draw(st.booleans()),
        cordoned=draw(st.integers(0, 9)) == 0,
        gpus=tuple(Gpu("g", m) for m in mems),
        free_gpus=draw(st.integers(0, len(mems))),
        cpus_free=float(draw(st.integers(0, 16))),
        rtt_ms=draw(st.none() | st.floats(1, 400)),
        rtt_updated_at=NOW - draw(st.sampled_from([0.0, 100.0, 500.0])),
        reputation=ReputationEvidence(
            successes=ok,
            agreements=draw(st.integers(0, ok)),
            disagreements=draw(st.integers(0, 1)),
            failures=draw(st.integers(0, 3)),
            consecutive_valid=draw(st.integers(0, 20)),
            last_updated=NOW,
        ),
    )


@st.composite
def fleet(draw: st.DrawFn) -> list[NodeSnapshot]:
    n = draw(st.integers(1, 25))
    return [draw(node(i)) for i in range(n)]


@st.composite
def job(draw: st.DrawFn, i: int) -> JobRequest:
    return JobRequest(
        key=f"ns/j{i:03d}",
        replicas=draw(st.integers(1, 3)),
        gpus_per_replica=draw(st.integers(0, 3)),
        gpu_memory_mib=draw(st.sampled_from([0, 8192, 16384, 24576])),
        cpus_per_replica=float(draw(st.integers(0, 6))),
        min_reputation=draw(st.sampled_from([0.0, 0.0, 0.3, 0.6])),
        max_latency_ms=draw(st.sampled_from([None, None, 100.0, 250.0])),
        regions=frozenset(draw(st.lists(st.sampled_from(REGIONS), max_size=2))),
        verification_quorum=draw(st.sampled_from([1, 1, 2, 3])),
        excluded_nodes=frozenset(f"n{k:03d}" for k in draw(st.lists(st.integers(0, 25), max_size=3))),
        priority=draw(st.integers(0, 2)),
        creation_index=i,
    )


@st.composite
def batch(draw: st.DrawFn) -> list[JobRequest]:
    return [draw(job(i)) for i in range(draw(st.integers(1, 12)))]


def check_invariants(
    jobs: list[JobRequest], nodes: list[NodeSnapshot], result: SchedulingResult, quarantine: bool
) -> None:
    by_name = {n.name: n for n in nodes}
    by_key = {j.key: j for j in jobs}
    used_gpus: Counter[str] = Counter()
    used_cpus: dict[str, float] = {}
    assert len(result.placements) + len(result.unschedulable) == len(jobs)
    assert {p.job_key for p in result.placements}.isdisjoint({u.job_key for u in result.unschedulable})
    for p in result.placements:
        j = by_key[p.job_key]
        assert len(p.nodes) == j.replicas * p.copies
        assert p.copies in (1, j.verification_quorum)
        owners = [by_name[n].owner for n in p.nodes]
        assert len(set(owners)) == len(owners), "replicas share an owner"
        for name in p.nodes:
            n = by_name[name]
            used_gpus[name] += j.gpus_per_replica
            used_cpus[name] = used_cpus.get(name, 0.0) + j.cpus_per_replica
            assert n.ready and not n.cordoned
            assert name not in j.excluded_nodes and n.owner not in j.excluded_owners
            assert sum(1 for g in n.gpus if g.memory_mib >= j.gpu_memory_mib) >= j.gpus_per_replica
            assert lower_bound(n.reputation, NOW, RC) >= j.min_reputation - 1e-9 or j.min_reputation == 0
            if j.max_latency_ms is not None:
                assert n.rtt_ms is not None and n.rtt_ms <= j.max_latency_ms
                assert n.rtt_updated_at is not None and NOW - n.rtt_updated_at <= 300
            if j.regions:
                assert n.region in j.regions
            if quarantine:
                assert score(n.reputation, NOW, RC) >= DEFAULT_CONFIG.scoring.quarantine_below - 0.01
    for name, gpus in used_gpus.items():
        assert gpus <= by_name[name].free_gpus, f"{name} over-committed"
        assert used_cpus[name] <= by_name[name].cpus_free + 1e-9
    for u in result.unschedulable:
        assert sum(u.reasons.values()) == len(nodes), u
        assert all(v > 0 for v in u.reasons.values())
        assert u.message.startswith(f"0/{len(nodes)} nodes are available")


POLICIES: list[type] = [KoinonPlacer, RandomPlacer, RoundRobinPlacer, LeastLatencyPlacer, ReputationOnlyPlacer]


@settings(max_examples=40, deadline=None)
@given(fleet(), batch(), st.sampled_from(POLICIES))
def test_never_beyond_capacity_or_constraints(nodes: list[NodeSnapshot], jobs: list[JobRequest], policy: type) -> None:
    placer: Placer = policy()
    check_invariants(jobs, nodes, placer.place(jobs, nodes, NOW), quarantine=policy is KoinonPlacer)


@settings(max_examples=30, deadline=None)
@given(fleet(), batch(), st.randoms(use_true_random=False))
def test_deterministic_and_independent_of_input_order(
    nodes: list[NodeSnapshot], jobs: list[JobRequest], rnd: random.Random
) -> None:
    first = schedule(jobs, nodes, NOW)
    assert schedule(jobs, nodes, NOW) == first
    shuffled_nodes, shuffled_jobs = nodes[:], jobs[:]
    rnd.shuffle(shuffled_nodes)
    rnd.shuffle(shuffled_jobs)
    again = schedule(shuffled_jobs, shuffled_nodes, NOW)
    assert sorted(again.placements, key=lambda p: p.job_key) == sorted(first.placements, key=lambda p: p.job_key)
    assert sorted(again.unschedulable, key=lambda u: u.job_key) == sorted(first.unschedulable, key=lambda u: u.job_key)
    assert RandomPlacer(seed=3).place(jobs, nodes, NOW) == RandomPlacer(seed=3).place(jobs, nodes, NOW)


def mk(
    name: str,
    owner: str,
    *,
    gpus: int = 1,
    free: int | None = None,
    rtt: float | None = 20.0,
    ev: ReputationEvidence | None = None,
    region: str = "eu",
    ready: bool = True,
) -> NodeSnapshot:
    return NodeSnapshot(
        name=name,
        owner=owner,
        region=region,
        ready=ready,
        cordoned=False,
        gpus=tuple(Gpu("A", 24576) for _ in range(gpus)),
        free_gpus=gpus if free is None else free,
        cpus_free=8.0,
        rtt_ms=rtt,
        rtt_updated_at=NOW,
        reputation=ev or ReputationEvidence(last_updated=NOW),
    )


PROVEN = ReputationEvidence(successes=40, agreements=40, consecutive_valid=5, last_updated=NOW)


def test_kubernetes_style_reasons() -> None:
    nodes = [mk(f"a{i}", f"o{i}", gpus=1) for i in range(80)]
    nodes += [mk(f"b{i}", f"p{i}", gpus=4, rtt=200.0) for i in range(10)]
    nodes += [mk(f"c{i}", f"q{i}", gpus=4) for i in range(30)]
    j = JobRequest("ns/big", gpus_per_replica=2, min_reputation=0.8, max_latency_ms=150)
    (u,) = schedule([j], nodes, NOW).unschedulable
    assert u.reasons == {"too few GPUs (need 2)": 80, "reputation below 0.8": 40}
    assert u.message == "0/120 nodes are available: 80 too few GPUs (need 2), 40 reputation below 0.8"


def test_capacity_consumed_within_one_call() -> None:
    nodes = [mk("n1", "o1", gpus=2), mk("n2", "o2", gpus=1)]
    jobs = [JobRequest(f"ns/j{i}", gpus_per_replica=1, creation_index=i) for i in range(4)]
    result = schedule(jobs, nodes, NOW)
    assert Counter(n for p in result.placements for n in p.nodes) == {"n1": 2, "n2": 1}
    (u,) = result.unschedulable
    assert u.job_key == "ns/j3" and u.reasons == {"GPUs in use": 2}


def test_replicas_need_distinct_owners() -> None:
    nodes = [mk("n1", "same"), mk("n2", "same"), mk("n3", "same")]
    (u,) = schedule([JobRequest("ns/j", replicas=2)], nodes, NOW).unschedulable
    assert u.reasons == {"fit, but only 1 distinct owners for 2 replicas": 3}


def test_too_few_owners_for_verification_copies_says_copies_not_replicas() -> None:
    # One replica, quorum 3: what needs three owners is the job's verification copies.
    nodes = [mk("n1", "alice"), mk("n2", "bob"), mk("n3", "bob")]
    (u,) = schedule([JobRequest("ns/j", verification_quorum=3)], nodes, NOW).unschedulable
    assert u.reasons == {"fit, but only 2 distinct owners for 3 verification copies": 3}
    (u,) = schedule([JobRequest("ns/j", replicas=2, verification_quorum=2)], nodes, NOW).unschedulable
    assert u.reasons == {"fit, but only 2 distinct owners for 4 nodes (2 verification copies of 2 replicas)": 3}


def test_sybil_fresh_fleet_does_not_outrank_a_proven_node() -> None:
    fleet_nodes = [mk(f"sybil{i}", "mallory", rtt=5.0) for i in range(50)]
    proven = mk("proven", "alice", rtt=120.0, ev=PROVEN)
    (p,) = schedule([JobRequest("ns/j")], [*fleet_nodes, proven], NOW).placements
    assert p.nodes == ("proven",)
    # A quorum of two needs two owners: the fleet supplies at most one copy. (The proven node's trust
    # counter is zeroed here so that adaptive replication cannot skip the second copy.)
    checked = mk("proven", "alice", rtt=120.0, ev=replace(PROVEN, consecutive_valid=0))
    (p2,) = schedule([JobRequest("ns/v", verification_quorum=2)], [*fleet_nodes, checked], NOW).placements
    assert len({n.startswith("sybil") for n in p2.nodes}) == 2


def test_prefers_low_latency_among_equals_and_spreads_load() -> None:
    nodes = [mk("far", "o1", rtt=280.0, ev=PROVEN), mk("near", "o2", rtt=10.0, ev=PROVEN)]
    (p,) = schedule([JobRequest("ns/j")], nodes, NOW).placements
    assert p.nodes == ("near",)
    busy = [mk("busy", "o1", gpus=4, free=1, ev=PROVEN), mk("idle", "o2", gpus=4, ev=PROVEN)]
    (p,) = schedule([JobRequest("ns/j")], busy, NOW).placements
    assert p.nodes == ("idle",)


def test_quarantined_liar_gets_no_work_from_koinon() -> None:
    liar = mk("liar", "eve", rtt=5.0, ev=ReputationEvidence(successes=2, disagreements=1, last_updated=NOW))
    result = schedule([JobRequest("ns/j")], [liar], NOW)
    assert result.unschedulable[0].reasons == {"quarantined (reputation score below 0.25)": 1}


def test_duplicate_names_and_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="unique names"):
        schedule([JobRequest("ns/j")], [mk("n", "a"), mk("n", "b")], NOW)
    with pytest.raises(ValueError, match="unique keys"):
        schedule([JobRequest("ns/j"), JobRequest("ns/j")], [mk("n", "a")], NOW)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_reputation": 1.5}, "minReputation"),
        ({"replicas": 0}, "spec.replicas"),
        ({"gpus_per_replica": -1}, "resources.gpus"),
        ({"verification_quorum": 0}, "verification.quorum"),
    ],
)
def test_bad_job_names_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        JobRequest("ns/bad", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("duration", [2**63 - 1, 10**30])
def test_the_longest_duration_the_operator_passes_places_and_blocks_nothing(duration: int) -> None:
    # An AIJob's spec.expectedDurationSeconds is an int64 in kube-apiserver; the operator clamps
    # anything longer (10**30: a spec it was handed without one) to the scheduler's bound.
    longest = to_job(PlacementRequest("ns/a", 1, 1, 0.0, expected_duration_s=duration, creation_index=0))
    assert longest.expected_duration_s is not None and longest.expected_duration_s <= MAX_EXPECTED_DURATION_S
    ordinary = JobRequest("ns/b", expected_duration_s=600.0, creation_index=1)
    nodes = [mk(f"n{i}", f"o{i}") for i in range(4)]
    result = schedule([longest, ordinary], nodes, NOW)
    assert {p.job_key for p in result.placements} == {"ns/a", "ns/b"}
    assert result.unschedulable == ()


def test_no_nodes_at_all_leaves_every_job_unschedulable() -> None:
    """argmax over an empty fleet raised ValueError."""
    result = schedule([JobRequest("ns/j"), JobRequest("ns/k", verification_quorum=2)], [], 10_000.0)
    assert result.placements == () and [u.job_key for u in result.unschedulable] == ["ns/j", "ns/k"]


def test_a_job_asking_no_gpus_is_not_refused_for_busy_gpus_that_do_not_fit_its_memory() -> None:
    """Busy GPUs outnumbering the ones with enough memory left fewer than none free, and 0 GPUs
    asked did not fit into that."""
    # Both GPUs busy, one of them big enough for 16 GiB.
    node = NodeSnapshot("n1", "o1", "eu", True, False, (Gpu("x", 81920), Gpu("x", 8192)), 0, 8.0, 10.0, 10_000.0)
    cpu_only = JobRequest("ns/cpu", gpus_per_replica=0, gpu_memory_mib=16384, cpus_per_replica=1.0)
    assert [p.nodes for p in schedule([cpu_only], [node], 10_000.0).placements] == [("n1",)]
    # A job that needs a GPU still waits.
    needs_big = JobRequest("ns/big", gpus_per_replica=1, gpu_memory_mib=16384, cpus_per_replica=1.0)
    assert schedule([needs_big], [node], 10_000.0).placements == ()
