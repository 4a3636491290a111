"""The owner taint (a caught liar's disagreements charged to every node of its owner) holds in the
operator whether or not the caught node is connected to Ray: build_capacity hands the scheduler
every VolunteerNode (those without a live Ray node as not ready), so their evidence still counts
(it was dropped, and taking the caught node offline cleared its siblings)."""

from __future__ import annotations

from typing import Any

from koinon_operator.inventory import NODE_NAME_LABEL, build_capacity
from koinon_operator.placement import PlacementRequest
from koinon_operator.ray_jobs import RayNodeInfo
from koinon_operator.scheduler import ReputationEvidence, to_status
from koinon_operator.scheduler.config import DEFAULT_CONFIG
from koinon_operator.scheduling import ReputationPlacer

NOW = 1_800_000_000.0


def address(name: str) -> str:
    return f"10.0.0.{abs(hash(name)) % 200 + 1}"


def ray_node(name: str) -> RayNodeInfo:
    return RayNodeInfo(
        node_id=f"id-{name}",
        address=address(name),
        alive=True,
        is_head=False,
        resources_total={"GPU": 1.0, "CPU": 4.0},
        labels={NODE_NAME_LABEL: name},
    )


def volunteer(name: str, owner: str, evidence: ReputationEvidence) -> dict[str, Any]:
    return {
        "spec": {"owner": owner, "gpus": [{"model": "RTX 4090", "memoryMiB": 24576}]},
        "status": {
            "phase": "Ready",
            "address": address(name),
            "reputation": to_status(evidence, NOW, DEFAULT_CONFIG.reputation),
        },
    }


PROVEN = ReputationEvidence(successes=20, agreements=20, consecutive_valid=20, last_updated=NOW)
CAUGHT = ReputationEvidence(successes=5, agreements=2, disagreements=3, consecutive_valid=0, last_updated=NOW)

VOLUNTEERS = {
    "evil-a": volunteer("evil-a", "mallory", CAUGHT),  # caught lying three times
    "evil-b": volunteer("evil-b", "mallory", PROVEN),  # its sibling, same owner
    "honest": volunteer("honest", "alice", ReputationEvidence(last_updated=NOW)),
}


def copies_of_jobs_on_sibling(live: list[str]) -> list[int]:
    placer = ReputationPlacer(clock=lambda: NOW)
    capacity = build_capacity([ray_node(n) for n in live], VOLUNTEERS, [])
    copies = []
    for i in range(40):
        request = PlacementRequest(
            job_key=f"ns/job-{i}",
            replicas=1,
            gpus_per_replica=1,
            cpus_per_replica=1,
            verification_quorum=2,
            distinct_owners=True,
        )
        decision = placer.place(request, capacity)
        if decision.placed and decision.nodes[0].name == "evil-b":
            copies.append(decision.copies)
    return copies


def test_sibling_of_connected_liar_is_never_trusted() -> None:
    # Sanity: while the liar is connected the whole owner is tainted: its sibling is never trusted
    # (and is even quarantined), so it never runs a verified job alone.
    assert all(c == 2 for c in copies_of_jobs_on_sibling(["evil-a", "evil-b", "honest"]))


def test_sibling_of_disconnected_liar_stays_untrusted() -> None:
    # The liar just disconnects its caught node; its VolunteerNode (and its 3 disagreements) still
    # exist. Its sibling must stay untrusted: the README says a disagreement taints the owner.
    copies = copies_of_jobs_on_sibling(["evil-b", "honest"])
    assert copies, "the sibling got no job at all"
    assert all(c == 2 for c in copies), f"verification skipped on a tainted owner's node: copies={copies}"
