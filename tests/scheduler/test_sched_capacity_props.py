"""Property tests of the pure scheduler over mixed GPUs, excluded owners and trusted waits: capacity is
never exceeded (a worst-case GPU assignment exists), copies have distinct owners, and the result
does not depend on the order of nodes or jobs."""

from __future__ import annotations

import random
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st
from koinon_operator.scheduler import Gpu, JobRequest, NodeSnapshot, ReputationEvidence, schedule

NOW = 100_000.0


@st.composite
def node(draw: st.DrawFn, i: int) -> NodeSnapshot:
    mems = draw(st.lists(st.sampled_from([8192, 24576, 81920]), min_size=0, max_size=8))
    ok = draw(st.integers(0, 30))
    return NodeSnapshot(
        name=f"n{i:03d}",
        owner=f"o{draw(st.integers(0, 6))}",
        region="eu",
        ready=True,
        cordoned=False,
        gpus=tuple(Gpu(draw(st.sampled_from(["T4", "RTX 4090", "H100", "?"])), m) for m in mems),
        free_gpus=draw(st.integers(0, len(mems))),
        cpus_free=float(draw(st.integers(0, 16))) / 2,
        rtt_ms=draw(st.none() | st.floats(0, 400)),
        rtt_updated_at=NOW - 10,
        reputation=ReputationEvidence(
            successes=ok,
            agreements=draw(st.integers(0, ok)),
            disagreements=draw(st.sampled_from([0, 0, 0, 1])),
            failures=draw(st.integers(0, 3)),
            exposure_hours=draw(st.floats(0, 50)),
            consecutive_valid=draw(st.integers(0, 20)),
            last_updated=NOW,
        ),
    )


@st.composite
def job(draw: st.DrawFn, i: int) -> JobRequest:
    return JobRequest(
        key=f"ns/j{i:03d}",
        replicas=draw(st.integers(1, 3)),
        gpus_per_replica=draw(st.integers(0, 8)),
        gpu_memory_mib=draw(st.sampled_from([0, 8192, 24576, 81920])),
        cpus_per_replica=float(draw(st.integers(0, 6))) / 2,
        verification_quorum=draw(st.sampled_from([1, 2, 3])),
        excluded_owners=frozenset(f"o{k}" for k in draw(st.lists(st.integers(0, 6), max_size=2))),
        creation_index=i,
        attempt=draw(st.integers(0, 3)),
        expected_duration_s=draw(st.none() | st.floats(60, 40_000)),
        pending_since=draw(st.none() | st.sampled_from([NOW - 10, NOW - 5000])),
        priority=draw(st.integers(0, 1)),
    )


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 30).flatmap(lambda n: st.tuples(*[node(i) for i in range(n)])),
    st.integers(1, 20).flatmap(lambda n: st.tuples(*[job(i) for i in range(n)])),
    st.randoms(use_true_random=False),
)
def test_capacity_owners_and_order(
    nodes: tuple[NodeSnapshot, ...], jobs: tuple[JobRequest, ...], rnd: random.Random
) -> None:
    result = schedule(jobs, nodes, NOW)
    by_name = {n.name: n for n in nodes}
    by_key = {j.key: j for j in jobs}
    # per node: list of (memory needed, gpus) in placement order
    taken: dict[str, list[tuple[int, int]]] = defaultdict(list)
    cpus: dict[str, float] = defaultdict(float)
    for p in result.placements:
        j = by_key[p.job_key]
        assert len(p.nodes) == j.replicas * p.copies
        owners = [by_name[n].owner for n in p.nodes]
        assert len(set(owners)) == len(owners)
        assert not set(owners) & j.excluded_owners
        for name in p.nodes:
            taken[name].append((j.gpu_memory_mib, j.gpus_per_replica))
            cpus[name] += j.cpus_per_replica
    for name, uses in taken.items():
        n = by_name[name]
        busy = len(n.gpus) - n.free_gpus
        # Worst case: busy GPUs are the biggest ones. Assign each use to the smallest fitting GPUs.
        free = sorted(g.memory_mib for g in n.gpus)
        # remove the `busy` largest
        free = free[: len(free) - busy] if busy else free
        for mem, g in sorted(uses, key=lambda u: -u[0]):
            fitting = [m for m in free if m >= mem]
            assert len(fitting) >= g, f"{name} over-committed: {uses} on {n.gpus} busy={busy}"
            for m in fitting[:g]:
                free.remove(m)
        assert cpus[name] <= n.cpus_free + 1e-9
    for u in result.unschedulable:
        assert sum(u.reasons.values()) in (len(nodes),) or list(u.reasons) == [
            "not trusted yet (a large replicated job waits a while for a trusted node)"
        ], u
    shuffled_nodes, shuffled_jobs = list(nodes), list(jobs)
    rnd.shuffle(shuffled_nodes)
    rnd.shuffle(shuffled_jobs)
    again = schedule(shuffled_jobs, shuffled_nodes, NOW)
    assert sorted(again.placements, key=lambda p: p.job_key) == sorted(result.placements, key=lambda p: p.job_key)
    assert sorted(again.unschedulable, key=lambda u: u.job_key) == sorted(result.unschedulable, key=lambda u: u.job_key)
