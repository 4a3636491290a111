"""Retroactive invalidation: a verified job whose accepted result only owners since caught lying
vouched for (a trusted node's skipped verification, or a quorum of caught owners) is marked
ResultRevoked; a result an uncaught owner confirmed stands."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_operator.reputation_book import updated_status
from koinon_operator.revocation import ResultRechecker, accepted_vouchers, caught_owners, revocation_message
from koinon_operator.scheduler import DEFAULT_CONFIG

from tests.emulator.helpers import EmulatorThread, emulator_for_kube_client

CRDS = Path(__file__).resolve().parents[2] / "manifests" / "crds"
API = "koinon.dev/v1alpha1"
NOW = 1_800_000_000.0
DAY = 86400.0


def _volunteer(name: str, owner: str, disagreements: int = 0) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for number in range(disagreements):
        status = {
            **status,
            **(updated_status(status, "disagreement", NOW, DEFAULT_CONFIG.reputation, f"{number}") or {}),
        }
    return {"apiVersion": API, "kind": "VolunteerNode", "metadata": {"name": name}, "spec": {"owner": owner},
            "status": status}  # fmt: skip


def _verified_job(name: str, nodes: list[str], owners: list[str], agreeing: list[str] | None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": "Succeeded", "assignedNodes": nodes, "scheduling": {"owners": owners, "copies": len(nodes)},
        "result": {"value": "42", "digest": "d42"},
        "conditions": [{"type": "Complete", "status": "True", "reason": "Verified", "message": "ok"}],
    }  # fmt: skip
    if agreeing is not None:
        status["verification"] = {"agreeing": agreeing, "disagreeing": [], "failed": [], "earlierResults": []}
    return {
        "apiVersion": API, "kind": "AIJob", "metadata": {"name": name, "namespace": "default"},
        "spec": {"entrypoint": "x", "verification": {"mode": "replicated", "quorum": 2}}, "status": status,
    }  # fmt: skip


def test_an_owner_is_caught_past_the_tolerance_and_forgiven_as_evidence_decays() -> None:
    fleet = [_volunteer("m1", "mallory", 1), _volunteer("m2", "mallory"), _volunteer("h1", "honest")]
    assert caught_owners(fleet, NOW) == {"mallory"}
    assert caught_owners(fleet, NOW + 60 * DAY) == set()  # half-lives later the lie no longer counts
    assert caught_owners([{"metadata": {"name": "x"}, "status": {"reputation": {"successes": "bad"}}}], NOW) == set()


def test_a_trusted_skip_by_a_caught_owner_is_revoked_and_a_confirmed_result_stands() -> None:
    skipped = _verified_job("skipped", ["m2"], ["mallory"], None)
    assert accepted_vouchers(skipped) is not None
    message = revocation_message(skipped, {"mallory"})
    assert message is not None and "mallory" in message
    confirmed = _verified_job("confirmed", ["m2", "h1"], ["mallory", "honest"], ["m2", "h1"])
    assert revocation_message(confirmed, {"mallory"}) is None  # an uncaught owner vouches for it
    all_caught = _verified_job("colluded", ["m2", "e1"], ["mallory", "eve"], ["m2", "e1"])
    assert revocation_message(all_caught, {"mallory"}) is None
    assert revocation_message(all_caught, {"mallory", "eve"}) is not None
    unverified = {**skipped, "spec": {"entrypoint": "x"}}
    assert revocation_message(unverified, {"mallory"}) is None  # its owners asked for no verification
    running = {**skipped, "status": {**skipped["status"], "phase": "Running"}}
    assert revocation_message(running, {"mallory"}) is None


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorThread]:
    crds = [yaml.safe_load((CRDS / f"{p}.koinon.dev.yaml").read_text()) for p in ("aijobs", "volunteernodes")]
    with emulator_for_kube_client(tmp_path, monkeypatch, *crds) as server:
        yield server


def _create_with_status(cluster: EmulatorThread, obj: dict[str, Any]) -> None:
    status = obj.pop("status")
    kind, name, namespace = obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace")
    cluster.call(lambda e: e.create(obj))
    if status:
        cluster.call(lambda e: e.patch(API, kind, name, {"status": status}, namespace=namespace, subresource="status"))


async def test_the_rechecker_marks_only_the_jobs_a_caught_owner_alone_vouched_for(cluster: EmulatorThread) -> None:
    for volunteer in (_volunteer("m1", "mallory", 1), _volunteer("m2", "mallory"), _volunteer("h1", "honest")):
        _create_with_status(cluster, volunteer)
    _create_with_status(cluster, _verified_job("skipped", ["m2"], ["mallory"], None))
    _create_with_status(cluster, _verified_job("confirmed", ["m2", "h1"], ["mallory", "honest"], ["m2", "h1"]))
    rechecker = ResultRechecker()
    assert await rechecker.recheck(NOW) == 1
    assert await rechecker.recheck(NOW) == 0  # marked once

    def conditions(name: str) -> dict[str, dict[str, Any]]:
        job = cluster.call(lambda e: e.get(API, "AIJob", name, "default"))
        return {c["type"]: c for c in job["status"]["conditions"]}

    revoked = conditions("skipped")["ResultRevoked"]
    assert (revoked["status"], revoked["reason"]) == ("True", "VoucherCaught") and "mallory" in revoked["message"]
    assert conditions("skipped")["Complete"]["status"] == "True"  # the phase is left as it was
    assert "ResultRevoked" not in conditions("confirmed")
    # A Warning Event on the job too, for `kubectl describe` and event-based alerts.
    events = cluster.call(lambda e: e.list_objects("v1", "Event", namespace="default"))
    revoked_events = [e for e in events if e["reason"] == "ResultRevoked"]
    assert [(e["type"], e["involvedObject"]["kind"], e["involvedObject"]["name"]) for e in revoked_events] == [
        ("Warning", "AIJob", "skipped")
    ]
    assert "mallory" in revoked_events[0]["message"]


def _skipped_two_replica_job() -> dict[str, Any]:
    # One copy (trust skip), two replicas: the driver ran on mallory's m2, the second replica on
    # honest's h1 (a verified job's replicas go to distinct owners). The result is the driver's log.
    status: dict[str, Any] = {
        "phase": "Succeeded", "assignedNodes": ["m2", "h1"],
        "scheduling": {"owners": ["mallory", "honest"], "copies": 1, "replicas": 2},
        "result": {"value": "42", "digest": "d42"},
    }  # fmt: skip
    return {"apiVersion": "koinon.dev/v1alpha1", "kind": "AIJob", "metadata": {"name": "j", "namespace": "default"},
            "spec": {"entrypoint": "x", "replicas": 2, "verification": {"mode": "replicated", "quorum": 2}},
            "status": status}  # fmt: skip


def test_a_trust_skipped_copy_whose_driver_owner_was_caught_is_revoked() -> None:
    """Every replica node of the copy computed the result and vouches for it, but not apart from its
    copy: the honest second replica used to count as an independent voucher of the liar's printed
    result, which was then never revoked. A copy with a caught owner among its nodes vouches for
    nothing (tests/aijob/test_verified_copy_nodes.py)."""
    assert revocation_message(_skipped_two_replica_job(), {"mallory"}) is not None


def test_one_job_with_a_malformed_verification_does_not_stop_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """status.verification is x-kubernetes-preserve-unknown-fields: earlierResults [1] passes the
    schema; accepted_vouchers calls r.get on it and raises AttributeError, which the per-job
    handler (ApiException, ValueError, TypeError, KeyError) does not catch: the whole recheck
    aborts and the next job, a caught owner's trusted skip, is never marked."""
    bad = _verified_job("bad", ["h1", "h2"], ["honest", "honest2"], ["h1"])
    bad["status"]["verification"]["earlierResults"] = [1]
    skipped = _verified_job("skipped", ["m2"], ["mallory"], None)
    for job in (bad, skipped):
        job["metadata"]["resourceVersion"] = "1"
    fleet = [_volunteer("m1", "mallory", 1), _volunteer("m2", "mallory"), _volunteer("h1", "honest")]
    marked: list[str] = []

    class Api:
        def list_cluster_custom_object(self, group: str, version: str, plural: str) -> dict[str, Any]:
            return {"items": fleet if plural == "volunteernodes" else [bad, skipped]}

        def patch_namespaced_custom_object_status(self, *args: Any) -> None:
            marked.append(args[4])

    class Events:
        def create_namespaced_event(self, namespace: str, event: Any) -> None:
            posted.append(event.involved_object.name)

    posted: list[str] = []
    monkeypatch.setattr("koinon_operator.revocation.load_config", lambda: None)
    monkeypatch.setattr("kubernetes.client.CustomObjectsApi", Api)
    monkeypatch.setattr("kubernetes.client.CoreV1Api", Events)
    ResultRechecker()._recheck(NOW)
    assert marked == ["skipped"] and posted == ["skipped"]
