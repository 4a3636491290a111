"""The work an attempt's Ray copies did, per node: the hours of execution behind the scheduler's
crash rate (reputation.exposureHours) and the GPU-seconds a VolunteerNode has contributed.

Pure computation, then reconciler passes against a fake Ray Job API (tests/aijob/fake_ray.py):
whatever way the attempt ends, its outcome carries its nodes' work."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from koinon_operator.ray_jobs import RayJobInfo, RayJobState, RayNodeInfo
from koinon_operator.reconciler import NodeWork, attempt_work, submission_id_for

from .fake_ray import NODES, UID, Clock, FakeRay, make_body, make_reconciler, step, stop_stamped

SUBMISSION = submission_id_for(UID, 1)
NOW_MS = 1_800_000_000_000.0


def info(start_ms: float | None, end_ms: float | None, state: RayJobState = RayJobState.SUCCEEDED) -> RayJobInfo:
    return RayJobInfo("s", state, "", None, None if start_ms is None else int(start_ms),
                      None if end_ms is None else int(end_ms), 0)  # fmt: skip


def test_each_replica_node_is_credited_its_copys_run_time() -> None:
    two_hours = info(NOW_MS - 3 * 3_600_000, NOW_MS - 3_600_000)
    work = attempt_work([(("vn-a", "vn-b"), two_hours)], gpus_per_replica=2, now_ms=NOW_MS)
    # Hours per execution, as the simulator's record_work counts them; GPU-seconds times the GPUs.
    assert work == {"vn-a": NodeWork(2.0, 14_400.0), "vn-b": NodeWork(2.0, 14_400.0)}


def test_a_copy_ray_has_not_ended_runs_until_now() -> None:
    work = attempt_work([(("vn-a",), info(NOW_MS - 90_000, None, RayJobState.RUNNING))], 1, NOW_MS)
    assert work["vn-a"].gpu_seconds == pytest.approx(90.0)
    assert work["vn-a"].hours == pytest.approx(90.0 / 3600)


def test_copies_that_never_ran_do_no_work_and_a_node_with_two_replicas_counts_both() -> None:
    copies: list[tuple[tuple[str, ...], RayJobInfo | None]] = [
        (("vn-a", "vn-a"), info(NOW_MS - 10_000, NOW_MS)),  # one node holding both replicas
        (("vn-b", "vn-c"), None),  # never submitted
        (("vn-d", "vn-e"), info(None, None, RayJobState.PENDING)),  # Ray recorded no start
        (("vn-f", "vn-g"), info(NOW_MS, NOW_MS - 5)),  # an end before the start: no work, not negative
    ]
    work = attempt_work(copies, 0.5, NOW_MS)
    assert work == {"vn-a": NodeWork(20.0 / 3600, 10.0)}


def test_a_cpu_only_job_has_hours_of_work_but_no_gpu_seconds() -> None:
    work = attempt_work([(("vn-a",), info(NOW_MS - 3_600_000, NOW_MS))], 0, NOW_MS)
    assert work == {"vn-a": NodeWork(1.0, 0.0)}


async def _running(ray: FakeRay, clock: Clock, spec: dict[str, Any]) -> dict[str, Any]:
    reconciler = make_reconciler(ray, clock)
    body = make_body(spec)
    await step(reconciler, body)  # placed
    await step(reconciler, body)  # submitted
    start_ms = int(clock.now.timestamp() * 1000)
    ray.jobs[SUBMISSION] = RayJobInfo(SUBMISSION, RayJobState.RUNNING, "", "r1", start_ms, None, None)
    outcome = await step(reconciler, body)
    assert body["status"]["phase"] == "Running"
    assert outcome.work == {}  # still running: nothing counted yet
    return body


@pytest.mark.parametrize(
    ("spec", "state", "ran_s", "exit_code", "phase", "evidence", "work"),
    [
        ({"resources": {"gpus": 1}}, RayJobState.SUCCEEDED, 1_800, 0, "Succeeded", [("vn-1", "success")],
         NodeWork(0.5, 1_800.0)),
        # No evidence is charged for the job's own exit code, but the node worked all the same.
        ({"backoffLimit": 0}, RayJobState.FAILED, 60, 1, "Failed", [], NodeWork(60.0 / 3600, 60.0)),
    ],
)  # fmt: skip
async def test_an_ended_jobs_outcome_carries_the_work_of_its_node(
    spec: dict[str, Any],
    state: RayJobState,
    ran_s: int,
    exit_code: int,
    phase: str,
    evidence: list[tuple[str, str]],
    work: NodeWork,
) -> None:
    ray, clock = FakeRay(), Clock()
    body = await _running(ray, clock, {"entrypoint": "python x.py", **spec})
    start_ms = ray.jobs[SUBMISSION].start_time_ms
    assert start_ms is not None
    ray.jobs[SUBMISSION] = RayJobInfo(SUBMISSION, state, "", "r1", start_ms, start_ms + ran_s * 1000, exit_code)
    clock.advance(ran_s + 60)
    outcome = await step(make_reconciler(ray, clock), body)
    assert body["status"]["phase"] == phase
    assert outcome.reputation == evidence
    assert outcome.work == {"vn-1": work}
    # The finished job's later passes count nothing again.
    assert (await step(make_reconciler(ray, clock), body)).work == {}


@dataclass
class StoppingRay(FakeRay):
    """Ray that stamps a stopped job's end time, as Ray does."""

    clock: Clock = field(default_factory=Clock)

    async def stop(self, submission_id: str) -> None:
        stop_stamped(self, submission_id, self.clock)


async def test_a_suspended_job_credits_the_work_up_to_its_stop() -> None:
    clock = Clock()
    ray = StoppingRay(clock=clock)
    body = await _running(ray, clock, {"entrypoint": "python x.py"})
    clock.advance(300)
    body["spec"]["suspend"] = True
    outcome = await step(make_reconciler(ray, clock), body)
    assert body["status"]["phase"] == "Suspended"
    assert SUBMISSION in ray.stopped
    assert outcome.work == {"vn-1": NodeWork(300.0 / 3600, 300.0)}


@dataclass
class LosingRay(StoppingRay):
    """Ray whose only volunteer's Ray node has died."""

    lost: bool = False

    async def nodes(self) -> list[RayNodeInfo]:
        return [replace(NODES[0], alive=not self.lost)]


async def test_a_lost_nodes_work_up_to_now_is_credited_with_its_timeout() -> None:
    clock = Clock()
    ray = LosingRay(clock=clock)
    body = await _running(ray, clock, {"entrypoint": "python x.py", "resources": {"gpus": 1}})
    ray.lost = True
    clock.advance(600)
    outcome = await step(make_reconciler(ray, clock), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "NodeLost")
    assert outcome.reputation == [("vn-1", "timeout")]
    assert outcome.work == {"vn-1": NodeWork(600.0 / 3600, 600.0)}
