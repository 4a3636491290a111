"""What a pass must not do once its Lease has run out, and what must not outlive a job: a stale
status written after the reputation writes, a Ray submission after the new leader let the job go,
a driver log whose node never serves it holding a job Running for ever, a booking kept for a job
whose object went without its deletion handler, a backoff inherited by a job created again under
the same name, an attempt left running by the old leader's status write landing late. Reconciler
passes against a fake Ray Job API (tests/aijob/fake_ray.py)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from koinon_emulator.patching import merge_patch
from koinon_operator import handlers, reputation_book
from koinon_operator.api.constants import FINALIZER
from koinon_operator.inventory import Allocation
from koinon_operator.ray_jobs import RayJobInfo, RayJobState, RayNodeInfo, RayUnavailableError
from koinon_operator.reconciler import (
    LOG_GONE,
    LOG_UNSERVED,
    LOG_UNSERVED_GIVE_UP_SECONDS,
    Ledger,
    Outcome,
    allocation_of,
    keyed_submission_nonce,
    submission_id_for,
)

from .fake_ray import (
    NODES,
    UID,
    VOLUNTEERS,
    Clock,
    FakeRay,
    make_body,
    make_reconciler,
    node_address,
    step,
    volunteer,
)
from .kopf_patch import written_status
from .test_decided_vote import StampingRay, answered, started, submit_all
from .test_verification_rounds import GOOD, reconciler, replicated_job, volunteers


class Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


async def _timer_pass(memo: Any, body: dict[str, Any], patch: kopf.Patch | None = None) -> kopf.Patch:
    patch = patch if patch is not None else kopf.Patch()
    reconcile: Any = handlers.reconcile_aijob
    raw: Any = body
    await reconcile(body=kopf.Body(raw), patch=patch, memo=memo, namespace="ns", name="j",
                    aijob_allocations={}, volunteer_nodes={})  # fmt: skip
    return patch


# ---- 1. the status is handed to kopf only if the term still holds after the reputation writes


async def test_a_lease_lost_while_reputation_is_recorded_writes_no_stale_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """reconcile_aijob checked the term right after the pass, then awaited the reputation writes
    (a Kubernetes read-modify-write per node) and only then returned the patch kopf applies. A
    Lease that ran out during those writes (the API server slow or away from this pod: when
    renewals fail too) no longer stopped the stale status: the new leader may have placed and
    submitted the next attempt meanwhile, and this patch put the job back to Pending with no
    nodes, so the new leader placed and submitted yet another while the previous one ran."""
    leader = SimpleNamespace(is_leader=True, term=1)
    discarded: list[str] = []
    posted: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: posted.append(reason))

    class Reconciler:
        async def reconcile(self, *_: Any) -> Outcome:
            outcome = Outcome(
                status={"phase": "Pending", "reason": "BackOff", "assignedNodes": [], "failures": 1},
                reputation=[("vn-1", "failure")],
            )
            outcome.event("RayJobFailed", "attempt 1 failed", warning=True)
            return outcome

        def discard_write(self, key: str) -> None:
            discarded.append(key)

    recorded: list[Any] = []

    class SlowBook:
        async def record(self, *args: Any) -> None:
            recorded.append(args)
            if len(recorded) == 1:
                leader.is_leader = False  # the Lease ran out while the VolunteerNode writes hung

    memo = SimpleNamespace(leader=leader, reconciler=Reconciler(), tracer=Quiet(), reputation=SlowBook())
    meta = {"name": "j", "namespace": "ns", "uid": "u", "finalizers": [FINALIZER]}
    body = {"metadata": meta, "spec": {}, "status": {"phase": "Running"}}
    patch = await _timer_pass(memo, body)
    assert not patch, f"a pass whose lease ran out before its patch was applied still wrote {dict(patch)}"
    assert discarded == ["ns/j"] and posted == []
    # The evidence went first (idempotent by its key: the new leader's replay counts it once).
    assert recorded == [([("vn-1", "failure")], "u/0/0", {})]

    leader.is_leader = True  # still leading after the writes: the status is written, the event posted
    patch = await _timer_pass(memo, body)
    assert posted == [], "Events posted before kopf writes the status they go with"
    assert (written_status(patch, body) or {}).get("phase") == "Pending" and posted == ["RayJobFailed"]


def test_the_reputation_read_modify_write_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The VolunteerNode reads and writes ran with the client's default: no timeout. One request
    hung on a half-open connection held the AIJob pass waiting on it (and a worker thread) for good."""
    calls: list[tuple[str, Any]] = []

    class Api:
        def get_cluster_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            calls.append(("get", kwargs.get("_request_timeout")))
            return {"metadata": {"resourceVersion": "1"}, "status": {}}

        def patch_cluster_custom_object_status(self, *args: Any, **kwargs: Any) -> None:
            calls.append(("patch", kwargs.get("_request_timeout")))

        def list_cluster_custom_object(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            calls.append(("list", kwargs.get("_request_timeout")))
            return {"items": []}

    monkeypatch.setattr("kubernetes.client.CustomObjectsApi", Api)
    monkeypatch.setattr(reputation_book, "load_config", lambda: None)
    book = reputation_book.ReputationBook()
    book._apply("vn-1", "success", "u/0/0")
    book._volunteers()
    timeout = reputation_book.REQUEST_TIMEOUT_S
    assert calls == [("get", timeout), ("patch", timeout), ("list", timeout)], calls
    assert 0 < timeout <= 30


# ---- 2. no Ray submission from a pass that outlived its term


async def test_a_pass_that_outlives_its_lease_submits_nothing_to_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """The term check after the pass discards a stale pass's status, but nothing stopped its Ray
    submissions: a pass that began while leading and waited on Ray (each get or submit up to 10 s)
    submitted after its Lease ran out. Meanwhile the new leader handled the AIJob's deletion: it
    found nothing submitted to stop, and let the object go; the late submission ran for nobody."""
    monkeypatch.setattr(kopf, "event", lambda *a, **k: None)
    leader = SimpleNamespace(is_leader=True, term=1)
    clock = Clock()
    hand_over: list[Any] = []

    @dataclass
    class SlowRay(FakeRay):
        async def get(self, submission_id: str) -> RayJobInfo | None:
            found = await super().get(submission_id)
            while hand_over:  # the lease runs out while this request waits; the new leader acts
                await hand_over.pop()()
            return found

    ray = SlowRay()
    old = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    await step(old, body)
    assert body["status"]["phase"] == "Scheduled"  # placed; the submission is the next pass's
    new = make_reconciler(ray, clock)  # the other operator, which takes over

    async def lease_lost_then_deleted_by_new_leader() -> None:
        leader.is_leader = False
        deleting = copy.deepcopy(body)
        deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
        await new.stop(deleting)  # stops koinon-<uid>-1: not submitted yet, nothing runs

    hand_over.append(lease_lost_then_deleted_by_new_leader)
    memo = SimpleNamespace(leader=leader, reconciler=old, tracer=Quiet(), reputation=Quiet())
    patch = await _timer_pass(memo, copy.deepcopy(body))
    assert not patch
    assert ray.submissions == [], "Ray runs a submission for an AIJob deleted (and stopped) by the new leader"

    # The same pass in a term that still holds submits (and the next pass is not skipped).
    leader.is_leader = True
    await _timer_pass(memo, copy.deepcopy(body))
    assert [s.submission_id for s in ray.submissions] == [submission_id_for(UID, 1)]


async def test_a_pass_started_in_an_earlier_term_submits_nothing() -> None:
    """Leading again, in a new term: a pass begun in the earlier one must not submit either (the
    other operator led in between)."""
    ray, clock = FakeRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    await step(rec, body)
    term = [1]
    started_in = term[0]

    async def regained_meanwhile(submission_id: str) -> RayJobInfo | None:
        term[0] += 1
        return None

    ray.get = regained_meanwhile  # type: ignore[method-assign]
    outcome = await rec.reconcile(copy.deepcopy(body), {}, {}, lambda: term[0] == started_in)
    assert outcome.status == {} and outcome.events == [] and ray.submissions == []


# ---- 3. a driver log its live node never serves


@dataclass
class LogsNeverServed(FakeRay):
    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        raise RayUnavailableError("unexpected reply to job logs (500)")


async def _ended_single(ray: FakeRay, clock: Clock, spec: dict[str, Any], end_offset_ms: int = 10_000) -> Any:
    """A single copy, Running, then SUCCEEDED by Ray's record ``end_offset_ms`` after its start."""
    rec = make_reconciler(ray, clock)
    body = make_body(spec)
    await step(rec, body)  # placed
    await step(rec, body)  # submitted
    sub = submission_id_for(UID, 1)
    start_ms = int(clock.now.timestamp() * 1000)
    ray.jobs[sub] = RayJobInfo(sub, RayJobState.RUNNING, "", "r1", start_ms, None, None)
    await step(rec, body)
    assert body["status"]["phase"] == "Running"
    ray.jobs[sub] = RayJobInfo(sub, RayJobState.SUCCEEDED, "", "r1", start_ms, start_ms + end_offset_ms, 0)
    return rec, body


async def _until_concluded(rec: Any, body: dict[str, Any], clock: Clock, *extra: Any) -> tuple[Outcome, float]:
    """Passes 10 s apart until the job leaves Running; the outcome of the last, and the seconds
    from the first of them to it."""
    first = clock.mono
    outcome = Outcome()
    for _ in range(200):
        if body["status"]["phase"] != "Running":
            break
        outcome = await step(rec, body, *extra)
        clock.advance(10)
    return outcome, clock.mono - 10 - first


async def test_a_driver_log_its_live_node_never_serves_does_not_hold_the_job_running_for_ever() -> None:
    """The job ended (SUCCEEDED, within activeDeadlineSeconds) but its driver's log cannot be read
    while its node stays alive (the node's own agent answers errors, or hangs). Every pass raised
    RayUnavailableError, retried for ever: the job stayed Running with RayReachable=False, its GPUs
    booked, its deadline never applied, and the volunteer charged nothing."""
    ray, clock = LogsNeverServed(), Clock()
    rec, body = await _ended_single(ray, clock, {"entrypoint": "python x.py", "activeDeadlineSeconds": 60})
    clock.advance(30)
    outcome, waited = await _until_concluded(rec, body, clock)
    assert waited >= LOG_UNSERVED_GIVE_UP_SECONDS  # a failing read is retried for a while
    assert waited < LOG_UNSERVED_GIVE_UP_SECONDS + 60  # and not for ever
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Completed"), status.get("message")
    assert status["result"] == {"unavailable": LOG_UNSERVED}
    assert "ResultUnavailable" in [e.reason for e in outcome.events]
    # Its living node withheld the log the whole time: charged a timeout as a verification copy
    # is, not credited a success for a result nobody received.
    assert outcome.reputation == [("vn-1", "timeout")]
    assert allocation_of(body) is None  # its GPUs are free again
    assert not rec._unserved  # nothing kept of a finished job


async def test_a_multi_replica_job_whose_driver_node_withholds_its_log_charges_that_node_only() -> None:
    """replicas=2 on vn-a (driver) and vn-b: only the driver's node serves the log; vn-b ran its
    replica, and Ray says the job succeeded."""
    from .test_ends_seen_late import SUBMISSION, TWO_OWNERS, running_on_two_nodes

    ray, clock, rec, body = await running_on_two_nodes()

    async def never_served(submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        raise RayUnavailableError("unexpected reply to job logs (500)")

    ray.logs = never_served  # type: ignore[method-assign]
    ray.set_state(SUBMISSION, RayJobState.SUCCEEDED, exit_code=0)
    outcome, _ = await _until_concluded(rec, body, clock, TWO_OWNERS)
    assert body["status"]["result"] == {"unavailable": LOG_UNSERVED}
    assert outcome.reputation == [("vn-b", "success"), ("vn-a", "timeout")]


class LeavesAfterItsJobEnded(FakeRay):
    """The driver's node takes its log away by leaving the cluster (its agent restarted: a new Ray
    node) right after its job ended, instead of withholding it while alive."""

    left = False

    async def nodes(self) -> list[RayNodeInfo]:
        return [replace(NODES[0], alive=not self.left)]

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        raise RayUnavailableError("unexpected reply to job logs (500)")


async def test_a_single_copys_node_that_leaves_with_its_log_is_neither_credited_nor_charged() -> None:
    """Leaving the cluster (LOG_GONE) right after the end was credited a success for a result
    nobody got; then (faacbe5) charged a timeout, as withholding the log while alive is: but an
    honest agent's drain stops Ray within a second of its last task, and so beats the operator's
    poll. No evidence either way: nothing for it, and a withholder that leaves gains nothing."""
    ray, clock = LeavesAfterItsJobEnded(), Clock()
    rec, body = await _ended_single(ray, clock, {"entrypoint": "python x.py"})
    ray.left = True
    clock.advance(30)
    outcome, waited = await _until_concluded(rec, body, clock)
    assert waited < 60  # no wait: its node is gone
    assert body["status"]["result"] == {"unavailable": LOG_GONE}
    assert "ResultUnavailable" in [e.reason for e in outcome.events]
    assert outcome.reputation == []


async def test_a_multi_replica_job_whose_driver_node_leaves_with_its_log_credits_the_others_only() -> None:
    from .test_ends_seen_late import SUBMISSION, TWO_NODES, TWO_OWNERS, running_on_two_nodes

    ray, clock, rec, body = await running_on_two_nodes()

    async def never_served(submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        raise RayUnavailableError("unexpected reply to job logs (500)")

    ray.logs = never_served  # type: ignore[method-assign]
    ray.set_state(SUBMISSION, RayJobState.SUCCEEDED, exit_code=0)
    ray.node_list = [replace(TWO_NODES[0], alive=False), TWO_NODES[1]]  # vn-a left after the end
    outcome, _ = await _until_concluded(rec, body, clock, TWO_OWNERS)
    assert body["status"]["result"] == {"unavailable": LOG_GONE}
    assert outcome.reputation == [("vn-b", "success")]


class ServesThenStops(FakeRay):
    """Serves its driver's log (no KOINON_RESULT line: it is optional) until ``failing``; then its
    reads fail, its node gone (``left``: the agent's drain stopped Ray) or still alive."""

    failing = False
    left = False

    async def nodes(self) -> list[RayNodeInfo]:
        return [replace(NODES[0], alive=not self.left)]

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        if self.failing:
            raise RayUnavailableError("unexpected reply to job logs (500)")
        return "epoch 10 done\n"


@pytest.mark.parametrize("left", [True, False])
async def test_a_result_less_log_served_before_it_settled_is_no_log_and_charged_to_no_one(left: bool) -> None:
    """The agent's SIGTERM drain stops Ray within 0.5 s of its last task ending. A log without a
    KOINON_RESULT line, read on the first pass that found the job SUCCEEDED, may still miss the
    driver's last lines (Ray reports SUCCEEDED before the log is flushed: the job may have printed
    KOINON_RESULT 42 last). Its node gone before it settled: the result is unavailable (not a
    result without the value the job printed), and the node neither charged (an honest drain: the
    node was once charged a timeout) nor credited. Its node alive: read again, not concluded."""
    from koinon_operator.reconciler import LOG_GONE, LOG_SETTLE_SECONDS

    ray, clock = ServesThenStops(), Clock()
    rec, body = await _ended_single(ray, clock, {"entrypoint": "python x.py"})
    clock.advance(1)
    await step(rec, body)  # the log is served: no result line yet, it settles
    assert body["status"]["phase"] == "Running"
    ray.failing, ray.left = True, left
    clock.advance(2 if left else LOG_SETTLE_SECONDS)
    outcome = await step(rec, body)
    if left:
        assert body["status"]["phase"] == "Succeeded", body["status"]  # gone: nothing more to wait for
        assert body["status"]["result"] == {"unavailable": LOG_GONE}
        assert outcome.reputation == []
        assert not rec._settling and not rec._unserved
    else:
        assert body["status"]["phase"] == "Running", body["status"]  # read again next pass
        assert outcome.reputation == []


async def test_a_log_without_a_result_line_settles_on_the_operators_clock() -> None:
    """A served log without a KOINON_RESULT line (it is optional) was waited for until the
    operator's clock was LOG_SETTLE_SECONDS past Ray's end time, which the volunteer's node stamps:
    a clock far ahead held the job Running for ever. Now LOG_SETTLE_SECONDS after the first pass
    that found it so, whatever Ray's end time says."""
    from koinon_operator.reconciler import LOG_SETTLE_SECONDS

    for end_offset_ms in (3_600_000, -3_600_000):  # the volunteer's clock an hour ahead, or behind
        ray, clock = FakeRay(logs_text="training done\n"), Clock()
        rec, body = await _ended_single(ray, clock, {"entrypoint": "python x.py"}, end_offset_ms=end_offset_ms)
        clock.advance(1)
        await step(rec, body)
        assert body["status"]["phase"] == "Running"  # the result line may not be flushed yet
        clock.advance(LOG_SETTLE_SECONDS)
        outcome = await step(rec, body)
        assert body["status"]["phase"] == "Succeeded", end_offset_ms
        assert outcome.reputation == [("vn-1", "success")]
        assert not rec._settling  # nothing kept of a finished job


class OneLogFailure(FakeRay):
    failures = 1

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        if self.failures:
            self.failures -= 1
            raise RayUnavailableError("timed out reading job logs")  # one blip, served on the next try
        return await super().logs(submission_id, driver_node_id, lines)


@pytest.mark.parametrize("why", ["operator down for 6 min", "volunteer clock 6 min behind"])
async def test_one_failed_read_long_after_ray_s_end_time_is_read_again(why: str) -> None:
    """The wait was counted from Ray's end time, which the job's supervisor stamps on the
    volunteer's node: an operator that first looked 6 min after the end (down for an upgrade), or
    a volunteer whose clock runs 6 min slow, made the first failed read final, and the single
    copy's result was lost (Succeeded with result.unavailable) for one blip."""
    ray, clock = OneLogFailure(), Clock()
    if why == "operator down for 6 min":
        rec, body = await _ended_single(ray, clock, {"entrypoint": "python x.py"})
        clock.advance(10 + LOG_UNSERVED_GIVE_UP_SECONDS + 60)
    else:
        rec, body = await _ended_single(
            ray, clock, {"entrypoint": "python x.py"}, end_offset_ms=-int((LOG_UNSERVED_GIVE_UP_SECONDS + 60) * 1000)
        )
        clock.advance(1)
    await step(rec, body)
    assert body["status"]["phase"] == "Running", body["status"].get("result")
    clock.advance(5)  # past the Ray backoff of the failed read
    outcome = await step(rec, body)
    assert body["status"]["result"].get("value") == "42", body["status"].get("result")
    assert outcome.reputation == [("vn-1", "success")]
    assert not rec._unserved


async def test_a_volunteer_clock_far_ahead_does_not_hold_the_job() -> None:
    """Ray's end time an hour in the future (the volunteer's clock) neither shortens nor lengthens
    the wait: it is timed on the operator's own clock from its first failed read."""
    ray, clock = LogsNeverServed(), Clock()
    rec, body = await _ended_single(ray, clock, {"entrypoint": "python x.py"}, end_offset_ms=3_600_000)
    clock.advance(1)
    _, waited = await _until_concluded(rec, body, clock)
    assert LOG_UNSERVED_GIVE_UP_SECONDS <= waited < LOG_UNSERVED_GIVE_UP_SECONDS + 60
    assert body["status"]["result"] == {"unavailable": LOG_UNSERVED}


async def test_the_wait_starts_again_after_a_change_of_leader_and_a_good_read_ends_it() -> None:
    """Failed reads recorded before a failover (another operator looked meanwhile, or nobody did)
    do not make one failed read after it final; a read that succeeds forgets the failures."""
    failing = [True]

    @dataclass
    class Switchable(FakeRay):
        async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
            if failing[0]:
                raise RayUnavailableError("unexpected reply to job logs (500)")
            return await super().logs(submission_id, driver_node_id, lines)

    ray, clock = Switchable(), Clock()
    rec, body = await _ended_single(ray, clock, {"entrypoint": "python x.py"})
    for _ in range(int(LOG_UNSERVED_GIVE_UP_SECONDS / 60)):  # failing for most of the wait
        clock.advance(50)
        await step(rec, body)
        assert body["status"]["phase"] == "Running"
    clock.advance(LOG_UNSERVED_GIVE_UP_SECONDS + 1)  # the operator was away: a failover
    rec.forget_memory()  # what a change of leader does (handlers: leader.on_change)
    await step(rec, body)
    assert body["status"]["phase"] == "Running"  # one failed read after the gap: read again
    failing[0] = False
    clock.advance(35)
    await step(rec, body)
    assert body["status"]["result"].get("value") == "42", body["status"].get("result")


async def test_passes_further_apart_than_the_wait_still_give_up_on_an_unserved_log() -> None:
    """KOINON_POLL_INTERVAL takes any number of seconds: with passes 6 min apart, every failed read
    found the one before it older than the wait and started the wait again (meant for an operator
    that first looks long after the end: a restart or a new leader, which clear this memory), so
    the job was held Running for ever."""
    ray, clock = LogsNeverServed(), Clock()
    rec, body = await _ended_single(ray, clock, {"entrypoint": "python x.py"})
    passes = 0
    while body["status"]["phase"] == "Running" and passes < 10:  # an hour of passes, 6 min apart
        clock.advance(360)
        await step(rec, body)
        passes += 1
    assert body["status"]["result"] == {"unavailable": LOG_UNSERVED}, rec._unserved
    assert passes == 3  # the third failed read, 12 min after the first


def test_failing_log_reads_kept_are_bounded_and_dropped_when_the_job_goes() -> None:
    from koinon_operator import reconciler as module

    clock = Clock()
    rec = make_reconciler(FakeRay(), clock)
    # More failing logs than kept, all of live jobs (read again meanwhile): none is dropped.
    for k in range(module.LOG_UNSERVED_KEPT + 10):
        assert not rec._log_unserved_long_enough(submission_id_for(f"u{k}", 1))
    assert len(rec._unserved) == module.LOG_UNSERVED_KEPT + 10
    # Entries no pass read for LOG_UNSERVED_STALE_SECONDS (their job went without its deletion
    # handler) go once the table is full.
    clock.mono += module.LOG_UNSERVED_STALE_SECONDS + 1
    rec._log_unserved_long_enough(submission_id_for(UID, 1))
    assert list(rec._unserved) == [submission_id_for(UID, 1)]
    rec._log_unserved_long_enough(f"{submission_id_for(UID, 2)}-copy1")
    rec._forget_log_waits(UID)
    assert not any(UID in s for s in rec._unserved)
    rec._log_unserved_long_enough(submission_id_for(UID, 3))
    rec.forget_memory()
    assert not rec._unserved


def test_more_failing_logs_than_kept_read_in_turn_are_each_given_up_on() -> None:
    """LOG_UNSERVED_KEPT + 1 submissions whose logs all fail, each read once per 10 s round: each
    new entry evicted the longest-quiet one, which in turn is the next read, so none ever reached
    3 failures: every one of those jobs stayed Running."""
    from koinon_operator import reconciler as module

    clock = Clock()
    rec = make_reconciler(FakeRay(), clock)
    subs = [submission_id_for(f"u{k}", 1) for k in range(module.LOG_UNSERVED_KEPT + 1)]
    given_up: set[str] = set()
    for _ in range(int(LOG_UNSERVED_GIVE_UP_SECONDS / 10) + 3):  # the wait, and 3 rounds more
        for sub in subs:
            if rec._log_unserved_long_enough(sub):
                given_up.add(sub)
            clock.mono += 10 / len(subs)
    assert given_up == set(subs)


async def test_a_stopped_job_s_failing_reads_are_forgotten() -> None:
    ray, clock = LogsNeverServed(), Clock()
    rec, body = await _ended_single(ray, clock, {"entrypoint": "python x.py"})
    clock.advance(30)
    await step(rec, body)
    assert rec._unserved
    await rec.stop(body)
    assert not rec._unserved


class CopyLogFails(StampingRay):
    """Ray whose reads of the copies' logs in ``failing`` (set once they are submitted) fail, as a
    live node answering its log's read with errors; with ``once``, only the first read of each
    fails (a blip, served on the next try)."""

    def __init__(
        self, present: list[str], clock: Clock, error: str = "unexpected reply to job logs (500)", once: bool = False
    ) -> None:
        super().__init__(present, clock)
        self.failing: set[str] = set()
        self.error = error
        self.once = once

    async def logs(self, submission_id: str, driver_node_id: str | None = None, lines: int = 2000) -> str:
        if submission_id in self.failing:
            if self.once:
                self.failing.discard(submission_id)
            raise RayUnavailableError(self.error)
        return await super().logs(submission_id, driver_node_id, lines)


async def _all_answered(ray: CopyLogFails, clock: Clock) -> tuple[Any, dict[str, Any], list[str]]:
    """Quorum 3 on the nodes of ``ray`` (alice, carol and dave), whose reads of dave's log fail as
    ``ray`` fails them: every copy ran 10 minutes and answered GOOD. The reconciler, the job's
    body and the copies' submission ids."""
    rec = reconciler(ray, clock)
    body = replicated_job(quorum=3)
    ids = await submit_all(rec, ray, clock, body)
    ray.failing = {ids[-1]}  # dave's
    started(ray, clock, ids)
    await step(rec, body, volunteers(ray.present))
    clock.advance(600)
    for sid in ids:
        answered(ray, clock, sid, GOOD)
    return rec, body, ids


async def test_one_copy_whose_log_is_never_served_does_not_hold_a_vote_the_others_decided() -> None:
    """README: one copy that never ends does not keep a decided job Running. Alice's and carol's
    copies agree; dave's copy ended too, but his (alive) node answers his log's read with errors:
    every pass raised, Running for ever, no evidence on dave. Now his log is taken for gone a
    bounded time after the first failed read: no answer, and charged as a node that took its log away."""
    clock = Clock()
    ray = CopyLogFails(["vn-a", "vn-c", "vn-d"], clock)
    rec, body, ids = await _all_answered(ray, clock)
    assert len(ids) == 3
    clock.advance(LOG_UNSERVED_GIVE_UP_SECONDS)
    await step(rec, body, volunteers(ray.present))
    assert body["status"]["phase"] == "Running"  # still read again: the failure may pass
    outcome, waited = await _until_concluded(rec, body, clock, volunteers(ray.present))
    assert LOG_UNSERVED_GIVE_UP_SECONDS - 10 <= waited < LOG_UNSERVED_GIVE_UP_SECONDS + 60
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Verified"), status.get("message")
    assert sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-c", "agreement"), ("vn-d", "timeout")]


async def test_an_honest_copy_s_one_failed_read_long_after_the_end_is_read_again() -> None:
    """Quorum 3, every copy agrees; the operator first looks 6 min after they ended (restarting,
    or dave's node stamped Ray's end time with a clock 6 min behind), and dave's log read fails
    once (his tunnel reconnecting). He was charged a timeout and his answer dropped, where the
    retry a few seconds later reads it."""
    clock = Clock()
    ray = CopyLogFails(["vn-a", "vn-c", "vn-d"], clock, error="timed out reading job logs", once=True)
    rec, body, _ = await _all_answered(ray, clock)
    clock.advance(LOG_UNSERVED_GIVE_UP_SECONDS + 60)
    await step(rec, body, volunteers(ray.present))
    assert body["status"]["phase"] == "Running"
    clock.advance(5)
    outcome = await step(rec, body, volunteers(ray.present))
    assert body["status"]["phase"] == "Succeeded"
    assert sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-c", "agreement"), ("vn-d", "agreement")]


def test_the_readme_names_the_time_a_log_is_waited_for() -> None:
    from pathlib import Path

    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    assert (
        f"has not served the log for {LOG_UNSERVED_GIVE_UP_SECONDS / 60:g} min since the operator's first failed read"
        in readme
    )


FIVE_OWNERS = {"vn-a": "alice", "vn-b": "bob", "vn-c": "carol", "vn-d": "dave", "vn-e": "erin"}


async def test_an_early_decision_counts_a_copy_whose_log_cannot_be_read_yet_as_not_answered() -> None:
    """Quorum 5: alice, carol and dave agree (a majority nobody can overturn), erin's copy runs on,
    and bob's copy ended but his log's read fails. The early decision read every succeeded copy's
    log and one failing read failed the pass: the vote stayed undecided and erin's copy ran on.
    Bob's copy now counts as not answered yet, as erin's: no answer, no evidence."""
    clock = Clock()
    names = list(FIVE_OWNERS)
    ray = CopyLogFails(names, clock)
    vols = {n: volunteer(owner, node_address(n), connected=True) for n, owner in FIVE_OWNERS.items()}
    rec = reconciler(ray, clock)
    body = make_body(
        {
            "entrypoint": "python x.py",
            "verification": {"mode": "replicated", "quorum": 5},
            "expectedDurationSeconds": 60,
        }
    )
    ids = await submit_all(rec, ray, clock, body, vols)
    assert body["status"]["assignedNodes"] == names, body["status"]
    ray.failing = {ids[1]}  # bob's
    started(ray, clock, ids)
    await step(rec, body, vols)
    clock.advance(600)
    for k in (0, 1, 2, 3):  # alice, bob, carol, dave answer; erin's copy runs on
        answered(ray, clock, ids[k], GOOD)
    clock.advance(10)
    outcome = await step(rec, body, vols)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Succeeded", "Verified"), status.get("message")
    assert ray.jobs[ids[4]].state is RayJobState.STOPPED  # erin's copy no longer runs
    assert sorted(outcome.reputation) == [("vn-a", "agreement"), ("vn-c", "agreement"), ("vn-d", "agreement")]
    assert status["verification"]["stopped"] == ["vn-b", "vn-e"] and status["verification"]["failed"] == []
    assert not [c for c in status.get("conditions") or [] if c["type"] == "RayReachable" and c["status"] == "False"]


# ---- 4. a booking kept for a job whose object went without its deletion handler


async def test_a_job_gone_without_its_deletion_handler_does_not_book_its_gpus_for_ever() -> None:
    """The Ledger kept what this process placed (Ledger._local) over the kopf index, and dropped it
    only in the deletion handler or when a pass saw the job finished. A job whose object went
    without that handler running here (its finalizer removed by hand, as admins do to unstick a
    deletion) kept its GPUs booked until the operator restarted or lost the Lease, although the
    index (what every AIJob's status says) no longer listed it."""
    ray, clock = FakeRay(), Clock()
    rec = make_reconciler(ray, clock)
    first = make_body({"entrypoint": "python x.py"}, name="first", uid="u-first")
    await step(rec, first)
    assert first["status"]["phase"] == "Scheduled"  # holds vn-1's only GPU
    held = allocation_of(first)
    assert held is not None
    second = make_body({"entrypoint": "python y.py"}, name="second", uid="u-second")

    async def second_pass(index: dict[str, Allocation]) -> None:
        clock.advance(60)
        outcome = await rec.reconcile(copy.deepcopy(second), index, {"vn-1": volunteer("alice", "127.0.20.1")})
        second["status"] = merge_patch(second.get("status") or {}, outcome.status)

    await second_pass({"ns/first": held})  # the watch has shown first's placement
    assert second["status"]["phase"] == "Pending"
    # `kubectl patch aijob first --type=merge -p '{"metadata":{"finalizers":null}}'`, then deleted:
    # gone from the index, and no deletion handler ran here.
    await second_pass({})
    assert second["status"]["phase"] == "Scheduled", second["status"]["message"]


def test_the_ledger_keeps_its_own_decisions_until_the_index_shows_them() -> None:
    ledger = Ledger()
    mine, other = Allocation(("n1",), 1, 1.0), Allocation(("n2",), 1, 1.0)
    ledger.reserve("ns/a", mine)
    assert ledger.current({}) == [mine]  # placed here, not yet seen by the watch
    assert ledger.current({"ns/a": other}) == [mine]  # the index still shows an older placement
    assert ledger.current({"ns/a": mine}) == [mine]  # seen: the index is the record from now on
    assert ledger.current({}) == []  # the object went (its finalizer removed by hand)
    ledger.reserve("ns/a", mine)
    ledger.release("ns/a")
    assert ledger.current({"ns/a": mine}) == []  # released here; the index still shows it held
    assert ledger.current({}) == []
    assert ledger.current({"ns/a": mine}) == [mine]  # placed again by whoever leads: the index rules


# ---- 5. nothing of a deleted job handed to a job created again under its name


async def test_a_job_created_again_under_the_same_name_does_not_inherit_the_ray_backoff() -> None:
    ray, clock = FakeRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"}, uid="u-old")
    await step(rec, body)  # placed

    async def unavailable(submission_id: str) -> RayJobInfo | None:
        raise RayUnavailableError("connection refused")

    real_get = ray.get
    ray.get = unavailable  # type: ignore[method-assign]
    await step(rec, body)  # Ray away: the job backs off
    ray.get = real_get  # type: ignore[method-assign]
    # Its finalizer removed by hand and deleted (no deletion handler ran here); created again.
    again = make_body({"entrypoint": "python x.py"}, uid="u-new")
    await step(rec, again)
    assert again["status"]["phase"] == "Scheduled", again["status"]


async def test_the_deletion_handler_forgets_the_jobs_ray_backoff_and_ttl_announcement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ray, clock = FakeRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    rec.backoff.failed(UID, clock.mono)
    handlers._ttl_announced.add(UID)
    memo = SimpleNamespace(leader=SimpleNamespace(is_leader=True, term=1), reconciler=rec, tracer=Quiet())
    monkeypatch.setattr(kopf, "event", lambda *a, **k: None)
    stop: Any = handlers.stop_ray_job
    await stop(body=body, memo=memo)
    assert rec.backoff.ready(UID, clock.mono) and not rec.backoff._failures
    assert UID not in handlers._ttl_announced


# ---- a status write of the old leader that lands late (kopf's merge patch, no resourceVersion)
#
# Such a write is now refused (test_status_write_through_kopf.py); a job found Pending over a
# running attempt (written by an operator before that) is still handled, as these show.


async def _running_attempt(rec: Any, ray: FakeRay, clock: Clock, body: dict[str, Any], attempt: int) -> None:
    """Places and submits the next attempt (``attempt``), then has Ray run it."""
    await step(rec, body)  # placed
    await step(rec, body)  # submitted
    assert body["status"]["attempts"] == attempt
    ray.set_state(submission_id_for(UID, attempt), RayJobState.RUNNING)
    await step(rec, body)
    assert body["status"]["phase"] == "Running"


async def test_a_late_pending_write_of_the_old_leader_stops_the_attempt_it_names_before_the_next() -> None:
    """The handler checks its term before handing the status to kopf, which writes it as a merge
    patch without a resourceVersion and retries it for up to a minute. An old leader cut off from
    the API server judged attempt 1 failed (Pending); its patch landed after the new leader had
    placed and submitted attempt 2, and turned the job Pending over it. The new leader placed
    attempt 3; attempt 2 ran on, named by no status field: even the deletion handler left it."""
    ray, clock = FakeRay(), Clock()
    new_leader = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 3})
    await _running_attempt(new_leader, ray, clock, body, 1)
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message="exit 1")
    clock.advance(5)
    # The old leader's last pass, still in its term: attempt 1 failed -> Pending. Its patch stalls.
    stale = (await make_reconciler(ray, clock).reconcile(copy.deepcopy(body), {}, VOLUNTEERS)).status
    assert stale["phase"] == "Pending" and "submissionId" not in stale and "attempts" not in stale
    await step(new_leader, body)  # the same Pending, by the new leader
    clock.advance(5)
    await _running_attempt(new_leader, ray, clock, body, 2)

    body["status"] = merge_patch(body["status"], stale)  # the old leader's patch lands now
    assert body["status"]["phase"] == "Pending" and body["status"]["attempts"] == 2
    clock.advance(5)
    await step(new_leader, body)
    # Attempt 2 stopped before attempt 3 was even placed: one attempt runs at a time.
    assert ray.jobs[submission_id_for(UID, 2)].state is RayJobState.STOPPED
    assert body["status"]["phase"] == "Scheduled" and body["status"]["attempts"] == 3
    await step(new_leader, body)  # attempt 3 submitted
    running = sorted(sid for sid, info in ray.jobs.items() if not info.state.terminal)
    assert running == [submission_id_for(UID, 3)]
    deleting = copy.deepcopy(body)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:10:00Z"
    await new_leader.stop(deleting)
    assert not [sid for sid, info in ray.jobs.items() if not info.state.terminal]


async def test_the_next_attempt_is_placed_only_once_the_one_the_status_names_is_stopped() -> None:
    """Ray unavailable for the stop: the next attempt is not placed (the previous one may still
    run); the pass backs off, and a later one stops it and places. The ordinary retry reads each
    copy of the attempt left once (it has ended: nothing to stop), not at every pass of a job left
    Pending."""

    @dataclass
    class StopFailsRay(FakeRay):
        stop_fails: bool = False
        reads: list[str] = field(default_factory=list)

        async def get(self, submission_id: str) -> RayJobInfo | None:
            self.reads.append(submission_id)
            return await super().get(submission_id)

        async def stop(self, submission_id: str) -> None:
            if self.stop_fails:
                raise RayUnavailableError("connection refused")
            await super().stop(submission_id)

    ray, clock = StopFailsRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 3})
    await _running_attempt(rec, ray, clock, body, 1)
    # Pending over attempt 1 while it runs (a late write, as above).
    body["status"] = merge_patch(body["status"], {"phase": "Pending", "reason": "BackOff", "assignedNodes": []})
    ray.stop_fails = True
    clock.advance(5)
    await step(rec, body)
    assert body["status"]["phase"] == "Pending" and body["status"]["attempts"] == 1
    assert ray.jobs[submission_id_for(UID, 1)].state is RayJobState.RUNNING
    assert submission_id_for(UID, 2) not in ray.jobs
    ray.stop_fails = False
    clock.advance(5)  # past the Ray backoff
    await step(rec, body)
    assert ray.jobs[submission_id_for(UID, 1)].state is RayJobState.STOPPED
    assert body["status"]["phase"] == "Scheduled" and body["status"]["attempts"] == 2
    assert ray.stopped == [submission_id_for(UID, 1)]

    # The ordinary path: attempt 2 fails, and the job waits (no node free) for its retry.
    await step(rec, body)
    ray.set_state(submission_id_for(UID, 2), RayJobState.FAILED, exit_code=1, message="exit 1")
    clock.advance(5)
    await step(rec, body)
    assert body["status"]["reason"] == "BackOff"
    ray.reads.clear()
    for _ in range(3):
        clock.advance(5)
        await step(rec, body, volunteers={})
        assert body["status"]["reason"] == "Unschedulable"
    clock.advance(5)
    await step(rec, body)
    assert body["status"]["phase"] == "Scheduled" and body["status"]["attempts"] == 3
    assert ray.reads == [submission_id_for(UID, 2)] and ray.stopped == [submission_id_for(UID, 1)]


async def test_a_late_write_placing_an_earlier_attempt_leaves_the_running_one_adopted() -> None:
    """A stale write can also be a placement (attempts and submissionId of attempt 2, the new
    leader being at attempt 3 by then). The job follows attempt 2 again (Ray's record of it: it
    failed), and its next placement is attempt 3 under the same ids (keyed by the shared key):
    the running attempt 3 is adopted, never stopped nor run twice."""
    ray, clock = FakeRay(), Clock()
    nonce = keyed_submission_nonce(b"k" * 32)
    new_leader = make_reconciler(ray, clock, nonce)

    def sid(attempt: int) -> str:
        return submission_id_for(UID, attempt, nonce(UID, attempt))

    body = make_body({"entrypoint": "python x.py", "backoffLimit": 5})
    await step(new_leader, body)
    await step(new_leader, body)
    ray.set_state(sid(1), RayJobState.FAILED, exit_code=1, message="exit 1")
    clock.advance(5)
    await step(new_leader, body)
    assert body["status"]["phase"] == "Pending"
    clock.advance(5)
    stale = (await make_reconciler(ray, clock, nonce).reconcile(copy.deepcopy(body), {}, VOLUNTEERS)).status
    assert (stale["phase"], stale["attempts"], stale["submissionId"]) == ("Scheduled", 2, sid(2))
    await step(new_leader, body)
    await step(new_leader, body)
    ray.set_state(sid(2), RayJobState.FAILED, exit_code=1, message="exit 1")
    clock.advance(5)
    await step(new_leader, body)
    clock.advance(5)
    await step(new_leader, body)
    await step(new_leader, body)
    ray.set_state(sid(3), RayJobState.RUNNING)
    await step(new_leader, body)
    assert (body["status"]["phase"], body["status"]["attempts"]) == ("Running", 3)

    body["status"] = merge_patch(body["status"], stale)
    for _ in range(4):
        clock.advance(5)
        await step(new_leader, body)
    assert (body["status"]["phase"], body["status"]["submissionId"]) == ("Running", sid(3))
    assert [s for s, info in ray.jobs.items() if not info.state.terminal] == [sid(3)]
    assert sid(3) not in ray.stopped and sid(4) not in ray.jobs


async def _late_pending_over_attempt_2() -> tuple[FakeRay, Clock, Any, dict[str, Any]]:
    """The late write of the test above: the job Pending over a running attempt 2, whose id its
    status still names, before the new leader's next pass."""
    ray, clock = FakeRay(), Clock()
    new_leader = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 3})
    await _running_attempt(new_leader, ray, clock, body, 1)
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message="exit 1")
    clock.advance(5)
    stale = (await make_reconciler(ray, clock).reconcile(copy.deepcopy(body), {}, VOLUNTEERS)).status
    assert stale["phase"] == "Pending"
    await step(new_leader, body)
    clock.advance(5)
    await _running_attempt(new_leader, ray, clock, body, 2)
    body["status"] = merge_patch(body["status"], stale)
    assert body["status"]["phase"] == "Pending" and body["status"]["attempts"] == 2
    clock.advance(5)
    return ray, clock, new_leader, body


def _running(ray: FakeRay) -> list[str]:
    return sorted(sid for sid, info in ray.jobs.items() if not info.state.terminal)


async def test_a_suspend_right_after_the_late_write_still_stops_the_attempt_it_names() -> None:
    """The stop of the attempt left ran only before a placement: a suspend first (a Pending job
    holds no nodes, so nothing was stopped) wrote submissionId away, and on resume attempt 3 ran
    beside attempt 2, which no status named any more."""
    ray, clock, rec, body = await _late_pending_over_attempt_2()
    body["spec"]["suspend"] = True
    await step(rec, body)
    assert body["status"]["phase"] == "Suspended"
    assert _running(ray) == []
    body["spec"]["suspend"] = False
    for _ in range(3):
        clock.advance(5)
        await step(rec, body)
    assert body["status"]["attempts"] == 3
    assert _running(ray) == [submission_id_for(UID, 3)], f"running: {_running(ray)}"


async def test_a_delete_right_after_the_late_write_stops_the_attempt_it_names() -> None:
    ray, _clock, rec, body = await _late_pending_over_attempt_2()
    deleting = copy.deepcopy(body)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:10:00Z"
    assert await rec.stop(deleting)  # reported as a stop (the handler's "Stopped" event)
    assert _running(ray) == [], f"still running after the delete: {_running(ray)}"


async def test_a_delete_of_a_pending_job_keeps_its_finalizer_while_ray_cannot_stop_the_attempt_it_names() -> None:
    """As every other delete: RayUnavailableError reaches the deletion handler, which keeps the
    finalizer and retries (within the stop grace)."""
    ray, _clock, rec, body = await _late_pending_over_attempt_2()
    deleting = copy.deepcopy(body)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:10:00Z"

    async def refused(submission_id: str) -> RayJobInfo | None:
        raise RayUnavailableError("connection refused")

    get = ray.get
    ray.get = refused  # type: ignore[method-assign]
    with pytest.raises(RayUnavailableError):
        await rec.stop(deleting)
    ray.get = get  # type: ignore[method-assign]
    assert await rec.stop(deleting)
    assert _running(ray) == []


async def test_a_delete_of_a_pending_job_whose_attempt_ended_reports_no_stop() -> None:
    ray, clock = FakeRay(), Clock()
    rec = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py", "backoffLimit": 3})
    await _running_attempt(rec, ray, clock, body, 1)
    ray.set_state(submission_id_for(UID, 1), RayJobState.FAILED, exit_code=1, message="exit 1")
    clock.advance(5)
    await step(rec, body)
    assert body["status"]["phase"] == "Pending" and body["status"]["submissionId"]
    deleting = copy.deepcopy(body)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:10:00Z"
    assert not await rec.stop(deleting)
    assert ray.stopped == []


async def test_a_backoff_limit_lowered_right_after_the_late_write_stops_the_attempt_it_names() -> None:
    ray, _clock, rec, body = await _late_pending_over_attempt_2()
    body["spec"]["backoffLimit"] = 0
    await step(rec, body)
    assert body["status"]["phase"] == "Failed"
    assert _running(ray) == [], f"still running behind a Failed job: {_running(ray)}"


async def test_an_invalid_edit_right_after_the_late_write_stops_the_attempt_it_names() -> None:
    ray, _clock, rec, body = await _late_pending_over_attempt_2()
    body["spec"]["resources"] = {"cpus": 2000}
    body["metadata"]["generation"] = 2
    await step(rec, body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec")
    assert _running(ray) == [], f"still running behind a Failed job: {_running(ray)}"
