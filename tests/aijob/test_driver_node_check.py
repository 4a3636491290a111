"""A verification copy's answer counts only when Ray ran its driver on the Ray node recorded for the
copy at placement: the log is read from the node Ray names, and one node answering for a copy
placed on another owner's node met the quorum alone.

Reconciler passes against the fake Ray Job API and the real scheduler, as in
tests/aijob/test_verification_rounds.py."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from koinon_operator.ray_jobs import RayJobInfo, RayJobState

from .fake_ray import Clock, step
from .test_spot_check_coin import submit_all
from .test_verification_rounds import FORGED, GOOD, CopiesRay, reconciler, replicated_job, volunteers


class DriverNodeRay(CopiesRay):
    """Ray whose job records name the node a driver ran on, and whose logs are read from there."""

    def __init__(self, present: list[str]) -> None:
        super().__init__(present)
        self.driver_of: dict[str, str] = {}
        self.logs_on_node: dict[tuple[str, str], str] = {}

    async def get(self, submission_id: str) -> RayJobInfo | None:
        info = self.jobs.get(submission_id)
        if info is None or submission_id not in self.driver_of:
            return info
        return RayJobInfo(
            info.submission_id,
            info.state,
            info.message,
            self.driver_of[submission_id],
            info.start_time_ms,
            info.end_time_ms,
            info.driver_exit_code,
            info.error_type,
        )

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        return self.logs_on_node.get((submission_id, driver_node_id or ""), "")

    def ended(self, submission_id: str, ray_node_id: str, log: str) -> None:
        """The copy succeeded with its driver on `ray_node_id`, printing `log` there."""
        self.driver_of[submission_id] = ray_node_id
        self.logs_on_node[(submission_id, ray_node_id)] = log
        self.set_state(submission_id, RayJobState.SUCCEEDED)


async def placed(ray: DriverNodeRay, clock: Clock) -> tuple[Any, dict[str, Any], list[str], dict[str, str]]:
    """A quorum-2 job with its two copies submitted; the Ray node id recorded for each node."""
    rec, body = reconciler(ray, clock), replicated_job()
    ids = await submit_all(rec, ray, clock, body, volunteers(ray.present))
    status = body["status"]
    assert status["assignedNodes"] == ["vn-a", "vn-c"], status["assignedNodes"]
    return rec, body, ids, dict(zip(status["assignedNodes"], status["rayNodeIds"], strict=True))


async def test_a_copys_answer_is_not_taken_from_another_copys_node(caplog: pytest.LogCaptureFixture) -> None:
    """Copy 1 is placed on carol's node, but Ray's record says its driver ran on alice's node (the
    node that also runs copy 0): that answer was counted as carol's, and alice alone made the
    quorum of two owners. It is now no answer, and carol is not charged for it."""
    ray, clock = DriverNodeRay(["vn-a", "vn-c"]), Clock()
    rec, body, ids, ray_ids = await placed(ray, clock)
    for sid in ids:
        ray.ended(sid, ray_ids["vn-a"], FORGED)  # both drivers "ran" on alice's node
    clock.advance(40)
    with caplog.at_level(logging.WARNING, logger="koinon_operator.reconciler"):
        outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert status["reason"] != "Verified", status["verification"]
    assert status["verification"]["failed"] == ["vn-c"]
    assert not [charge for charge in outcome.reputation if charge[0] == "vn-c"], outcome.reputation
    warning = next(r.getMessage() for r in caplog.records if ids[1] in r.getMessage())
    assert ray_ids["vn-a"] in warning and ray_ids["vn-c"] in warning and "vn-c" in warning


async def test_copies_whose_drivers_ran_on_their_own_nodes_are_verified() -> None:
    ray, clock = DriverNodeRay(["vn-a", "vn-c"]), Clock()
    rec, body, ids, ray_ids = await placed(ray, clock)
    for sid, node in zip(ids, ["vn-a", "vn-c"], strict=True):
        ray.ended(sid, ray_ids[node], GOOD)
    clock.advance(40)
    outcome = await step(rec, body, volunteers(ray.present))
    assert body["status"]["reason"] == "Verified", body["status"]
    assert sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-c", "agreement")]


async def test_an_attempt_whose_every_driver_ran_elsewhere_fails_blaming_nobody() -> None:
    """No answer at all: counted against backoffLimit (an impostor cannot hold the job for ever
    with uncounted reruns), but no volunteer of the attempt is charged."""
    ray, clock = DriverNodeRay(["vn-a", "vn-c"]), Clock()
    rec, body, ids, ray_ids = await placed(ray, clock)
    ray.ended(ids[0], ray_ids["vn-c"], GOOD)
    ray.ended(ids[1], ray_ids["vn-a"], GOOD)
    clock.advance(40)
    outcome = await step(rec, body, volunteers(ray.present))
    status = body["status"]
    assert (status["phase"], status["failures"]) == ("Pending", 1), status
    assert "another Ray node" in status["message"]
    assert outcome.reputation == []
