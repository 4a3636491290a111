"""The scheduler benchmark reports, beside the decision function's rate on a batch of 500 jobs,
the rate the operator places at: reconciler._place asks ReputationPlacer.place for ONE AIJob per
call, against the whole fleet's capacity built afresh for that call. The batch figure alone was
cited as the placement rate met (16,170/s) while the operator's way ran at 8-14/s. No timing is
asserted here (speed targets belong in the benchmark): these check what is timed."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from koinon_operator.inventory import Allocation, build_capacity
from koinon_operator.placement import NodeCapacity, PlacementDecision, PlacementRequest
from koinon_operator.ray_jobs import RayNodeInfo
from koinon_operator.scheduling import ReputationPlacer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.scheduler import __main__ as bench_main
from bench.scheduler import throughput
from bench.scheduler.params import QUICK
from bench.scheduler.report import RATIO_KEYS


def test_the_operator_figure_places_one_job_per_call_with_the_real_placer(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[PlacementRequest, Sequence[NodeCapacity], PlacementDecision]] = []
    built: list[list[NodeCapacity]] = []
    real_place = ReputationPlacer.place

    def place(self: ReputationPlacer, request: PlacementRequest, nodes: Sequence[NodeCapacity]) -> PlacementDecision:
        decision = real_place(self, request, nodes)
        calls.append((request, nodes, decision))
        return decision

    def capacity(
        ray_nodes: Iterable[RayNodeInfo],
        volunteers: Mapping[str, Mapping[str, Any]],
        allocations: Iterable[Allocation],
        allow_bare: bool = False,
    ) -> list[NodeCapacity]:
        built.append(build_capacity(ray_nodes, volunteers, allocations, allow_bare))
        return built[-1]

    monkeypatch.setattr(ReputationPlacer, "place", place)
    monkeypatch.setattr(throughput, "build_capacity", capacity)
    result = throughput.measure_operator(nodes=300, calls=8)

    assert len(calls) == len(built) == 8, "one place() per job, each on capacity built for that call"
    assert len({request.job_key for request, _, _ in calls}) == 8
    assert all(request.replicas == 1 for request, _, _ in calls)
    for (_, nodes, _), fleet in zip(calls, built, strict=True):
        assert nodes is fleet and len(nodes) == 300 and all(isinstance(n, NodeCapacity) for n in nodes)
    # The operator's own build_capacity every call, so that nothing is reused here that the operator
    # would not reuse: it hands out the same object for a node that did not change since the last
    # call (inventory._Kept), and a new one for each node whose capacity changed.
    for (_, one, decision), (_, next_one, _) in itertools.pairwise(calls):
        taken, by_name = {node.name for node in decision.nodes}, {node.name: node for node in one}
        assert all(by_name[node.name] is not node for node in next_one if node.name in taken)
    # Each placement is held before the next call (the ledger): its nodes have fewer GPUs free.
    for (request, _, decision), (_, later, _) in itertools.pairwise(calls):
        if decision.placed:
            after = {n.name: n.gpus_free for n in later}
            assert all(after[n.name] == n.gpus_free - request.gpus_per_replica for n in decision.nodes)
    placed = sum(decision.placed for _, _, decision in calls)
    assert placed and result["placed"] == placed and result["calls"] == 8 and result["nodes"] == 300
    assert result["placements_per_s"] == pytest.approx(placed / result["place_s"])
    assert result["with_capacity_per_s"] == pytest.approx(placed / (result["place_s"] + result["capacity_s"]))


def test_the_record_reports_both_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = {key: 1.0 for key in RATIO_KEYS}
    monkeypatch.setattr(bench_main, "simulate", lambda p, n, names: {name: dict(metrics) for name in names})
    monkeypatch.setattr(bench_main, "measure", lambda: {"batches": {"500": {"placements_per_s": 9000.0}}})
    monkeypatch.setattr(bench_main, "measure_operator", lambda: {"placements_per_s": 30.0})
    out = bench_main.run(QUICK, 1, throughput=True)
    assert (out["placements_per_s"], out["operator_placements_per_s"]) == (9000.0, 30.0)
    assert out["throughput"]["operator"] == {"placements_per_s": 30.0}
    assert "ReputationPlacer.place" in out["definitions"]["operator_placements_per_s"]
    assert bench_main.run(QUICK, 1, throughput=False)["operator_placements_per_s"] is None
