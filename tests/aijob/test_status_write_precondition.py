"""The pass's status write, through the kubernetes client to an API server (the emulator): written
only over the very body the pass read. kopf wrote it as a merge patch without a resourceVersion,
retried for about a minute, so an old leader's write could land after the new leader's and set
the job back (tests/aijob/test_lease_loss_and_leftovers.py: what each such landing did)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
import yaml
from koinon_operator import handlers
from koinon_operator.reconciler import Outcome

from tests.emulator.helpers import EmulatorThread, emulator_for_kube_client

CRD = Path(__file__).resolve().parents[2] / "manifests" / "crds" / "aijobs.koinon.dev.yaml"
API_VERSION = "koinon.dev/v1alpha1"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorThread]:
    with emulator_for_kube_client(tmp_path, monkeypatch, yaml.safe_load(CRD.read_text())) as server:
        yield server


class _Quiet:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


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


async def _pass(reconciler: _Reconciler, read: dict[str, Any]) -> None:
    memo = SimpleNamespace(leader=SimpleNamespace(is_leader=True, term=1), reconciler=reconciler,
                           tracer=_Quiet(), reputation=_Quiet())  # fmt: skip
    handler: Any = handlers.reconcile_aijob
    raw: Any = read
    await handler(body=kopf.Body(raw), patch=kopf.Patch(), memo=memo, namespace="default", name="j",
                  aijob_allocations={}, volunteer_nodes={})  # fmt: skip


async def test_an_old_leaders_status_that_lands_after_the_new_leaders_is_refused(
    cluster: EmulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both leaders read the job at one version. The old leader's write stalls (its Lease runs out
    while the request is retried); the new leader's lands. Then the old one lands: refused (409),
    dropped quietly (the next pass recomputes), its events not posted, the job as the new leader
    left it."""
    aijob = {"apiVersion": API_VERSION, "kind": "AIJob", "metadata": {"name": "j", "namespace": "default"},
             "spec": {"entrypoint": "python x.py"}}  # fmt: skip
    cluster.call(lambda e: e.create(aijob))
    read = cluster.call(lambda e: e.get(API_VERSION, "AIJob", "j", "default"))
    posted: list[str] = []
    monkeypatch.setattr(kopf, "event", lambda body, type, reason, message: posted.append(message))

    real_write = handlers.write_status
    stalled, release = asyncio.Event(), asyncio.Event()
    answers: list[bool] = []

    async def old_leaders_write(*args: Any) -> bool:
        stalled.set()
        await release.wait()  # the request hangs, and is retried, past the new leader's write
        answers.append(await real_write(*args))
        return answers[-1]

    old, new = _Reconciler({"phase": "Running"}), _Reconciler({"phase": "Pending"})
    monkeypatch.setattr(handlers, "write_status", old_leaders_write)
    old_pass = asyncio.create_task(_pass(old, read))
    await stalled.wait()
    monkeypatch.setattr(handlers, "write_status", real_write)
    await _pass(new, read)
    assert cluster.call(lambda e: e.get(API_VERSION, "AIJob", "j", "default"))["status"]["phase"] == "Pending"
    assert new.discarded == [] and posted == ["to Pending"]

    release.set()
    await old_pass
    stored = cluster.call(lambda e: e.get(API_VERSION, "AIJob", "j", "default"))
    assert answers == [False] and stored["status"]["phase"] == "Pending"
    assert old.discarded == ["default/j"] and posted == ["to Pending"]

    # The next pass reads the new version, and its write lands.
    await _pass(_Reconciler({"phase": "Scheduled"}), stored)
    assert cluster.call(lambda e: e.get(API_VERSION, "AIJob", "j", "default"))["status"]["phase"] == "Scheduled"
