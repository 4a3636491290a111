"""After a split without a majority the rerun places only the copies that could decide it (judged
with the answers so far), not a full quorum again: with one fresh owner left the job was
Unschedulable for ever, though one agreeing copy from that owner settles it."""

from __future__ import annotations

from .fake_ray import Clock, step
from .test_verification_rounds import FORGED, GOOD, CopiesRay, reconciler, replicated_job, run_copies, volunteers


async def test_one_fresh_owner_is_enough_to_break_a_one_to_one_split() -> None:
    ray, clock = CopiesRay(["vn-a", "vn-b"]), Clock()
    rec, body = reconciler(ray, clock), replicated_job(quorum=2)
    await run_copies(rec, ray, clock, body, {"vn-a": GOOD, "vn-b": FORGED})
    assert body["status"]["reason"] == "NoMajority"
    # carol joins: alice (good), bob (forged) and carol make three owners; carol agreeing with
    # alice is a strict majority (2 of 3), which is what judge() accepts.
    ray.present = ["vn-a", "vn-b", "vn-c"]
    for _ in range(5):
        await step(rec, body, volunteers(ray.present))
        clock.advance(40)
    status = body["status"]
    assert status.get("assignedNodes"), f"rerun never placed: {status.get('message')}"
    assert status["assignedNodes"] == ["vn-c"]
