"""A pass's status as kopf writes it (its patching code, unchanged) to an API server (the emulator):
only over the status the pass read (koinon_operator.status_write). kopf wrote it as a merge patch
with no precondition, retried for about a minute, so an old leader's write could land after the new
leader's and set the job back (tests/aijob/test_lease_loss_and_leftovers.py: what such a landing did).

kopf's patch_obj is private API: these tests are what say that kopf 1.45 still tests the
resourceVersion of the body it applied the function to, as status_write relies on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
import yaml
from koinon_operator import handlers
from koinon_operator.api.constants import AIJOB_PLURAL, FINALIZER, GROUP, VERSION
from koinon_operator.reconciler import Outcome
from kopf._cogs.clients import auth, patching
from kopf._cogs.structs import credentials, references

from tests.aijob.kopf_patch import written_status
from tests.emulator.helpers import EmulatorThread

CRD = Path(__file__).resolve().parents[2] / "manifests" / "crds" / "aijobs.koinon.dev.yaml"
API_VERSION = f"{GROUP}/{VERSION}"
AIJOBS = references.Resource(GROUP, VERSION, AIJOB_PLURAL, kind="AIJob", subresources=frozenset({"status"}),
                             namespaced=True)  # fmt: skip


@pytest.fixture
def cluster(bare_cluster: EmulatorThread) -> EmulatorThread:
    """The emulator with job j, kopf's finalizer on it (as passes see a job)."""
    job = _job("j")
    job["metadata"]["finalizers"] = [FINALIZER]
    bare_cluster.call(lambda e: e.create(job))
    return bare_cluster


@pytest.fixture
def posted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    messages: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: messages.append(message))
    return messages


class _Reconciler:
    """A pass that computes ``status`` (and a Transition event); records discarded writes."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status, self.discarded = status, list[str]()

    async def reconcile(self, *_: Any) -> Outcome:
        outcome = Outcome(status=dict(self.status))
        outcome.event("Transition", f"to {self.status['phase']}")
        return outcome

    def discard_write(self, key: str) -> None:
        self.discarded.append(key)


class _Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def _stored(cluster: EmulatorThread) -> dict[str, Any]:
    return cluster.call(lambda e: e.get(API_VERSION, "AIJob", "j", "default"))


def _raw(body: dict[str, Any]) -> Any:
    """A copy of ``body`` as the raw body kopf keeps for a timer."""
    return dict(body)


async def _pass(reconciler: _Reconciler, live: kopf.Body) -> kopf.Patch:
    """The timer handler's pass over the body kopf holds (``live``), as kopf calls it."""
    memo = SimpleNamespace(leader=SimpleNamespace(is_leader=True, term=1), reconciler=reconciler,
                           tracer=_Quiet(), reputation=_Quiet())  # fmt: skip
    patch = kopf.Patch(body=live)
    handler: Any = handlers.reconcile_aijob
    await handler(body=live, patch=patch, memo=memo, namespace="default", name="j",
                  aijob_allocations={}, volunteer_nodes={})  # fmt: skip
    return patch


async def _kopf_writes(cluster: EmulatorThread, patch: kopf.Patch) -> kopf.Patch | None:
    """kopf's write of a timer's patch (what its timer loop calls after each pass); the patch it
    keeps for the next pass (None: nothing left)."""
    vault = credentials.Vault()
    await vault.populate({"emulator": credentials.ConnectionInfo(server=cluster.url, insecure=True)})
    auth.vault_var.set(vault)
    namespace: Any = "default"
    _, remaining = await patching.patch_obj(settings=kopf.OperatorSettings(), resource=AIJOBS, namespace=namespace,
                                            name="j", patch=patch, logger=logging.getLogger("kopf-test"))  # fmt: skip
    return remaining


def _delivered(live: kopf.Body, raw: Any, newer: dict[str, Any]) -> None:
    """kopf's watch delivers ``newer``: the body a timer holds is updated in place."""
    raw.clear()
    raw.update(newer)
    assert live["metadata"]["resourceVersion"] == newer["metadata"]["resourceVersion"]


async def test_a_write_that_lands_after_another_is_refused_by_the_api_server(
    cluster: EmulatorThread, posted: list[str]
) -> None:
    """Both leaders read the job at one version. The new leader's write lands. The old leader's
    (its watch, like its Lease, cut off: its body is still that version) lands later: the API server
    refuses it, as the resourceVersion it tests is gone. The job stays as the new leader left it."""
    read = _stored(cluster)
    old_raw, new_raw = _raw(read), _raw(read)
    old_live, new_live = kopf.Body(old_raw), kopf.Body(new_raw)
    old, new = _Reconciler({"phase": "Running"}), _Reconciler({"phase": "Pending"})
    old_patch = await _pass(old, old_live)  # computed; kopf's request stalls
    new_patch = await _pass(new, new_live)
    assert await _kopf_writes(cluster, new_patch) is None
    assert _stored(cluster)["status"]["phase"] == "Pending" and posted == ["to Pending"]

    left = await _kopf_writes(cluster, old_patch)  # the retried request lands now
    assert left is not None, "kopf no longer reports a refused JSON patch"
    assert _stored(cluster)["status"]["phase"] == "Pending"
    # kopf carries the refused function into the timer's next patch; by then the next pass has
    # computed from the newer body, and the function writes nothing.
    _delivered(old_live, old_raw, _stored(cluster))
    assert await _kopf_writes(cluster, kopf.Patch(left, body=old_live)) is None
    assert _stored(cluster)["status"]["phase"] == "Pending"


async def test_a_write_over_a_status_changed_since_the_pass_read_it_is_not_sent(
    cluster: EmulatorThread, posted: list[str]
) -> None:
    """The old leader's watch delivered the new leader's write before kopf applied the old pass's
    patch: nothing is sent, its Events are not posted, and the reconciler hears of it (the next
    pass must not wait for the watch to show a write that never happened)."""
    raw = _raw(_stored(cluster))
    live = kopf.Body(raw)
    old = _Reconciler({"phase": "Running"})
    old_patch = await _pass(old, live)
    new_patch = await _pass(_Reconciler({"phase": "Pending"}), kopf.Body(_raw(raw)))
    assert await _kopf_writes(cluster, new_patch) is None
    version = _stored(cluster)["metadata"]["resourceVersion"]
    _delivered(live, raw, _stored(cluster))
    assert await _kopf_writes(cluster, old_patch) is None
    stored = _stored(cluster)
    assert stored["status"]["phase"] == "Pending" and stored["metadata"]["resourceVersion"] == version
    assert posted == ["to Pending"] and old.discarded == ["default/j"]


async def test_a_change_of_metadata_alone_does_not_cost_the_pass_its_write(
    cluster: EmulatorThread, posted: list[str]
) -> None:
    """A label put on the job while its pass runs: the pass's status is still written (over the
    version with the label), with its Events."""
    raw = _raw(_stored(cluster))
    live = kopf.Body(raw)
    first = _Reconciler({"phase": "Scheduled"})
    patch = await _pass(first, live)
    label = {"metadata": {"labels": {"team": "vision"}}}
    cluster.call(lambda e: e.patch(API_VERSION, "AIJob", "j", label, namespace="default"))
    _delivered(live, raw, _stored(cluster))
    assert await _kopf_writes(cluster, patch) is None
    assert _stored(cluster)["status"]["phase"] == "Scheduled"
    assert posted == ["to Scheduled"] and first.discarded == []


async def test_a_pass_over_an_older_spec_is_not_written(cluster: EmulatorThread, posted: list[str]) -> None:
    """The spec was edited (a new generation) after the pass read it: the pass is dropped, and the
    next one decides on the edited spec."""
    raw = _raw(_stored(cluster))
    live = kopf.Body(raw)
    stale = _Reconciler({"phase": "Scheduled"})
    patch = await _pass(stale, live)
    edit = {"spec": {"entrypoint": "python y.py"}}
    cluster.call(lambda e: e.patch(API_VERSION, "AIJob", "j", edit, namespace="default"))
    _delivered(live, raw, _stored(cluster))
    assert await _kopf_writes(cluster, patch) is None
    assert "status" not in _stored(cluster) or not _stored(cluster)["status"].get("phase")
    assert posted == [] and stale.discarded == ["default/j"]


TimerPass = Callable[[kopf.Body, kopf.Patch, str], Awaitable[None]]


@contextlib.asynccontextmanager
async def _kopf_operator(cluster: EmulatorThread, timer_pass: TimerPass) -> AsyncIterator[None]:
    """Real kopf in this process against the emulator: the handlers' watch-event wake-up, and a
    timer registered as reconcile_aijob is (its filter), every 0.5 s, running ``timer_pass``."""
    registry = kopf.OperatorRegistry()
    [real] = [h for h in kopf.get_default_registry()._spawning.get_all_handlers() if h.id == "reconcile_aijob"]

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.enabled = False

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=cluster.url, insecure=True)

    kopf.on.event(GROUP, VERSION, AIJOB_PLURAL, registry=registry)(handlers._wake_passes_waiting_for_the_finalizer)
    when: Any = real.when

    @kopf.timer(GROUP, VERSION, AIJOB_PLURAL, interval=0.5, when=when, registry=registry)
    async def reconcile(body: kopf.Body, patch: kopf.Patch, name: str, **_: Any) -> None:
        await timer_pass(body, patch, name)

    @kopf.on.delete(GROUP, VERSION, AIJOB_PLURAL, registry=registry)
    async def stop_ray_job(**_: Any) -> None:
        pass

    stop = asyncio.Event()
    operator = asyncio.create_task(kopf.operator(registry=registry, clusterwide=True, standalone=True,
                                                 stop_flag=stop))  # fmt: skip
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(operator, 15)


@pytest.fixture
def bare_cluster() -> Iterator[EmulatorThread]:
    server = EmulatorThread()
    server.start()
    try:
        server.call(lambda e: e.apply_crd(yaml.safe_load(CRD.read_text())))
        yield server
    finally:
        server.stop()


def _job(name: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "AIJob", "metadata": {"name": name, "namespace": "default"},
            "spec": {"entrypoint": "python x.py"}}  # fmt: skip


async def test_passes_wait_for_kopfs_finalizer_and_go_on_when_it_is_removed_during_one(
    bare_cluster: EmulatorThread,
) -> None:
    """kopf starts a new job's timer while it puts its finalizer on: a first pass that did not
    wait had its write tested against the version before the finalizer, refused in most cases
    under load (bench-admission: 413 of 500 jobs, each first status a timer interval late). Here
    the first pass comes within a second of the create, woken by the watch event. A timer filter
    on the finalizer did the same but ended the job's passes for good when the finalizer was
    removed (`kubectl replace`) during a pass and kopf put it back before the pass ended
    (review): here they go on."""
    loop = asyncio.get_running_loop()
    passes: list[float] = []
    slow, in_slow_pass = asyncio.Event(), asyncio.Event()

    async def timer_pass(body: kopf.Body, patch: kopf.Patch, name: str) -> None:  # as reconcile_aijob begins
        if not await handlers._finalizer_shown(body, 2.0):
            return
        passes.append(loop.time())
        if slow.is_set():
            slow.clear()
            in_slow_pass.set()
            await asyncio.sleep(2)  # Ray slow to answer: the pass is in flight

    async with _kopf_operator(bare_cluster, timer_pass):
        created = loop.time()
        bare_cluster.call(lambda e: e.create(_job("j")))
        for _ in range(100):
            if len(passes) >= 2:
                break
            await asyncio.sleep(0.1)
        assert len(passes) >= 2, "the timer never ran"
        assert passes[0] - created < 1.0, f"first pass {passes[0] - created:.2f} s after the create"
        slow.set()
        await asyncio.wait_for(in_slow_pass.wait(), 5)
        no_finalizer = {"metadata": {"finalizers": None}}
        bare_cluster.call(lambda e: e.patch(API_VERSION, "AIJob", "j", no_finalizer, namespace="default"))
        await asyncio.sleep(5)  # the slow pass ends after 2 s; then a pass every 0.5 s
        stored = bare_cluster.call(lambda e: e.get(API_VERSION, "AIJob", "j", "default"))
        assert FINALIZER in stored["metadata"].get("finalizers", []), "kopf did not put its finalizer back"
        recent = [at for at in passes if at > loop.time() - 2]
        assert recent, f"no pass in the last 2 s: the job's timer is gone ({len(passes)} passes in all)"
        assert not handlers._finalizer_waits


async def test_a_job_deleted_before_kopfs_finalizer_was_on_it_leaves_no_timer(bare_cluster: EmulatorThread) -> None:
    """Deleted before kopf's finalizer landed, a job goes at once, without a deletionTimestamp,
    and kopf forgets it without stopping its timer: that timer waited for a finalizer that never
    came, every tick until the operator exited (review). The watch's DELETED event now stops it."""
    ticks: list[str] = []
    reconciled: list[str] = []

    class Reconciler:
        async def reconcile(self, body: Any, *_: Any) -> Outcome:
            reconciled.append(body["metadata"]["name"])
            return Outcome()

        def discard_write(self, key: str) -> None:
            pass

    memo = SimpleNamespace(leader=SimpleNamespace(is_leader=True, term=1), reconciler=Reconciler(),
                           tracer=_Quiet(), reputation=_Quiet())  # fmt: skip
    reconcile_aijob: Any = handlers.reconcile_aijob

    async def timer_pass(body: kopf.Body, patch: kopf.Patch, name: str) -> None:
        ticks.append(name)
        await reconcile_aijob(body=body, patch=patch, memo=memo, namespace="default", name=name,
                              aijob_allocations={}, volunteer_nodes={})  # fmt: skip

    def create_and_delete(e: Any) -> None:
        e.create(_job("gone"))
        e.delete(API_VERSION, "AIJob", "gone", "default")

    async with _kopf_operator(bare_cluster, timer_pass):
        await asyncio.sleep(1.0)  # watching
        bare_cluster.call(create_and_delete)
        bare_cluster.call(lambda e: e.create(_job("live")))
        await asyncio.sleep(3)
        before = ticks.count("gone")
        await asyncio.sleep(3)
        assert ticks.count("gone") == before, f"the deleted job's timer still ticks ({ticks.count('gone')})"
        assert "live" in reconciled and "gone" not in reconciled
        assert not handlers._finalizer_waits


async def test_a_ttl_pass_whose_write_is_dropped_leaves_its_deleted_event_to_the_next(
    monkeypatch: pytest.MonkeyPatch, posted: list[str]
) -> None:
    """The TTL's "Deleted" is said once per job: the first pass that says it marks the job. A pass
    whose write was dropped (the job's status changed meanwhile) posted nothing, yet marked it
    (review), so no pass said it at all."""

    async def no_delete(*_: Any) -> None:
        return None

    monkeypatch.setattr(handlers, "delete_aijob", no_delete)

    class TtlReconciler(_Reconciler):
        async def reconcile(self, *_: Any) -> Outcome:
            outcome = Outcome(status={"observedGeneration": 2}, delete=True)
            outcome.event("Deleted", "ttlSecondsAfterFinished passed")
            return outcome

    uid = "ttl-uid"
    read: Any = {"metadata": {"name": "j", "namespace": "default", "uid": uid, "generation": 2,
                              "finalizers": [FINALIZER]}, "status": {"phase": "Succeeded"}}  # fmt: skip
    changed: Any = {**read, "status": {"phase": "Succeeded", "conditions": []}}
    try:
        dropped = await _pass(TtlReconciler({"phase": "Succeeded"}), kopf.Body(read))
        for fn in dropped.fns:
            fn(changed)
        assert posted == [] and uid not in handlers._ttl_announced
        written = await _pass(TtlReconciler({"phase": "Succeeded"}), kopf.Body(changed))
        assert (written_status(written, changed) or {}).get("observedGeneration") == 2
        assert posted == ["ttlSecondsAfterFinished passed"] and uid in handlers._ttl_announced
    finally:
        handlers._ttl_announced.discard(uid)
        await asyncio.gather(*handlers._background)
