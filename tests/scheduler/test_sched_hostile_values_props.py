"""Property test of the pure scheduler over hostile and extreme snapshot values (counts of 1e300,
RTTs stale or from the future, zero-memory GPUs, quarantined and excluded owners): every placement
passes every hard filter (ready, cordon, exclusions, region, fresh latency, quarantine, minimum
reputation, a skipped verification only on trusted nodes of clean owners), no node's GPUs or CPUs
are over-committed, and the result does not depend on the order of nodes or jobs."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    Gpu,
    JobRequest,
    NodeSnapshot,
    ReputationEvidence,
    schedule,
)
from koinon_operator.scheduler.reputation import beta_counts, beta_score, decayed, wilson_lower_bound

NOW = 1_000_000.0
CFG = DEFAULT_CONFIG
COUNT = st.sampled_from([0.0, 0.0, 1.0, 3.0, 30.0, 1e6, 1e300])


@st.composite
def node(draw: st.DrawFn, i: int) -> NodeSnapshot:
    mems = draw(st.lists(st.sampled_from([0, 8192, 24576, 81920]), min_size=0, max_size=8))
    return NodeSnapshot(
        name=f"n{i:03d}",
        owner=f"o{draw(st.integers(0, 5))}",
        region=draw(st.sampled_from(["eu", "us", ""])),
        ready=draw(st.booleans() | st.just(True)),
        cordoned=draw(st.sampled_from([False, False, True])),
        gpus=tuple(Gpu(draw(st.sampled_from(["T4", "H100", "?"])), m) for m in mems),
        free_gpus=draw(st.integers(0, len(mems))),
        cpus_free=draw(st.sampled_from([0.0, 0.5, 4.0, 1e300])),
        rtt_ms=draw(st.none() | st.sampled_from([0.0, 5.0, 149.9, 150.0, 1e300])),
        rtt_updated_at=draw(st.none() | st.sampled_from([NOW, NOW - 301, NOW + 1e9, 0.0])),
        reputation=ReputationEvidence(
            successes=draw(COUNT),
            agreements=draw(COUNT),
            disagreements=draw(st.sampled_from([0.0, 0.0, 0.4, 1.0, 1e300])),
            failures=draw(COUNT),
            timeouts=draw(COUNT),
            exposure_hours=draw(COUNT),
            consecutive_valid=draw(st.sampled_from([0, 2, 3, 50])),
            last_updated=draw(st.sampled_from([NOW, NOW - 7 * 86400, NOW + 1e6, 0.0])),
        ),
    )


@st.composite
def job(draw: st.DrawFn, i: int) -> JobRequest:
    return JobRequest(
        key=f"ns/j{i:03d}",
        replicas=draw(st.integers(1, 3)),
        gpus_per_replica=draw(st.integers(0, 4)),
        gpu_memory_mib=draw(st.sampled_from([0, 8192, 24576])),
        cpus_per_replica=draw(st.sampled_from([0.0, 0.5, 2.0])),
        min_reputation=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9])),
        max_latency_ms=draw(st.none() | st.sampled_from([0.0, 150.0])),
        regions=frozenset(draw(st.lists(st.sampled_from(["eu", "us"]), max_size=1))),
        verification_quorum=draw(st.sampled_from([1, 2, 3])),
        excluded_nodes=frozenset(f"n{k:03d}" for k in draw(st.lists(st.integers(0, 20), max_size=2))),
        excluded_owners=frozenset(f"o{k}" for k in draw(st.lists(st.integers(0, 5), max_size=1))),
        creation_index=i,
        expected_duration_s=draw(st.none() | st.sampled_from([60.0, 36_000.0])),
        pending_since=draw(st.none() | st.sampled_from([NOW - 10, NOW - 5000])),
    )


def _owner_extra(nodes: tuple[NodeSnapshot, ...]) -> dict[str, float]:
    per_owner: dict[str, float] = defaultdict(float)
    for n in nodes:
        per_owner[n.owner] += decayed(n.reputation, NOW, CFG.reputation).disagreements
    return per_owner


# Counts of 1e300 overflow n * n in the Wilson bound to inf, which it takes as it should
# (z^2 / (4 n^2) -> 0): numpy's warning about it is expected here.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 20).flatmap(lambda n: st.tuples(*[node(i) for i in range(n)])),
    st.integers(1, 12).flatmap(lambda n: st.tuples(*[job(i) for i in range(n)])),
    st.randoms(use_true_random=False),
)
def test_every_placed_node_passes_every_filter(
    nodes: tuple[NodeSnapshot, ...], jobs: tuple[JobRequest, ...], rnd: random.Random
) -> None:
    result = schedule(jobs, nodes, NOW)
    by_name = {n.name: n for n in nodes}
    by_key = {j.key: j for j in jobs}
    owner_dis = _owner_extra(nodes)
    taken: dict[str, list[tuple[int, int]]] = defaultdict(list)
    cpus: dict[str, float] = defaultdict(float)
    for p in result.placements:
        j = by_key[p.job_key]
        assert p.copies in (1, j.verification_quorum)
        assert len(p.nodes) == j.replicas * p.copies
        owners = [by_name[n].owner for n in p.nodes]
        assert len(set(owners)) == len(owners), "two nodes of one owner in one job"
        for k, name in enumerate(p.nodes):
            n = by_name[name]
            assert n.ready and not n.cordoned
            assert name not in j.excluded_nodes and n.owner not in j.excluded_owners
            if j.regions:
                assert n.region in j.regions
            if j.max_latency_ms is not None:
                assert n.rtt_ms is not None and n.rtt_updated_at is not None
                assert NOW - n.rtt_updated_at <= CFG.latency.stale_after_s
                assert n.rtt_ms <= j.max_latency_ms
            ev = decayed(n.reputation, NOW, CFG.reputation)
            extra = max(owner_dis[n.owner] - ev.disagreements, 0.0)
            r, s = beta_counts(ev, CFG.reputation, extra)
            mean = beta_score(r, s, CFG.reputation)
            assert mean >= CFG.scoring.quarantine_below, f"quarantined node {name} placed ({mean})"
            if j.min_reputation > 0:
                assert wilson_lower_bound(r, s, CFG.reputation) >= j.min_reputation
            if p.copies == 1 and j.verification_quorum > 1 and k < j.replicas:
                # verification skipped: every primary node trusted, owner clean
                assert ev.consecutive_valid >= CFG.verification.trust_after_valid
                assert owner_dis[n.owner] <= CFG.verification.owner_disagreement_tolerance
            taken[name].append((j.gpu_memory_mib, j.gpus_per_replica))
            cpus[name] += j.cpus_per_replica
    for name, uses in taken.items():
        n = by_name[name]
        busy = len(n.gpus) - n.free_gpus
        free = sorted(g.memory_mib for g in n.gpus)
        free = free[: len(free) - busy] if busy else free
        for mem, g in sorted(uses, key=lambda u: -u[0]):
            fitting = [m for m in free if m >= mem]
            assert len(fitting) >= g, f"{name} over-committed: {uses} on {n.gpus} busy={busy}"
            for m in fitting[:g]:
                free.remove(m)
        assert cpus[name] <= n.cpus_free or math.isclose(cpus[name], n.cpus_free)
    shuffled_nodes, shuffled_jobs = list(nodes), list(jobs)
    rnd.shuffle(shuffled_nodes)
    rnd.shuffle(shuffled_jobs)
    again = schedule(shuffled_jobs, shuffled_nodes, NOW)
    assert sorted(again.placements, key=lambda p: p.job_key) == sorted(result.placements, key=lambda p: p.job_key)
