"""A verified job of several replicas runs each copy on several owners' nodes, all of which compute
its answer: the copy votes once, and every node of it is judged by that answer (agreement,
disagreement or failure), in this attempt and when a later attempt decides; a result stands only
on copies none of whose owners was caught since.

Reconciler passes against a fake Ray Job API and the real scheduler, as in
tests/aijob/test_verification_rounds.py."""

from __future__ import annotations

from typing import Any

from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import copy_submission_id_from
from koinon_operator.revocation import accepted_vouchers, revocation_message
from koinon_operator.scheduler import NodeResult

from .fake_ray import Clock, make_body, node_address, step, volunteer
from .test_verification_rounds import FORGED, GOOD, CopiesRay, reconciler

OWNERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
OWNER_OF = {f"vn-{c}": owner for c, owner in zip("abcdefgh", OWNERS, strict=True)}


def vols(names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: volunteer(OWNER_OF[n], node_address(n), connected=True) for n in names}


def two_replica_job(quorum: int) -> dict[str, Any]:
    return make_body(
        {
            "entrypoint": "python x.py",
            "replicas": 2,
            "expectedDurationSeconds": 60,  # small: placed at once, no wait for trusted nodes
            "verification": {"mode": "replicated", "quorum": quorum},
        }
    )


async def run_copies(
    rec: Any, ray: CopiesRay, clock: Clock, body: dict[str, Any], ends: list[str | None]
) -> tuple[list[list[str]], Any]:
    """Passes until the attempt's copies are submitted, then copy k ends as ``ends[k]`` says (its
    log, or None: Ray failed it, not its own exit code); returns each copy's nodes and the pass
    that judges them."""
    v = vols(ray.present)
    for _ in range(10):
        await step(rec, body, v)
        clock.advance(40)
        status = body["status"]
        ids = [copy_submission_id_from(status.get("submissionId"), k) or "" for k in range(len(ends))]
        if status.get("assignedNodes") and all(i in ray.jobs for i in ids):
            break
    else:
        raise AssertionError(body["status"])
    assert status["scheduling"]["copies"] == len(ends), status["scheduling"]
    for sid, end in zip(ids, ends, strict=True):
        if end is None:
            ray.set_state(sid, RayJobState.FAILED, message="node died")
        else:
            ray.logs_by_id[sid] = end
            ray.set_state(sid, RayJobState.SUCCEEDED)
    nodes = status["assignedNodes"]
    clock.advance(40)
    return [nodes[2 * k : 2 * k + 2] for k in range(len(ends))], await step(rec, body, v)


async def test_every_node_of_a_copy_is_judged_by_its_answer() -> None:
    """Only each copy's driver node used to be judged: the dissenting copy's other node (maybe the
    one that spoilt it) went free while its honest driver took the whole disagreement, and the
    agreeing copies' other nodes never earned the agreements that build trust."""
    ray, clock = CopiesRay([f"vn-{c}" for c in "abcdef"]), Clock()
    body = two_replica_job(quorum=3)
    copies, outcome = await run_copies(reconciler(ray, clock), ray, clock, body, [GOOD, GOOD, FORGED])
    status = body["status"]
    assert status["reason"] == "Verified", status
    assert status["message"].startswith("attempt 1: 2/3 copies agree")  # one vote per copy, not per node
    assert sorted(outcome.reputation) == sorted(
        [(n, "agreement") for n in copies[0] + copies[1]] + [(n, "disagreement") for n in copies[2]]
    )
    assert status["verification"]["disagreeing"] == [copies[2][0]]  # the vote: by the copy's first node
    digest = status["result"]["digest"]
    assert accepted_vouchers(body) == {n: NodeResult(OWNER_OF[n], digest) for n in copies[0] + copies[1]}


async def test_every_node_of_a_copy_ray_failed_is_charged() -> None:
    """As _ray_jobs_failed blames every node of a failed copy, the vote's failed copies do too."""
    ray, clock = CopiesRay([f"vn-{c}" for c in "abcdef"]), Clock()
    body = two_replica_job(quorum=3)
    copies, outcome = await run_copies(reconciler(ray, clock), ray, clock, body, [GOOD, None, GOOD])
    assert body["status"]["reason"] == "Verified", body["status"]
    assert sorted(outcome.reputation) == sorted(
        [(n, "agreement") for n in copies[0] + copies[2]] + [(n, "failure") for n in copies[1]]
    )


async def test_the_nodes_of_earlier_copies_are_judged_when_a_later_attempt_decides() -> None:
    ray, clock = CopiesRay([f"vn-{c}" for c in "abcd"]), Clock()
    rec, body = reconciler(ray, clock), two_replica_job(quorum=2)
    first, split = await run_copies(rec, ray, clock, body, [GOOD, FORGED])
    assert body["status"]["reason"] == "NoMajority" and split.reputation == []
    kept = {r["node"]: r for r in body["status"]["verification"]["earlierResults"]}
    assert {node: r["nodes"] for node, r in kept.items()} == {c[0]: c for c in first}
    assert {node: r["owners"] for node, r in kept.items()} == {c[0]: [OWNER_OF[n] for n in c] for c in first}
    ray.present = [f"vn-{c}" for c in "abcdefgh"]  # the rerun goes to four fresh owners
    second, decided = await run_copies(rec, ray, clock, body, [GOOD, GOOD])
    assert body["status"]["reason"] == "Verified", body["status"]
    agreeing = first[0] + second[0] + second[1]
    assert sorted(decided.reputation) == sorted(
        [(n, "agreement") for n in agreeing] + [(n, "disagreement") for n in first[1]]
    )
    assert set(accepted_vouchers(body) or {}) == set(agreeing)


def _verified(nodes: list[str], copies: int, agreeing: list[str] | None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": "Succeeded", "assignedNodes": nodes, "result": {"value": "42", "digest": "d42"},
        "scheduling": {"owners": [OWNER_OF[n] for n in nodes], "copies": copies, "replicas": 2},
    }  # fmt: skip
    if agreeing is not None:
        status["verification"] = {"agreeing": agreeing, "disagreeing": [], "failed": [], "earlierResults": []}
    spec = {"entrypoint": "x", "replicas": 2, "verification": {"mode": "replicated", "quorum": 2}}
    return {"metadata": {"name": "j", "namespace": "default"}, "spec": spec, "status": status}


def test_a_copy_with_a_caught_owner_among_its_nodes_vouches_for_nothing() -> None:
    """Each node of a copy is answerable for its answer: an honest driver's second replica on a
    caught owner's node (which may have spoilt the result) leaves the copy's vote nothing to stand
    on, and neither does the honest second replica of a caught driver."""
    skipped = _verified(["vn-a", "vn-b"], 1, None)  # a trusted skip: one copy, alice drives
    assert revocation_message(skipped, {"bob"}) is not None
    assert revocation_message(skipped, {"alice"}) is not None
    assert revocation_message(skipped, {"carol"}) is None
    # Two copies agreed: one of them clean keeps the result standing.
    confirmed = _verified(["vn-a", "vn-b", "vn-c", "vn-d"], 2, ["vn-a", "vn-c"])
    assert revocation_message(confirmed, {"bob"}) is None
    message = revocation_message(confirmed, {"bob", "dave"})
    assert message is not None and "bob, dave" in message
