"""The index's derived columns: kept current by recomputing only the nodes placements changed, they
must equal a fresh computation over the whole fleet, bit for bit (placement ties depend on it)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from koinon_operator.scheduler import DEFAULT_CONFIG, Gpu, JobRequest, NodeSnapshot, ReputationEvidence
from koinon_operator.scheduler.candidates import MaskCandidates, RankedCandidates
from koinon_operator.scheduler.index import (
    BoolArray,
    NodeIndex,
    Positions,
    build_index,
    dynamic_mask,
    reserve_for,
    static_mask,
)
from koinon_operator.scheduler.placer import best_score

NOW = 50_000.0


def fleet(sizes: list[tuple[int, int]], valid_runs: tuple[int, ...] = (0,)) -> list[NodeSnapshot]:
    return [
        NodeSnapshot(
            name=f"n{i:03d}",
            owner=f"o{i % 7}",
            region="eu",
            ready=True,
            cordoned=False,
            gpus=tuple(Gpu("RTX 4090" if i % 2 else "Tesla T4", 16384) for _ in range(total)),
            free_gpus=min(free, total),
            cpus_free=8.0,
            rtt_ms=float(10 + i),
            rtt_updated_at=NOW,
            reputation=ReputationEvidence(
                successes=float(i % 5), consecutive_valid=valid_runs[i % len(valid_runs)], last_updated=NOW
            ),
        )
        for i, (total, free) in enumerate(sizes)
    ]


def scores(index: NodeIndex) -> object:
    def compute(at: Positions) -> np.ndarray:  # type: ignore[type-arg]
        leftover = index.fit_count(8192)[at] - index.busy_gpus[at] - 1
        return index.score[at] - index.packing_weight * leftover / 8.0 + 0.1 * index.inverse_speed[at]

    return compute


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=40),
    st.lists(st.tuples(st.integers(0, 39), st.integers(1, 2)), max_size=30),
    st.integers(0, 4),
)
def test_derived_columns_equal_a_fresh_computation(
    sizes: list[tuple[int, int]], uses: list[tuple[int, int]], held: int
) -> None:
    index = build_index(fleet(sizes), NOW, DEFAULT_CONFIG)
    job = JobRequest(key="ns/j", gpus_per_replica=1, gpu_memory_mib=8192, cpus_per_replica=1.0)
    static = static_mask(index, job, None)
    compute = scores(index)
    index.derived("scores", compute)  # type: ignore[arg-type]
    dynamic_mask(index, job, static)
    for position, gpus in uses:
        i = position % index.size
        if index.total_gpus[i] - index.busy_gpus[i] >= gpus:
            index.consume([i], gpus, 1.0)
        if held:
            reserve_for(index, JobRequest(key="ns/big", gpus_per_replica=4), static, held)
        cached = index.derived("scores", compute)  # type: ignore[arg-type]
        assert np.array_equal(cached, compute(slice(None)))  # type: ignore[operator]
        fresh_mask = static & (index.available_fitting(8192) >= 1) & (index.cpus_free >= 1.0) & ~index.reserved
        assert np.array_equal(dynamic_mask(index, job, static), fresh_mask)


def test_a_caller_changing_the_mask_does_not_change_the_cache() -> None:
    index = build_index(fleet([(2, 2), (2, 2)]), NOW, DEFAULT_CONFIG)
    job = JobRequest(key="ns/j")
    static = static_mask(index, job, None)
    first = dynamic_mask(index, job, static)
    first[:] = False
    assert dynamic_mask(index, job, static).all()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=30),
    st.lists(st.tuples(st.integers(0, 29), st.integers(0, 2), st.integers(1, 3), st.booleans()), max_size=12),
    st.lists(st.integers(0, 6), max_size=2),
)
def test_ranked_picks_equal_a_chooser_over_fresh_values(
    sizes: list[tuple[int, int]], jobs: list[tuple[int, int, int, bool]], excluded: list[int]
) -> None:
    """The cached, incrementally updated ranking picks exactly what an argmax over the policy's
    values computed afresh picks, for groups, verification copies (`after`), trusted-only picks
    and excluded owners, while earlier placements keep changing the fleet."""
    index = build_index(fleet(sizes, valid_runs=(0, 12, 40)), NOW, DEFAULT_CONFIG)
    policy = best_score(DEFAULT_CONFIG)
    statics: dict[int, BoolArray] = {}
    for n, (position, gpus, replicas, trusted_only) in enumerate(jobs):
        job = JobRequest(
            key=f"ns/j{n}",
            gpus_per_replica=gpus,
            replicas=replicas,
            cpus_per_replica=1.0,
            expected_duration_s=600.0 * (1 + position),
            excluded_owners=frozenset(f"o{k}" for k in excluded) if n % 2 else frozenset(),
        )
        static = statics.setdefault(gpus, static_mask(index, job, None))

        def argmax_of_fresh(ix: NodeIndex, mask: BoolArray, job: JobRequest) -> int:
            i = int(np.where(mask, policy.values(ix, job)(slice(None)), -np.inf).argmax())
            return i if mask[i] else -1

        ranked = RankedCandidates(index, job, static, policy)
        reference = MaskCandidates(index, job, static, argmax_of_fresh)
        assert ranked.count() == reference.count()
        primary = ranked.pick(replicas, trusted_only=trusted_only)
        assert primary == reference.pick(replicas, trusted_only=trusted_only)
        if primary is None:
            continue
        assert ranked.pick(1, after=primary) == reference.pick(1, after=primary)
        index.consume(primary, gpus, 1.0)
        if position % 3 == 0:
            reserve_for(index, JobRequest(key="ns/big", gpus_per_replica=3), static, 1)


def test_unknown_or_stale_rtts_are_nan_whether_or_not_any_is_unknown() -> None:
    """The RTT column is read in C when every node has one, and by the slower path once one has none."""
    known = fleet([(1, 1)] * 4)
    known[2] = replace(known[2], rtt_updated_at=NOW - DEFAULT_CONFIG.latency.stale_after_s - 1)
    assert np.array_equal(build_index(known, NOW, DEFAULT_CONFIG).rtt_ms, [10.0, 11.0, np.nan, 13.0], equal_nan=True)
    some_unknown = [*known[:3], replace(known[3], rtt_ms=None, rtt_updated_at=None)]
    index = build_index(some_unknown, NOW, DEFAULT_CONFIG)
    assert np.array_equal(index.rtt_ms, [10.0, 11.0, np.nan, np.nan], equal_nan=True)
