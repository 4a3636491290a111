"""One operator per pool: only the holder of the Lease reconciles. The rule is a pure function of
the Lease as read; the electors here compete through the emulator's coordination.k8s.io API."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from koinon_operator import handlers
from koinon_operator.api.constants import FINALIZER
from koinon_operator.inventory import Allocation
from koinon_operator.leadership import Action, LeaderElector, LeaseSettings, LeaseView, decide
from koinon_operator.reconciler import Ledger, Outcome

from tests.emulator.helpers import EmulatorThread, emulator_for_kube_client

NOW = 1_800_000_000.0
_META: Any = {"name": "j", "namespace": "ns", "uid": "u", "finalizers": [FINALIZER]}  # as kopf leaves a job


def test_the_rule() -> None:
    assert decide(None, "me", 0.0) is Action.CREATE
    assert decide(LeaseView("me", "r", 15), "me", 100.0) is Action.RENEW
    assert decide(LeaseView("other", "r", 15), "me", 5.0) is Action.WAIT
    assert decide(LeaseView("other", "r", 15), "me", 16.0) is Action.TAKE_OVER  # seen unchanged too long
    assert decide(LeaseView("", "r", 15), "me", 0.0) is Action.TAKE_OVER  # released
    # Gone (deleted): its holder may still be leading, so only it re-creates at once.
    assert decide(None, "me", 0.0, last_seen=LeaseView("other", "r", 15)) is Action.WAIT
    assert decide(None, "me", 16.0, last_seen=LeaseView("other", "r", 15)) is Action.CREATE
    assert decide(None, "me", 0.0, last_seen=LeaseView("me", "r", 15)) is Action.CREATE
    assert decide(None, "me", 0.0, last_seen=LeaseView("", "r", 15)) is Action.CREATE  # it was released


def test_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "koinon-system")
    monkeypatch.setenv("KOINON_LEASE_DURATION", "9")
    settings = LeaseSettings.from_env()
    assert (settings.namespace, settings.duration_s, settings.renew_s) == ("koinon-system", 9.0, 3.0)
    for bad in ("abc", "0", "nan"):
        monkeypatch.setenv("KOINON_LEASE_DURATION", bad)
        with pytest.raises(ValueError, match="KOINON_LEASE_DURATION"):
            LeaseSettings.from_env()


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorThread]:
    with emulator_for_kube_client(tmp_path, monkeypatch) as server:
        yield server


class Clocks:
    def __init__(self) -> None:
        self.wall, self.mono = NOW, 100.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def _elector(name: str, clocks: Clocks) -> LeaderElector:
    settings = LeaseSettings(namespace="default", duration_s=15.0, renew_s=5.0)
    return LeaderElector(settings, identity=name, clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)


async def test_one_leader_and_a_take_over_when_it_stops_renewing(cluster: EmulatorThread) -> None:
    clocks = Clocks()
    first, second = _elector("first", clocks), _elector("second", clocks)
    assert await first.step() and not await second.step()
    clocks.advance(5)
    assert await first.step() and not await second.step()  # renewed: still first's
    clocks.advance(14)  # first crashed (SIGKILL): no renewal since
    assert not await second.step()  # 14 s since the renewal: not yet
    clocks.advance(2)
    assert not first.is_leader  # its own view ran out too: it must not act on a lease it lost
    assert await second.step()
    lease = cluster.call(lambda e: e.get("coordination.k8s.io/v1", "Lease", "koinon-operator", "default"))
    assert lease["spec"]["holderIdentity"] == "second" and lease["spec"]["leaseTransitions"] == 1
    assert not await first.step()  # back from the dead: second holds it now


async def test_a_deleted_lease_does_not_give_two_leaders(cluster: EmulatorThread) -> None:
    """`kubectl delete lease koinon-operator` while the leader runs: the first follower to look used
    to create it and lead at once, while the leader kept leading until its next renewal (up to
    renew_s later): two operators placed jobs from two ledgers meanwhile."""
    clocks = Clocks()
    first, second = _elector("first", clocks), _elector("second", clocks)
    assert await first.step() and not await second.step()
    cluster.call(lambda e: e.delete("coordination.k8s.io/v1", "Lease", "koinon-operator", "default"))
    clocks.advance(1)
    assert not await second.step()
    assert first.is_leader
    assert await first.step()  # its holder re-creates it and goes on leading
    assert not await second.step()
    cluster.call(lambda e: e.delete("coordination.k8s.io/v1", "Lease", "koinon-operator", "default"))
    clocks.advance(1)
    assert not await second.step()  # gone again, and this time its holder is dead
    clocks.advance(16)
    assert not first.is_leader
    assert await second.step()  # gone longer than a lease: the follower takes it


async def test_a_replica_started_after_the_lease_was_deleted_leads_until_the_holders_next_renewal(
    cluster: EmulatorThread,
) -> None:
    """What README (Limits) says of a deleted Lease and an operator that never saw it (a replica
    started after the deletion, as at a fresh install): it creates the Lease and leads at once, as
    client-go's elector does; the old holder leads on until its next renewal finds the Lease taken,
    then stops at once. Two leaders meanwhile, for up to a renewal interval (waiting a lease
    duration whenever no Lease exists would hold every fresh install back as long)."""
    clocks = Clocks()
    first = _elector("first", clocks)
    assert await first.step()
    cluster.call(lambda e: e.delete("coordination.k8s.io/v1", "Lease", "koinon-operator", "default"))
    clocks.advance(1)
    started = _elector("started-after", clocks)
    assert await started.step() and first.is_leader  # two leaders, until:
    clocks.advance(4)
    assert not await first.step()  # its next renewal
    assert await started.step()


async def test_a_clean_stop_hands_the_lease_over_at_once(cluster: EmulatorThread) -> None:
    clocks = Clocks()
    first, second = _elector("first", clocks), _elector("second", clocks)
    assert await first.step()
    await first.release()
    assert not first.is_leader
    assert await second.step()


async def test_an_operator_that_does_not_lead_writes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second operator (a second replica, one per namespace): its timer passes and its deletion
    handler leave every AIJob to the leader."""
    follower = SimpleNamespace(is_leader=False)

    class Untouchable:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"a follower used the reconciler ({name})")

    # Only its own bookings may go (the leader stops the job): nothing else of the reconciler.
    reconciler = SimpleNamespace(ledger=Ledger())
    memo = SimpleNamespace(leader=follower, reconciler=reconciler, tracer=Untouchable(), reputation=Untouchable())
    body = kopf.Body({"metadata": _META, "spec": {}, "status": {}})
    patch = kopf.Patch()
    reconcile: Any = handlers.reconcile_aijob
    await reconcile(body=body, patch=patch, memo=memo, namespace="ns", name="j",
                    aijob_allocations={}, volunteer_nodes={})  # fmt: skip
    assert not patch
    stop: Any = handlers.stop_ray_job
    with pytest.raises(kopf.TemporaryError, match="another operator"):
        await stop(body=body, memo=memo)


class SkewedClock:
    """One operator's clocks: a wall clock (possibly skewed) and a monotonic one."""

    def __init__(self, skew: float = 0.0) -> None:
        self.elapsed = 0.0
        self.skew = skew

    def wall(self) -> float:
        return NOW + self.skew + self.elapsed

    def mono(self) -> float:
        return 100.0 + self.elapsed


def _skewed_elector(name: str, clock: SkewedClock, duration: float = 15.0) -> LeaderElector:
    settings = LeaseSettings(namespace="default", duration_s=duration, renew_s=duration / 3)
    return LeaderElector(settings, identity=name, clock=clock.wall, monotonic=clock.mono)


async def test_clock_skew_between_operators_never_gives_two_leaders(cluster: EmulatorThread) -> None:
    """decide() compares the follower's wall clock with the renewTime the holder stamped with ITS
    wall clock. Pods on different nodes can be skewed by seconds (client-go avoids this by timing
    expiry from when the follower itself observed the record change). With 11 s of skew and the
    default 15 s lease, the follower takes over while the holder still believes it leads."""
    leader_clock, follower_clock = SkewedClock(), SkewedClock(skew=11.0)
    leader, follower = _skewed_elector("leader", leader_clock), _skewed_elector("follower", follower_clock)
    assert await leader.step()
    for c in (leader_clock, follower_clock):
        c.elapsed += 4.9  # just before the leader's next renewal (every 5 s)
    await follower.step()
    assert not (leader.is_leader and follower.is_leader), "two operators lead the same pool at once"


async def test_a_holder_that_reads_another_holder_stops_leading_at_once(cluster: EmulatorThread) -> None:
    """Once its own read shows the Lease held by someone else (it was partitioned, another took
    over), the ex-holder kept is_leader until its own deadline: up to a lease more of reconciling
    beside the new holder."""
    clock = SkewedClock()
    leader = _skewed_elector("leader", clock)
    assert await leader.step()
    taken = {"spec": {"holderIdentity": "follower"}}
    cluster.call(lambda e: e.patch("coordination.k8s.io/v1", "Lease", "koinon-operator", taken, namespace="default"))
    clock.elapsed += 1
    assert leader.is_leader  # its own deadline has not passed
    await leader.step()  # it reads: holderIdentity == "follower"
    assert not leader.is_leader, "the Lease says another operator holds it, yet this one still leads"


async def test_a_fractional_lease_duration_is_not_written_rounded_down(cluster: EmulatorThread) -> None:
    """leaseDurationSeconds = round(2.5) = 2 (banker's rounding), while the holder believes it
    leads for 2.5 s: others take over 0.5 s before the holder stops. Should be ceil()."""
    clock = SkewedClock()
    first, second = _skewed_elector("first", clock, duration=2.5), _skewed_elector("second", clock, duration=2.5)
    assert await first.step()
    clock.elapsed += 2.2
    await second.step()
    assert not (first.is_leader and second.is_leader), "two leaders with KOINON_LEASE_DURATION=2.5"


async def test_a_follower_forgets_a_deleted_jobs_reservation() -> None:
    """The Ledger's local reservations override the recorded allocations and are dropped only by
    reconciler.stop() (the deletion handler) or a pass over the finished job. A follower's deletion
    handler raises before stop(), so a job placed by this operator in an earlier term and deleted
    while it follows stays reserved for ever: once it leads again, those GPUs look held."""
    ledger = Ledger()
    ledger.reserve("ns/j", Allocation(("n1",), 1, 1.0))  # placed in an earlier term as leader
    reconciler = SimpleNamespace(ledger=ledger)
    memo = SimpleNamespace(leader=SimpleNamespace(is_leader=False), reconciler=reconciler)
    body = kopf.Body({"metadata": {"name": "j", "namespace": "ns", "uid": "u", "deletionTimestamp": "x"},
                      "spec": {}, "status": {}})  # fmt: skip
    stop: Any = handlers.stop_ray_job
    with pytest.raises(kopf.TemporaryError):
        await stop(body=body, memo=memo)
    # The leader stopped the job and removed the finalizer: the AIJob is gone from the index.
    memo.leader.is_leader = True  # this operator leads again later
    assert ledger.current({}) == [], "a deleted job's GPUs stay booked in the ex-follower's ledger"


async def test_a_hung_lease_request_does_not_stop_leader_election(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Lease calls run in a thread with no _request_timeout and step() is not bounded: one
    API request that never answers (a stuck proxy, a half-open connection until keepalive gives
    up) holds run_forever in step(); is_leader runs out and the operator never tries again."""
    clock = SkewedClock()
    elector = _skewed_elector("only", clock, duration=0.6)
    calls = 0

    def hung() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            return True
        import time

        time.sleep(3)  # stands for a request that never answers
        return True

    monkeypatch.setattr(elector, "_acquire_or_renew", hung)
    task = asyncio.create_task(elector.run_forever())
    try:
        await asyncio.sleep(1.0)
    finally:
        task.cancel()
    assert calls >= 3, f"leader election looked at the Lease {calls} time(s) in 1 s with renew every 0.2 s"


async def test_a_pass_that_outlives_the_lease_writes_nothing() -> None:
    """is_leader is read once, before the pass; a pass waits on the placement lock and on Ray
    (seconds) and then writes its placement (assignedNodes) even when the Lease passed to another
    operator meanwhile, which placed from an index without it: two jobs on one GPU."""
    from koinon_operator.reconciler import Outcome

    leader = SimpleNamespace(is_leader=True, term=1)

    class SlowReconciler:
        async def reconcile(self, *_: Any) -> Outcome:
            leader.is_leader = False  # the Lease ran out while this pass waited on Ray
            return Outcome(status={"phase": "Scheduled", "assignedNodes": ["n1"]})

        def discard_write(self, key: str) -> None:
            pass

    class Quiet:
        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    memo = SimpleNamespace(leader=leader, reconciler=SlowReconciler(), tracer=Quiet(), reputation=Quiet())
    body = kopf.Body({"metadata": _META, "spec": {}, "status": {}})
    patch = kopf.Patch()
    reconcile: Any = handlers.reconcile_aijob
    await reconcile(body=body, patch=patch, memo=memo, namespace="ns", name="j",
                    aijob_allocations={}, volunteer_nodes={})  # fmt: skip
    assert not patch, f"a pass that no longer leads wrote {dict(patch)}"


async def test_a_pass_that_spans_a_lost_and_regained_term_writes_nothing(cluster: EmulatorThread) -> None:
    """reconcile_aijob re-checks only ``is_leader`` after the pass. A pass that began in one term,
    during which the Lease went to another operator (which placed jobs from an index without this
    pass's placement) and came back, writes its stale placement in the new term: the new term's
    forget_memory() already ran, so nothing else catches it. Two jobs on one GPU."""
    clocks = Clocks()
    me, other = _elector("me", clocks), _elector("other", clocks)
    assert await me.step()

    async def lose_and_regain() -> None:
        # Partitioned for a lease: the other operator takes over, places, then stops cleanly.
        await other.step()
        clocks.advance(16)
        assert not me.is_leader
        assert await other.step()
        await other.release()
        assert await me.step()  # this operator leads again, in a new term

    class SlowReconciler:
        async def reconcile(self, *_: Any) -> Outcome:
            await lose_and_regain()  # the pass waited on the placement lock / Ray meanwhile
            return Outcome(status={"phase": "Scheduled", "assignedNodes": ["n1"]})

        def forget_memory(self) -> None:
            pass

        def discard_write(self, key: str) -> None:
            pass

    class Quiet:
        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: None

    memo = SimpleNamespace(leader=me, reconciler=SlowReconciler(), tracer=Quiet(), reputation=Quiet())
    body = kopf.Body({"metadata": _META, "spec": {}, "status": {}})
    patch = kopf.Patch()
    reconcile: Any = handlers.reconcile_aijob
    await reconcile(body=body, patch=patch, memo=memo, namespace="ns", name="j",
                    aijob_allocations={}, volunteer_nodes={})  # fmt: skip
    assert not patch, f"a pass begun in an earlier term wrote {dict(patch)} in a later one"


async def test_own_late_renewal_does_not_make_the_holder_step_down(cluster: EmulatorThread) -> None:
    """step() bounds the Lease request with asyncio.wait_for(to_thread(...)), which does not stop
    the thread: a renewal that timed out client-side still writes later. When it lands between
    the next step's read and replace, that replace gets 409 and the holder stops leading at once
    (on_change(False): the reconciler's memory is dropped, passes in flight write nothing) though
    the Lease names it."""
    settings = LeaseSettings(namespace="default", duration_s=6.0, renew_s=1.0)
    me = LeaderElector(settings, identity="me")
    assert await me.step()
    real_api = me._api()
    t2_read, t1_done = threading.Event(), threading.Event()
    calls = {"read": 0, "replace": 0}

    class SlowApi:
        def read_namespaced_lease(self, *a: Any, **k: Any) -> Any:
            calls["read"] += 1
            result = real_api.read_namespaced_lease(*a, **k)
            if calls["read"] == 2:
                t2_read.set()
            return result

        def replace_namespaced_lease(self, *a: Any, **k: Any) -> Any:
            calls["replace"] += 1
            if calls["replace"] == 1:  # the slow renewal: answered after the step gave up on it
                t2_read.wait(5)
                try:
                    return real_api.replace_namespaced_lease(*a, **k)
                finally:
                    t1_done.set()
            t1_done.wait(5)
            return real_api.replace_namespaced_lease(*a, **k)

        def __getattr__(self, name: str) -> Any:
            return getattr(real_api, name)

    setattr(me, "_api", lambda: SlowApi())  # noqa: B010 - a stand-in for the API client
    changes: list[bool] = []
    me.on_change = changes.append
    await me.step()  # times out after renew_s; the thread keeps going
    assert me.is_leader
    await me.step()
    lease = cluster.call(lambda e: e.get("coordination.k8s.io/v1", "Lease", "koinon-operator", "default"))
    assert lease["spec"]["holderIdentity"] == "me"
    assert me.is_leader and changes == [], f"stepped down on its own late write: changes={changes}"


async def test_a_leadership_flap_does_not_make_the_operator_act_on_a_body_it_knows_is_stale() -> None:
    """forget_memory() (on_change, at every change of leader) also clears _written_from, the guard
    that keeps a timer from acting again on the body its own last write was computed from (the watch
    lags). Skipping such a body is always safe (another operator's write changes the
    resourceVersion, which ends the skip anyway); clearing it makes the first pass of the new term
    repeat the last pass of the old one: place again, count a failure again."""
    import copy

    from tests.aijob.fake_ray import VOLUNTEERS, Clock, FakeRay, make_body, make_reconciler

    ray, clock = FakeRay(), Clock()
    reconciler = make_reconciler(ray, clock)
    body = make_body({"entrypoint": "python x.py"})
    body["metadata"]["resourceVersion"] = "10"
    first = await reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS)
    assert first.status["phase"] == "Scheduled"
    reconciler.forget_memory()  # the Lease lapsed for a moment (a slow API server) and came back
    again = await reconciler.reconcile(copy.deepcopy(body), {}, VOLUNTEERS)  # the watch still lags
    assert (again.status, [e.reason for e in again.events]) == ({}, []), "the stale body was acted on again"
