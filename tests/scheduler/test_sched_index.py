"""The index's derived columns: kept current by recomputing only the nodes placements changed, they
must equal a fresh computation over the whole fleet, bit for bit (placement ties depend on it)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from koinon_operator.scheduler import DEFAULT_CONFIG, Gpu, JobRequest, NodeSnapshot
from koinon_operator.scheduler.index import NodeIndex, Positions, build_index, dynamic_mask, reserve_for, static_mask

NOW = 50_000.0


def fleet(sizes: list[tuple[int, int]]) -> list[NodeSnapshot]:
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
        )
        for i, (total, free) in enumerate(sizes)
    ]


def scores(index: NodeIndex) -> object:
    def compute(at: Positions) -> np.ndarray:  # type: ignore[type-arg]
        leftover = index.fit_count(8192)[at] - (index.total_gpus[at] - index.free_gpus[at]) - 1
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
        if index.free_gpus[i] >= gpus:
            index.consume(i, gpus, 1.0)
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
