"""How an attempt ended, when the operator looks only later (it was down, or a pass came late):
the deadline is judged by when the job ended, counted from when Ray started it, a node is lost when
its Ray node is (whatever name the replacement carries, and while the job still runs), a job's own
failure stays its own, and a driver log that left with its node does not hold the job in Running.

Reconciler passes against a fake Ray Job API (tests/aijob/fake_ray.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any

import pytest
from koinon_operator.inventory import RayNodeCache
from koinon_operator.placement import FirstFitPlacer
from koinon_operator.ray_jobs import RayJobInfo, RayJobState, RayNodeInfo, RayUnavailableError
from koinon_operator.reconciler import AIJobReconciler, copy_submission_id, submission_id_for
from koinon_operator.scheduling import ReputationPlacer

from .fake_ray import NODES, UID, VOLUNTEERS, Clock, FakeRay, make_body, make_reconciler, no_nonce, step, volunteer

SUBMISSION = submission_id_for(UID, 1)


@dataclass
class ChangingRay(FakeRay):
    """Ray whose node list the test changes, and whose job logs are gone with a dead driver node."""

    node_list: list[RayNodeInfo] | None = None

    async def nodes(self) -> list[RayNodeInfo]:
        return NODES if self.node_list is None else self.node_list

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        info = self.jobs[submission_id]
        alive = {n.node_id for n in await self.nodes() if n.alive}
        if info.driver_node_id is not None and info.driver_node_id not in alive:
            raise RayUnavailableError("unexpected reply to job logs (500)")  # what Ray 2.60 answers
        return await super().logs(submission_id, driver_node_id, lines)


async def running(ray: FakeRay, clock: Clock, spec: dict[str, Any]) -> dict[str, Any]:
    reconciler = make_reconciler(ray, clock)
    body = make_body(spec)
    await step(reconciler, body)  # placed
    await step(reconciler, body)  # submitted
    ray.set_state(SUBMISSION, RayJobState.RUNNING)
    await step(reconciler, body)
    assert body["status"]["phase"] == "Running"
    return body


def ended(
    state: RayJobState, start_ms: int, end_ms: int | None, exit_code: int | None, driver: str = "r1"
) -> RayJobInfo:
    return RayJobInfo(SUBMISSION, state, "", driver, start_ms, end_ms, exit_code)


async def test_a_job_that_ended_within_its_deadline_while_the_operator_was_away_succeeds() -> None:
    ray, clock = ChangingRay(), Clock()
    body = await running(ray, clock, {"entrypoint": "python x.py", "activeDeadlineSeconds": 60})
    start_ms = int(clock.now.timestamp() * 1000)
    ray.jobs[SUBMISSION] = ended(RayJobState.SUCCEEDED, start_ms, start_ms + 20_000, 0)
    clock.advance(120)  # the operator was down for two minutes
    await step(make_reconciler(ray, clock), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Succeeded", "Completed"), body["status"]
    assert ray.stopped == []


async def test_a_job_that_ended_after_its_deadline_fails_for_it() -> None:
    ray, clock = ChangingRay(), Clock()
    body = await running(ray, clock, {"entrypoint": "python x.py", "activeDeadlineSeconds": 60})
    start_ms = int(clock.now.timestamp() * 1000)
    ray.jobs[SUBMISSION] = ended(RayJobState.SUCCEEDED, start_ms, start_ms + 90_000, 0)
    clock.advance(120)
    await step(make_reconciler(ray, clock), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "DeadlineExceeded")


async def test_a_job_still_running_past_its_deadline_is_stopped_and_fails() -> None:
    ray, clock = ChangingRay(), Clock()
    body = await running(ray, clock, {"entrypoint": "python x.py", "activeDeadlineSeconds": 60})
    clock.advance(61)
    await step(make_reconciler(ray, clock), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "DeadlineExceeded")
    assert ray.stopped == [SUBMISSION]


async def submitted(ray: FakeRay, clock: Clock, spec: dict[str, Any]) -> dict[str, Any]:
    """A job whose Ray submission went out; the operator has not seen it run."""
    reconciler = make_reconciler(ray, clock)
    body = make_body(spec)
    await step(reconciler, body)  # placed
    await step(reconciler, body)  # submitted
    assert body["status"]["phase"] == "Scheduled" and SUBMISSION in ray.jobs
    return body


async def test_the_deadline_counts_from_rays_start_when_the_operator_first_sees_the_job_late() -> None:
    """The job started while the operator was down for an hour: startTime was the moment the
    operator first saw it Running, and the job got another full activeDeadlineSeconds from then."""
    ray, clock = ChangingRay(), Clock()
    body = await submitted(ray, clock, {"entrypoint": "python x.py", "activeDeadlineSeconds": 60})
    start_ms = int(clock.now.timestamp() * 1000)
    ray.jobs[SUBMISSION] = ended(RayJobState.RUNNING, start_ms, None, None)
    clock.advance(3600)
    await step(make_reconciler(ray, clock), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "DeadlineExceeded"), body["status"]
    assert body["status"]["startTime"] == "2026-01-01T00:00:10.000000Z"  # Ray's start, not the operator's look
    assert ray.stopped == [SUBMISSION]


@pytest.mark.parametrize(
    ("ran_s", "phase", "reason"), [(100, "Failed", "DeadlineExceeded"), (20, "Succeeded", "Completed")]
)
async def test_a_job_that_ended_unseen_is_judged_by_its_deadline_from_rays_start(
    ran_s: int, phase: str, reason: str
) -> None:
    """Ran 100 s (or 20 s) of a 60 s deadline and ended while the operator was down, never seen
    Running: with no startTime the deadline was not judged at all, and the 100 s job Succeeded
    (had the operator been up, it would have been stopped at 60 s). startTime is Ray's start."""
    ray, clock = ChangingRay(), Clock()
    body = await submitted(ray, clock, {"entrypoint": "python x.py", "activeDeadlineSeconds": 60})
    start_ms = int(clock.now.timestamp() * 1000)
    ray.jobs[SUBMISSION] = ended(RayJobState.SUCCEEDED, start_ms, start_ms + ran_s * 1000, 0)
    clock.advance(300)
    await step(make_reconciler(ray, clock), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == (phase, reason), body["status"]
    assert body["status"]["startTime"] == "2026-01-01T00:00:10.000000Z"


async def test_a_volunteer_that_left_after_its_job_succeeded_does_not_hold_the_job_in_running() -> None:
    """The driver's log lives on its node: gone with it, Ray answers 500, and every pass used to
    back off and try again, for ever."""
    ray, clock = ChangingRay(), Clock()
    body = await running(ray, clock, {"entrypoint": "python x.py"})
    start_ms = int(clock.now.timestamp() * 1000)
    ray.jobs[SUBMISSION] = ended(RayJobState.SUCCEEDED, start_ms, start_ms + 5_000, 0)
    ray.node_list = [replace(NODES[0], alive=False)]
    clock.advance(30)
    outcome = await step(make_reconciler(ray, clock), body)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Completed"), status
    assert "could not be read" in status["result"]["unavailable"]
    # Its node took the result away, perhaps an honest agent's drain right after the end: neither
    # credited a success nor charged (test_lease_loss_and_leftovers.py).
    assert outcome.reputation == []
    assert "ResultUnavailable" in [event.reason for event in outcome.events]


async def test_logs_unreadable_while_the_driver_node_lives_are_tried_again() -> None:
    @dataclass
    class FlakyLogs(ChangingRay):
        async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
            raise RayUnavailableError("dashboard agent restarting")

    ray, clock = FlakyLogs(), Clock()
    body = await running(ray, clock, {"entrypoint": "python x.py"})
    ray.set_state(SUBMISSION, RayJobState.SUCCEEDED, exit_code=0)  # Ray's end time: long past
    await step(make_reconciler(ray, clock), body)  # Ray counts as unavailable: the pass is tried again
    assert body["status"]["phase"] == "Running"
    # Not for ever: LOG_UNSERVED_GIVE_UP_SECONDS after the operator's first failed read, the log
    # is taken for gone (test_lease_loss_and_leftovers.py).


async def test_an_agent_restart_under_the_same_name_is_a_lost_node_not_a_failure() -> None:
    """The restarted agent's Ray node carries the same koinon.dev/node label: compared by name, the
    node was never lost, and the volunteer was charged a failure (with backoffLimit 0: job Failed)."""
    ray, clock = ChangingRay(), Clock()
    body = await running(ray, clock, {"entrypoint": "python x.py", "backoffLimit": 0})
    assert body["status"]["rayNodeIds"] == ["r1"]
    ray.node_list = [replace(NODES[0], alive=False), replace(NODES[0], node_id="r2")]
    ray.set_state(SUBMISSION, RayJobState.FAILED, message="Job supervisor actor died")
    clock.advance(10)
    outcome = await step(make_reconciler(ray, clock), body)
    assert outcome.reputation == [("vn-1", "timeout")]
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "NodeLost")


async def test_a_job_that_failed_on_its_own_is_not_rerun_because_its_volunteer_left_afterwards() -> None:
    ray, clock = ChangingRay(), Clock()
    body = await running(ray, clock, {"entrypoint": "python x.py", "backoffLimit": 0})
    ray.set_state(SUBMISSION, RayJobState.FAILED, exit_code=1, message="exit 1")
    ray.node_list = [replace(NODES[0], alive=False)]
    clock.advance(10)
    outcome = await step(make_reconciler(ray, clock), body)
    assert outcome.reputation == []
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "BackoffLimitExceeded")


TWO_NODES = [
    RayNodeInfo("r1", "127.0.20.1", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": "vn-a"}),
    RayNodeInfo("r2", "127.0.20.2", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": "vn-b"}),
]


async def two_copies_submitted(
    backoff_limit: int = 3,
) -> tuple[ChangingRay, AIJobReconciler, dict[str, Any], dict[str, dict[str, Any]]]:
    """A replicated job (quorum 2) whose two copies, on vn-a and vn-b, are submitted."""
    volunteers = {"vn-a": volunteer("alice", "127.0.20.1"), "vn-b": volunteer("bob", "127.0.20.2")}
    ray, clock = ChangingRay(node_list=list(TWO_NODES)), Clock()
    fake: Any = ray
    reconciler = AIJobReconciler(
        ray=fake,
        placer=ReputationPlacer(clock=lambda: clock.now.timestamp()),  # places verification copies
        nodes=RayNodeCache(fake, max_age_seconds=0.0),
        clock=lambda: clock.now,
        monotonic=lambda: clock.mono,
        submission_nonce=no_nonce,
    )
    spec = {"entrypoint": "python x.py", "backoffLimit": backoff_limit}
    body = make_body({**spec, "verification": {"mode": "replicated", "quorum": 2}})
    for _ in range(4):
        await step(reconciler, body, volunteers)
        clock.advance(40)
    assert len(ray.jobs) == 2, body["status"]
    return ray, reconciler, body, volunteers


def both_end_then_the_second_node_leaves(
    ray: ChangingRay, body: dict[str, Any], state: RayJobState, exit_code: int
) -> str:
    """Both copies end as ``state`` on their own nodes; then the second copy's node leaves (its
    name is returned)."""
    for copy in range(2):
        submission = copy_submission_id(UID, 1, copy)
        driver = body["status"]["rayNodeIds"][copy]
        ray.jobs[submission] = RayJobInfo(submission, state, f"exit {exit_code}", driver, 1, 2, exit_code)
    gone: str = body["status"]["assignedNodes"][1]
    ray.node_list = [n if n.labels["koinon.dev/node"] != gone else replace(n, alive=False) for n in TWO_NODES]
    return gone


async def test_a_verified_copy_whose_node_left_with_its_log_counts_as_no_answer() -> None:
    """Two copies: one answers, the other's node left after it succeeded (its log went with it).
    No majority; the departed node gets a timeout (it left), not a failure, and nobody else is charged."""
    ray, reconciler, body, volunteers = await two_copies_submitted()
    gone = both_end_then_the_second_node_leaves(ray, body, RayJobState.SUCCEEDED, exit_code=0)
    outcome = await step(reconciler, body, volunteers)
    assert body["status"]["reason"] == "NoMajority", body["status"]
    assert outcome.reputation == [(gone, "timeout")]


async def test_a_driver_killed_by_a_signal_when_its_node_left_is_a_lost_node() -> None:
    """A node that shuts down kills its driver: that exit is the node's leaving, not the job's."""
    ray, clock = ChangingRay(), Clock()
    body = await running(ray, clock, {"entrypoint": "python x.py", "backoffLimit": 0})
    ray.set_state(SUBMISSION, RayJobState.FAILED, exit_code=-15, message="exit -15")
    ray.node_list = [replace(NODES[0], alive=False)]
    clock.advance(10)
    outcome = await step(make_reconciler(ray, clock), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "NodeLost")
    assert outcome.reputation == [("vn-1", "timeout")]


async def test_verified_copies_that_failed_on_their_own_stay_failed_when_a_node_leaves_afterwards() -> None:
    ray, reconciler, body, volunteers = await two_copies_submitted(backoff_limit=0)
    both_end_then_the_second_node_leaves(ray, body, RayJobState.FAILED, exit_code=1)
    outcome = await step(reconciler, body, volunteers)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert outcome.reputation == []


async def test_a_copy_that_failed_on_its_own_is_not_charged_when_the_other_copys_log_left() -> None:
    """No copy answered: one's log left with its node, the other exited 1 on its own and its node
    left only afterwards. Only the first node took something away."""
    ray, reconciler, body, volunteers = await two_copies_submitted()
    nodes, ids = body["status"]["assignedNodes"], body["status"]["rayNodeIds"]
    first, second = copy_submission_id(UID, 1, 0), copy_submission_id(UID, 1, 1)
    ray.jobs[first] = RayJobInfo(first, RayJobState.SUCCEEDED, "", ids[0], 1, 2, 0)
    ray.jobs[second] = RayJobInfo(second, RayJobState.FAILED, "exit 1", ids[1], 1, 2, 1)
    ray.node_list = [replace(n, alive=False) for n in TWO_NODES]
    outcome = await step(reconciler, body, volunteers)
    assert outcome.reputation == [(nodes[0], "timeout")]
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "NodeLost")


TWO_OWNERS = {"vn-a": volunteer("alice", "127.0.20.1"), "vn-b": volunteer("bob", "127.0.20.2")}


async def running_on_two_nodes() -> tuple[ChangingRay, Clock, AIJobReconciler, dict[str, Any]]:
    """A replicas=2 job placed on vn-a and vn-b, submitted and Running."""
    ray, clock = ChangingRay(node_list=list(TWO_NODES)), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python train.py", "replicas": 2})
    await step(reconciler, body, TWO_OWNERS)  # placed on vn-a and vn-b
    await step(reconciler, body, TWO_OWNERS)  # submitted
    ray.set_state(SUBMISSION, RayJobState.RUNNING)
    await step(reconciler, body, TWO_OWNERS)
    assert body["status"]["phase"] == "Running" and body["status"]["assignedNodes"] == ["vn-a", "vn-b"]
    return ray, clock, reconciler, body


async def test_a_multi_replica_job_whose_other_node_left_mid_run_fails_over() -> None:
    """replicas=2: the driver on vn-a pins replica 1's tasks to vn-b (examples/koinon_examples/
    placement.py). With vn-b's Ray node dead those tasks cannot run, the driver waits for ever and
    Ray keeps the job RUNNING; lost nodes were looked for only once every Ray job had ended, so the
    AIJob stayed Running for good, holding vn-a's GPU."""
    ray, clock, reconciler, body = await running_on_two_nodes()
    ray.node_list = [TWO_NODES[0], replace(TWO_NODES[1], alive=False)]  # vn-b's volunteer left
    clock.advance(60)
    outcome = await step(reconciler, body, TWO_OWNERS)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "NodeLost"), body["status"]
    assert ray.stopped == [SUBMISSION]
    assert outcome.reputation == [("vn-b", "timeout")]
    assert body["status"]["scheduling"]["lostNodes"] == ["vn-b"]  # tried last on the next attempt
    assert body["status"]["failures"] == 0  # not the job's fault: uncounted


async def test_a_running_job_whose_nodes_all_live_keeps_running() -> None:
    ray, clock, reconciler, body = await running_on_two_nodes()
    for _ in range(3):
        clock.advance(60)
        await step(reconciler, body, TWO_OWNERS)
    assert body["status"]["phase"] == "Running" and ray.stopped == []


THREE_NODES = [
    RayNodeInfo("r1", "127.0.20.1", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": "vn-a"}),
    RayNodeInfo("r2", "127.0.20.2", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": "vn-b"}),
    RayNodeInfo("r3", "127.0.20.3", True, False, {"GPU": 1, "CPU": 4}, {"koinon.dev/node": "vn-c"}),
]
THREE_OWNERS = {
    "vn-a": volunteer("alice", "127.0.20.1"),
    "vn-b": volunteer("bob", "127.0.20.2"),
    "vn-c": volunteer("carol", "127.0.20.3"),
}


async def test_a_copy_whose_node_left_after_it_succeeded_does_not_fail_over_the_copies_still_running() -> None:
    # Copy 0 succeeded, then its volunteer went home; copies 1 and 2 still run. The attempt waits
    # for them and is judged: the finished copy's node is not "lost mid-job" (nor charged for it).
    ray, clock = ChangingRay(node_list=list(THREE_NODES)), Clock()
    fake: Any = ray
    reconciler = AIJobReconciler(
        ray=fake,
        placer=ReputationPlacer(clock=lambda: clock.now.timestamp()),
        nodes=RayNodeCache(fake, max_age_seconds=0.0),
        clock=lambda: clock.now,
        monotonic=lambda: clock.mono,
        submission_nonce=no_nonce,
    )
    body = make_body({"entrypoint": "python x.py", "verification": {"mode": "replicated", "quorum": 3}})
    for _ in range(5):
        await step(reconciler, body, THREE_OWNERS)
        clock.advance(40)
    assert len(ray.jobs) == 3, body["status"]
    ids = body["status"]["rayNodeIds"]
    for k in range(3):
        sub = copy_submission_id(UID, 1, k)
        state = RayJobState.SUCCEEDED if k == 0 else RayJobState.RUNNING
        ray.jobs[sub] = RayJobInfo(sub, state, "", ids[k], 1, 2 if k == 0 else None, 0 if k == 0 else None)
    await step(reconciler, body, THREE_OWNERS)
    first_node = body["status"]["assignedNodes"][0]
    ray.node_list = [n if n.node_id != ids[0] else replace(n, alive=False) for n in THREE_NODES]
    clock.advance(30)
    outcome = await step(reconciler, body, THREE_OWNERS)
    assert ray.stopped == [], body["status"]
    assert (first_node, "timeout") not in outcome.reputation
    for k in (1, 2):
        sub = copy_submission_id(UID, 1, k)
        ray.jobs[sub] = RayJobInfo(sub, RayJobState.SUCCEEDED, "", ids[k], 1, 3, 0)
    clock.advance(30)
    await step(reconciler, body, THREE_OWNERS)
    assert body["status"]["phase"] == "Succeeded", body["status"]


@dataclass
class CountingNodesRay(FakeRay):
    node_calls: int = 0

    async def nodes(self) -> list[RayNodeInfo]:
        self.node_calls += 1
        await asyncio.sleep(0.01)  # a real request takes a while
        return NODES


async def test_concurrent_passes_of_running_jobs_share_one_node_list_fetch() -> None:
    # Every pass of a running job checks its nodes; kopf's timers of many jobs fire together, and
    # each finding the cache stale must not send its own request to Ray's node API.
    ray, clock = CountingNodesRay(), Clock()
    fake: Any = ray
    reconciler = AIJobReconciler(
        ray=fake,
        placer=FirstFitPlacer(),
        nodes=RayNodeCache(fake),
        clock=lambda: clock.now,
        monotonic=lambda: clock.mono,
        submission_nonce=no_nonce,
    )
    bodies: list[dict[str, Any]] = []
    for i in range(100):
        uid = f"00000000-0000-0000-0000-{i:012d}"
        sub = submission_id_for(uid, 1)
        bodies.append({
            "metadata": {"name": f"j{i}", "namespace": "ns", "uid": uid, "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z", "resourceVersion": "1"},
            "spec": {"entrypoint": "python x.py"},
            "status": {"phase": "Running", "attempts": 1, "failures": 0, "submissionId": sub,
                       "assignedNodes": ["vn-1"], "rayNodeIds": ["r1"], "startTime": "2026-01-01T00:00:01Z",
                       "traceId": "0" * 32},
        })  # fmt: skip
        ray.jobs[sub] = RayJobInfo(sub, RayJobState.RUNNING, "", "r1", 1, None, None)
    volunteers = VOLUNTEERS
    outcomes = await asyncio.gather(*(step(reconciler, b, volunteers) for b in bodies))
    assert ray.node_calls == 1
    assert not any(o.events for o in outcomes)
    assert all(b["status"]["phase"] == "Running" for b in bodies)


async def test_a_replica_node_leaving_does_not_take_the_drivers_log_for_gone() -> None:
    """replicas=2 on vn-a (driver) and vn-b. Ray records no driver node (the log is read through
    the head's job API), one read of it fails, and vn-b, which only ran replica 1's tasks, left
    after the job succeeded. The log was taken for gone (any of the copy's nodes lost): concluded
    without it, the driver's living node vn-a charged a timeout for vn-b's departure and vn-b
    credited. Ray pins the driver to vn-a: the read is tried again, and the result kept."""
    ray, clock, rec, body = await running_on_two_nodes()
    failures = [1]

    async def one_failure(submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        if failures[0]:
            failures[0] -= 1
            raise RayUnavailableError("unexpected reply to job logs (503)")
        return "KOINON_RESULT 42\n"

    ray.logs = one_failure  # type: ignore[method-assign]
    ray.set_state(SUBMISSION, RayJobState.SUCCEEDED, exit_code=0)  # driver_node_id None
    ray.node_list = [TWO_NODES[0], replace(TWO_NODES[1], alive=False)]  # vn-b left after the end
    outcome = await step(rec, body, TWO_OWNERS)
    assert body["status"]["phase"] == "Running" and outcome.reputation == []  # Ray unavailable: again
    clock.advance(10)
    outcome = await step(rec, body, TWO_OWNERS)
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert body["status"]["result"].get("value") == "42", body["status"]["result"]
    assert outcome.reputation == [("vn-a", "success"), ("vn-b", "success")]
