"""Pure parts of the operator: spec parsing, conditions, placement, capacity, results, backoff."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
import pytest
from hypothesis import given
from hypothesis import strategies as st
from koinon_operator import handlers
from koinon_operator.api.aijob import AIJobStatus, SpecError, parse_spec
from koinon_operator.api.conditions import set_condition
from koinon_operator.api.constants import Phase
from koinon_operator.inventory import Allocation, build_capacity
from koinon_operator.placement import FirstFitPlacer, NodeCapacity, PlacementRequest
from koinon_operator.ray_jobs import RayNodeInfo
from koinon_operator.reconciler import (
    Ledger,
    RayBackoff,
    allocation_of,
    extract_result,
    log_tail,
    submission_id_for,
)
from koinon_operator.telemetry import trace_id_for
from kopf._core.actions.execution import Outcome
from kopf._core.engines.indexing import OperatorIndexer, OperatorIndexers

from tests.aijob.fake_ray import volunteer


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "spec.entrypoint"),
        ({"entrypoint": "  "}, "spec.entrypoint"),
        ({"entrypoint": "x", "replicas": 0}, "spec.replicas"),
        ({"entrypoint": "x", "replicas": True}, "spec.replicas"),
        ({"entrypoint": "x", "resources": {"gpus": -2}}, "spec.resources.gpus"),
        ({"entrypoint": "x", "resources": {"cpus": "many"}}, "spec.resources.cpus"),
        ({"entrypoint": "x", "constraints": {"minReputation": 1.5}}, "spec.constraints.minReputation"),
        ({"entrypoint": "x", "constraints": {"regions": [""]}}, "spec.constraints.regions"),
        ({"entrypoint": "x", "verification": {"mode": "vibes"}}, "spec.verification.mode"),
        ({"entrypoint": "x", "suspend": "yes"}, "spec.suspend"),
        ({"entrypoint": "x", "runtimeEnv": []}, "spec.runtimeEnv"),
        ({"entrypoint": "x", "expectedDurationSeconds": 0}, "spec.expectedDurationSeconds"),
        ({"entrypoint": "x", "expectedDurationSeconds": "1h"}, "spec.expectedDurationSeconds"),
    ],
)
def test_parse_spec_names_the_bad_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(spec)
    assert raised.value.field_path == field


def test_parse_spec_defaults_match_the_crd() -> None:
    spec = parse_spec({"entrypoint": "python x.py"})
    assert (spec.replicas, spec.resources.gpus, spec.resources.cpus, spec.backoff_limit) == (1, 1, 1.0, 2)
    assert spec.verification.mode == "none" and not spec.suspend


def test_condition_transition_time_moves_only_when_status_changes() -> None:
    first = set_condition([], type_="Ready", status=True, reason="A", message="m", now="t1")
    same = set_condition(first, type_="Ready", status=True, reason="B", message="m2", now="t2")
    flipped = set_condition(same, type_="Ready", status=False, reason="C", message="m3", now="t3")
    assert same[0]["lastTransitionTime"] == "t1" and same[0]["reason"] == "B"
    assert flipped[0]["lastTransitionTime"] == "t3" and flipped[0]["status"] == "False"
    assert len(flipped) == 1


def _node(name: str, gpus: int, owner: str = "", **extra: object) -> NodeCapacity:
    return NodeCapacity(name=name, address=f"127.0.0.{len(name)}", ray_node_id=name, gpus_total=gpus,
                        gpus_free=gpus, cpus_free=4, owner=owner or name, **extra)  # type: ignore[arg-type]  # fmt: skip


def test_first_fit_counts_reasons_per_node() -> None:
    nodes = [_node("a", 1), _node("b", 2, cordoned=True), _node("c", 0), _node("d", 4, ready=False)]
    decision = FirstFitPlacer().place(PlacementRequest("ns/j", 1, 2, 1.0), nodes)
    assert not decision.placed
    assert decision.reasons == {"too few free GPUs": 2, "cordoned": 1, "not Ready": 1}
    assert decision.message == "0/4 nodes are available: 1 cordoned, 1 not Ready, 2 too few free GPUs"


def test_first_fit_replicas_need_distinct_owners_when_verified() -> None:
    nodes = [_node("a", 2, owner="alice"), _node("b", 2, owner="alice"), _node("c", 2, owner="carol")]
    verified = FirstFitPlacer().place(PlacementRequest("ns/j", 2, 1, 1.0, distinct_owners=True), nodes)
    assert [n.name for n in verified.nodes] == ["a", "c"]
    too_many = FirstFitPlacer().place(PlacementRequest("ns/j", 3, 1, 1.0, distinct_owners=True), nodes)
    assert not too_many.placed


@given(
    gpus=st.lists(st.integers(0, 8), min_size=1, max_size=6),
    held=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), max_size=6),
)
def test_capacity_subtracts_exactly_what_jobs_hold(gpus: list[int], held: list[tuple[int, int]]) -> None:
    ray_nodes = [
        RayNodeInfo(f"id{i}", f"127.0.20.{i}", True, False, {"GPU": g, "CPU": 4}, {"koinon.dev/node": f"n{i}"})
        for i, g in enumerate(gpus)
    ]
    head = RayNodeInfo("head", "127.0.10.1", True, True, {"CPU": 0}, {})
    volunteers = {f"n{i}": volunteer(f"o{i}", f"127.0.20.{i}", gpus=g) for i, g in enumerate(gpus)}
    allocations = [Allocation((f"n{i % len(gpus)}",), g, 0.5) for i, g in held]
    capacity = {c.name: c for c in build_capacity([head, *ray_nodes], volunteers, allocations)}
    assert set(capacity) == {f"n{i}" for i in range(len(gpus))}  # the head is never a target
    for i, total in enumerate(gpus):
        used = sum(a.gpus_per_replica for a in allocations if a.nodes == (f"n{i}",))
        assert capacity[f"n{i}"].gpus_free == total - used


def test_ledger_local_decisions_override_recorded_ones() -> None:
    ledger = Ledger()
    recorded = {"ns/a": Allocation(("n1",), 1, 1.0), "ns/b": Allocation(("n2",), 1, 1.0)}
    ledger.reserve("ns/c", Allocation(("n1",), 2, 1.0))
    ledger.release("ns/b")
    held = ledger.current(recorded)
    assert Allocation(("n1",), 2, 1.0) in held and Allocation(("n1",), 1, 1.0) in held
    assert all(a.nodes != ("n2",) for a in held)


def test_allocation_comes_only_from_phases_that_hold_nodes() -> None:
    body = {"spec": {"resources": {"gpus": 2, "cpus": 1}}, "status": {"phase": "Running", "assignedNodes": ["x"]}}
    assert allocation_of(body) == Allocation(("x",), 2, 1.0)
    for phase in ("Pending", "Succeeded", "Failed", "Suspended"):
        assert allocation_of({**body, "status": {"phase": phase, "assignedNodes": ["x"]}}) is None


def test_ids_are_deterministic_per_object_and_attempt() -> None:
    uid = "8f6e8530-892f-46a5-a4e3-ba60e32a06d0"
    assert submission_id_for(uid, 2) == submission_id_for(uid, 2) != submission_id_for(uid, 3)
    assert trace_id_for(uid) == trace_id_for(uid) != trace_id_for("9" + uid[1:])
    assert len(trace_id_for(uid)) == 32 and int(trace_id_for(uid), 16) > 0


def test_declared_result_digest_ignores_log_noise() -> None:
    one = extract_result('12:00 INFO start\nKOINON_RESULT {"pi": 3.14}\n')
    two = extract_result('13:07 INFO other noise\nKOINON_RESULT {"pi": 3.14}\n')
    assert one["digest"] == two["digest"] and one["value"] == '{"pi": 3.14}'
    assert extract_result("no marker")["digest"] != one["digest"]


def test_ray_backoff_grows_and_resets() -> None:
    backoff = RayBackoff(base_seconds=1, max_seconds=8)
    delays = [backoff.failed("k", 0.0) for _ in range(5)]
    assert delays == [1, 2, 4, 8, 8]
    assert not backoff.ready("k", 7.9) and backoff.ready("k", 8.0)
    backoff.succeeded("k")
    assert backoff.ready("k", 0.0)


def test_status_view_tolerates_unknown_phase() -> None:
    view = AIJobStatus.from_status({"phase": "Exploded", "attempts": 2, "completionTime": "2026-01-01T00:00:00Z"})
    assert view.phase is None and view.attempts == 2
    assert view.completion_time == datetime(2026, 1, 1, tzinfo=UTC)
    assert Phase.RUNNING.holds_nodes and not Phase.SUCCEEDED.holds_nodes


def test_unchanged_status_is_not_rewritten() -> None:
    from koinon_operator.reconciler import changed_fields

    current = {"phase": "Pending", "message": "0/2 nodes", "observedGeneration": 1}
    assert changed_fields(current, {"phase": "Pending", "message": "0/2 nodes", "observedGeneration": 1}) == {}
    assert changed_fields(current, {"phase": "Pending", "observedGeneration": 2}) == {"observedGeneration": 2}
    assert changed_fields(current, {"phase": "Scheduled", "observedGeneration": 1}) == {"phase": "Scheduled"}


def test_volunteer_status_follows_its_ray_node() -> None:
    from koinon_operator.volunteers import managed_by_gateway, status_from_ray

    body = {"metadata": {"name": "v1"}, "spec": {"gpus": [{"model": "m", "memoryMiB": 8}] * 4}, "status": {}}
    alive = RayNodeInfo("abc", "127.0.20.1", True, False, {"GPU": 2}, {"koinon.dev/node": "v1"})
    status = status_from_ray(body, [alive], "t1")
    assert status["phase"] == "Ready" and status["address"] == "127.0.20.1" and len(status["gpus"]) == 2
    dead = RayNodeInfo("abc", "127.0.20.1", False, False, {"GPU": 2}, {"koinon.dev/node": "v1"})
    assert status_from_ray({**body, "status": status}, [dead], "t2")["phase"] == "NotReady"
    assert status_from_ray(body, [], "t3")["conditions"][0]["reason"] == "RayNodeMissing"
    assert managed_by_gateway({"metadata": {"annotations": {"koinon.dev/connection-owner": "gateway"}}})


def test_gpu_models_from_the_volunteer_spec_reach_the_scheduler_and_pick_the_faster_node() -> None:
    from koinon_operator.scheduling import ReputationPlacer, to_snapshot

    ray_nodes = [
        RayNodeInfo(f"id{i}", f"127.0.20.{i}", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": name})
        for i, name in enumerate(("a-t4", "b-4090"))
    ]
    volunteers = {
        "a-t4": {"spec": {"owner": "o1", "gpus": [{"model": "Tesla T4", "memoryMiB": 16384}]},
                 "status": {"address": "127.0.20.0"}},
        "b-4090": {"spec": {"owner": "o2", "gpus": [{"model": "NVIDIA GeForce RTX 4090", "memoryMiB": 24576}]},
                   "status": {"address": "127.0.20.1"}},
    }  # fmt: skip
    capacity = {c.name: c for c in build_capacity(ray_nodes, volunteers, [])}
    assert capacity["a-t4"].gpu_models == ("Tesla T4",)
    assert [g.model for g in to_snapshot(capacity["b-4090"]).gpus] == ["NVIDIA GeForce RTX 4090"]
    decision = ReputationPlacer(clock=lambda: 1_000.0).place(
        PlacementRequest("ns/j", 1, 1, 1.0), list(capacity.values())
    )
    assert [n.name for n in decision.nodes] == ["b-4090"]
    # Ray reports more GPUs than the spec lists (build_capacity books a volunteer for no more than it
    # lists, so a bare worker's case): the models cannot be matched, so none is assumed.
    mismatched = NodeCapacity("c", "127.0.20.9", "id9", 2, 2, 4.0, gpu_models=("Tesla T4",))
    assert [g.model for g in to_snapshot(mismatched).gpus] == ["unknown", "unknown"]


def test_a_large_replicated_aijob_waits_for_a_trusted_volunteer_then_runs_anywhere() -> None:
    from koinon_operator.scheduler.placer import WAITING_FOR_TRUSTED
    from koinon_operator.scheduling import ReputationPlacer, to_job

    # Two fresh 4-GPU volunteers; a 4-GPU AIJob of unknown length counts as 4 x 30 min = 2 GPU-hours.
    capacity = [NodeCapacity(f"v{i}", f"127.0.21.{i}", f"id{i}", 4, 4, 16.0, owner=f"o{i}") for i in range(2)]
    created = 1_000.0
    request = PlacementRequest("ns/big", 1, 4, 1.0, verification_quorum=2, pending_since=created)
    assert to_job(request).pending_since == created
    waiting = ReputationPlacer(clock=lambda: created + 60.0).place(request, capacity)
    assert not waiting.placed and waiting.reasons == {WAITING_FOR_TRUSTED: 2}
    assert "2 not trusted yet" in waiting.message
    later = ReputationPlacer(clock=lambda: created + 1_800.0).place(request, capacity)
    assert later.placed and later.copies == 2
    # A short job (spec.expectedDurationSeconds: 600 -> 4 x 10 min < 1 GPU-hour) never waits.
    spec = parse_spec({"entrypoint": "x", "expectedDurationSeconds": 600})
    short = PlacementRequest(
        "ns/short", 1, 4, 1.0, verification_quorum=2, pending_since=created,
        expected_duration_s=spec.expected_duration_seconds,
    )  # fmt: skip
    assert to_job(short).expected_duration_s == 600
    assert ReputationPlacer(clock=lambda: created + 60.0).place(short, capacity).placed


def test_a_cpu_only_replicated_aijob_counts_one_gpu_per_replica_for_the_trusted_wait() -> None:
    """Review (README, AIJob: "a replicated job of 1 GPU-hour or more ... waits up to 30 min for a
    trusted volunteer"): a job with `resources.gpus: 0` waited too, as size counts at least 1 GPU
    per replica (doubling a long CPU-only job costs as much as a 1-GPU one). The README and the
    CRD's description now say how size is counted; this pins that behaviour."""
    from koinon_operator.scheduler.placer import WAITING_FOR_TRUSTED
    from koinon_operator.scheduling import ReputationPlacer

    root = Path(__file__).resolve().parents[2]
    readme = " ".join((root / "README.md").read_text().split())
    times = "\N{MULTIPLICATION SIGN}"  # as the README writes it
    size = f"(GPUs per replica, at least 1, {times} replicas {times} expected hours, so a CPU-only job counts too"
    assert f"A replicated job of 1 GPU-hour or more {size}" in readme
    crd = " ".join((root / "manifests/crds/aijobs.koinon.dev.yaml").read_text().split())
    assert "GPUs per replica (at least 1, so CPU-only jobs count too) x replicas x expected hours" in crd

    capacity = [NodeCapacity(f"v{i}", f"127.0.21.{i}", f"id{i}", 1, 1, 16.0, owner=f"o{i}") for i in range(3)]
    now = 1_000_000.0

    def cpu_only(hours: float) -> PlacementRequest:
        return PlacementRequest(
            "ns/cpu-only", 1, 0, 1.0, distinct_owners=True, verification_quorum=3,
            pending_since=now - 60, expected_duration_s=int(hours * 3600), uid="u1",
        )  # fmt: skip

    waiting = ReputationPlacer(clock=lambda: now).place(cpu_only(2.0), capacity)  # 1 x 1 x 2 h
    assert not waiting.placed and waiting.reasons == {WAITING_FOR_TRUSTED: 3}
    assert ReputationPlacer(clock=lambda: now).place(cpu_only(0.5), capacity).placed  # 0.5 "GPU-hour"
    assert ReputationPlacer(clock=lambda: now + 1_800.0).place(cpu_only(2.0), capacity).placed  # waited 30 min


def _indexed_allocations(phases: list[str]) -> dict[str, Any]:
    """The operator's capacity index (kopf's own indexers) after one watch event per phase."""
    indexers = OperatorIndexers()
    indexers["aijob_allocations"] = OperatorIndexer()  # type: ignore[index]
    for phase in phases:
        body = kopf.Body(
            {
                "apiVersion": "koinon.dev/v1alpha1",
                "kind": "AIJob",
                "metadata": {"name": "j", "namespace": "default", "uid": "u1"},
                "spec": {"entrypoint": "x", "resources": {"gpus": 2, "cpus": 1}},
                "status": {
                    "phase": phase,
                    "assignedNodes": ["node-a"],
                    "submissionId": "koinon-u1-1",
                    "scheduling": {"gpusPerReplica": 2, "cpusPerReplica": 1},
                },
            }
        )
        index_function: Any = handlers.aijob_allocations  # kopf.index types it as kopf's callback
        result = index_function(body=body, namespace="default", name="j")
        indexers.replace(body, {"aijob_allocations": Outcome(final=True, result=result)})  # type: ignore[dict-item]
    return handlers._first_values(indexers.indices["aijob_allocations"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "phases", [["Running", "Failed"], ["Scheduled", "Running", "Succeeded"], ["Running", "Pending"]]
)
def test_a_job_that_stops_holding_nodes_leaves_the_capacity_index(phases: list[str]) -> None:
    # kopf keeps an object's entry when its index function returns None: finished jobs' GPUs stayed
    # booked, and a pool filled up for good while nothing ran.
    assert set(_indexed_allocations(phases[:-1])) == {"default/j"}
    assert _indexed_allocations(phases) == {}
    assert Ledger().current(_indexed_allocations(phases)) == []


def test_log_tails_are_plain_text() -> None:
    # Ray colours its log prefixes: status, Events and spans showed the escape codes as garbage.
    log = "\x1b[36m(pid=123)\x1b[0m loading\r\x1b[2Kstep 1\x1b]0;title\x07 done\nTraceback\x00:\n\tValueError\n"
    assert log_tail(log) == "(pid=123) loading\nstep 1 done\nTraceback:\n\tValueError"
