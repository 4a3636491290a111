"""One operator per pool: only the holder of the Lease reconciles. The rule is a pure function of
the Lease as read; the electors here compete through the emulator's coordination.k8s.io API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from koinon_operator import handlers
from koinon_operator.leadership import Action, LeaderElector, LeaseSettings, LeaseView, decide

from tests.emulator.helpers import EmulatorThread, emulator_for_kube_client

NOW = 1_800_000_000.0


def test_the_rule() -> None:
    assert decide(None, "me", NOW) is Action.CREATE
    assert decide(LeaseView("me", NOW - 100, 15), "me", NOW) is Action.RENEW
    assert decide(LeaseView("other", NOW - 5, 15), "me", NOW) is Action.WAIT
    assert decide(LeaseView("other", NOW - 16, 15), "me", NOW) is Action.TAKE_OVER  # it stopped renewing
    assert decide(LeaseView("", NOW, 15), "me", NOW) is Action.TAKE_OVER  # released
    assert decide(LeaseView("other", None, 15), "me", NOW) is Action.TAKE_OVER


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

    memo = SimpleNamespace(leader=follower, reconciler=Untouchable(), tracer=Untouchable(), reputation=Untouchable())
    body = kopf.Body({"metadata": {"name": "j", "namespace": "ns", "uid": "u"}, "spec": {}, "status": {}})
    patch = kopf.Patch()
    reconcile: Any = handlers.reconcile_aijob
    await reconcile(body=body, patch=patch, memo=memo, namespace="ns", name="j",
                    aijob_allocations={}, volunteer_nodes={})  # fmt: skip
    assert not patch
    stop: Any = handlers.stop_ray_job
    with pytest.raises(kopf.TemporaryError, match="another operator"):
        await stop(body=body, memo=memo)
