"""A VolunteerNode whose status placement cannot read costs only itself: the CRD rejects such values,
and one stored before it did (or under an older CRD) is kept out of placement with the reason
logged, while every other node keeps being placed, sampled and credited."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_operator.inventory import RayNodeCache, build_capacity
from koinon_operator.placement import PlacementRequest
from koinon_operator.ray_jobs import RayNodeInfo
from koinon_operator.reconciler import AIJobReconciler
from koinon_operator.reputation_book import ReputationBook
from koinon_operator.scheduling import ReputationPlacer

from tests.emulator.helpers import EmulatorThread, emulator_for_kube_client

RAY_NODES = [
    RayNodeInfo("r1", "127.0.20.1", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": "vn-good"}),
    RayNodeInfo("r2", "127.0.20.2", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": "vn-bad"}),
]
SPEC = {"owner": "alice", "gpus": [{"model": "NVIDIA L4", "memoryMiB": 24000}]}
READY = {"phase": "Ready", "connected": True}
MALFORMED = {
    "negative-latency": {**READY, "latency": {"smoothedMs": -1.0, "updatedAt": "2026-01-01T00:00:00Z"}},
    "negative-count": {**READY, "reputation": {"successes": -1}},
    "string-count": {**READY, "reputation": {"successes": "3"}},
    "bad-lastUpdated": {**READY, "reputation": {"lastUpdated": "yesterday"}},
    "lower-bound-above-1": {**READY, "reputation": {"lowerBound": 7}},
}
CRD = Path(__file__).resolve().parents[2] / "manifests" / "crds" / "volunteernodes.koinon.dev.yaml"
API = "koinon.dev/v1alpha1"
NOW = 1_800_000_000.0


def _volunteers(bad_status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        "vn-good": {"spec": SPEC, "status": {**READY, "address": "127.0.20.1"}},
        "vn-bad": {"spec": {**SPEC, "owner": "bob"}, "status": {**bad_status, "address": "127.0.20.2"}},
    }


@pytest.mark.parametrize("bad_status", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_volunteer_is_left_out_and_the_others_are_placed(
    bad_status: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="koinon_operator.inventory"):
        capacity = build_capacity(RAY_NODES, _volunteers(bad_status), [])
    assert {c.name: c.ready for c in capacity} == {"vn-good": True, "vn-bad": False}
    assert "VolunteerNode vn-bad takes no new work: status." in caplog.text
    decision = ReputationPlacer(clock=lambda: NOW).place(PlacementRequest("ns/j", 1, 1, 1.0), capacity)
    assert [n.name for n in decision.nodes] == ["vn-good"]


async def test_the_reconciler_schedules_beside_a_malformed_volunteer() -> None:
    class Ray:
        async def nodes(self) -> list[RayNodeInfo]:
            return RAY_NODES

    ray: Any = Ray()
    reconciler = AIJobReconciler(ray=ray, placer=ReputationPlacer(), nodes=RayNodeCache(ray))
    body = {
        "metadata": {"name": "j", "namespace": "ns", "uid": "u1", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"entrypoint": "python x.py"},
        "status": {"phase": "Pending", "attempts": 0},
    }
    outcome = await reconciler.reconcile(body, {}, _volunteers(MALFORMED["negative-latency"]))
    assert outcome.status.get("phase") == "Scheduled"
    assert outcome.status.get("assignedNodes") == ["vn-good"]


def _crd(*, reputation_schema: bool) -> dict[str, Any]:
    """The project's CRD; without the reputation schema it is the CRD before 2026-12-06, which
    stored any reputation object."""
    crd: dict[str, Any] = yaml.safe_load(CRD.read_text())
    if not reputation_schema:
        crd = copy.deepcopy(crd)
        status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        del status["properties"]["reputation"]["properties"]
    return crd


def _create(cluster: EmulatorThread, name: str, status: dict[str, Any]) -> None:
    node = {"apiVersion": API, "kind": "VolunteerNode", "metadata": {"name": name}, "spec": {"owner": name}}
    cluster.call(lambda e: e.create(node))
    cluster.call(lambda e: e.patch(API, "VolunteerNode", name, {"status": status}, subresource="status"))


@pytest.mark.parametrize("name", MALFORMED.keys())
def test_the_crd_rejects_what_placement_cannot_read(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with emulator_for_kube_client(tmp_path, monkeypatch, _crd(reputation_schema=True)) as cluster:
        with pytest.raises(Exception, match=r"status\.(latency|reputation)\.\w+"):
            _create(cluster, "vn-bad", MALFORMED[name])
        # What the operator itself writes is accepted.
        _create(cluster, "vn-good", {**READY, "latency": {"smoothedMs": 3.5}})


@pytest.fixture
def stored_before_the_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorThread]:
    """vn-a-bad (listed first) holds a reputation the current CRD would reject; vn-b is healthy."""
    with emulator_for_kube_client(tmp_path, monkeypatch, _crd(reputation_schema=False)) as cluster:
        _create(cluster, "vn-a-bad", {"phase": "Ready", "reputation": {"successes": "3"}})
        _create(cluster, "vn-b", {"phase": "Ready", "connected": True})
        yield cluster


def _status(cluster: EmulatorThread, name: str) -> dict[str, Any]:
    return dict(cluster.call(lambda e: e.get(API, "VolunteerNode", name))["status"])


async def test_uptime_sampling_goes_on_past_a_malformed_volunteer(stored_before_the_schema: EmulatorThread) -> None:
    assert await ReputationBook(clock=lambda: NOW).sample_uptime(60) == 1
    assert _status(stored_before_the_schema, "vn-b")["reputation"]["uptimeSampledAt"] == NOW


async def test_evidence_of_the_other_nodes_is_recorded_past_a_malformed_one(
    stored_before_the_schema: EmulatorThread,
) -> None:
    with pytest.raises(ValueError, match=r"status\.reputation\.successes"):
        await ReputationBook(clock=lambda: NOW).record([("vn-a-bad", "agreement"), ("vn-b", "agreement")], "u/1/0")
    assert _status(stored_before_the_schema, "vn-b")["jobs"] == {"succeeded": 1}
