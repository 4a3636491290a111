"""An AIJob that goes without its finalizer (patched away by anyone with the `edit` role, or by an
admin unsticking a namespace deletion while the operator is down) has its Ray job stopped by the
leader's orphan sweep (orphans.py), as a Kubernetes Job's pods go with it; never a job whose AIJob
still exists, one of another namespace or pool, one too young, or on a list that failed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from koinon_operator import kube
from koinon_operator.orphans import OrphanSweeper, owner_uid, sweep_orphans_forever
from koinon_operator.ray_jobs import RayJobState, RayUnavailableError
from koinon_operator.reconciler import copy_submission_id, keyed_submission_nonce, submission_id_for

from tests.aijob.fake_ray import UID, Clock, FakeRay, make_body, make_reconciler, step
from tests.emulator.helpers import EmulatorThread, emulator_for_kube_client

REPO = Path(__file__).resolve().parents[2]
API = "koinon.dev/v1alpha1"
KEY = b"k" * 40
NONCE = keyed_submission_nonce(KEY)
OTHER = "0d6d2c9e-1111-4c2b-9a7e-5a4f1c0e7b21"
NOW = 1_800_000_000.0


async def running_job(ray: FakeRay, namespace: str = "ns", uid: str = UID, key: bytes = KEY, age_s: float = 120) -> str:
    """A job the reconciler placed and submitted (its real ids and Ray metadata), Ray running it,
    submitted ``age_s`` before NOW."""
    reconciler = make_reconciler(ray, Clock(), keyed_submission_nonce(key))
    body = make_body({"entrypoint": "python x.py"}, namespace=namespace, uid=uid)
    await step(reconciler, body)
    await step(reconciler, body)  # submitted
    submission_id = str(body["status"]["submissionId"])
    ray.set_state(submission_id, RayJobState.RUNNING)
    ray.jobs[submission_id] = replace(ray.jobs[submission_id], start_time_ms=int((NOW - age_s) * 1000))
    return submission_id


def sweeper(ray: FakeRay, existing: set[str] | Exception, namespace: str | None = None) -> OrphanSweeper:
    async def list_uids() -> set[str]:
        ray.stopped.append("<listed>")  # where the LIST fell among the stops
        if isinstance(existing, Exception):
            raise existing
        return existing

    fake: Any = ray
    return OrphanSweeper(fake, list_uids, NONCE, namespace, grace_s=60, clock=lambda: NOW)


async def test_the_job_of_a_gone_aijob_is_stopped_and_one_whose_aijob_exists_runs_on() -> None:
    ray = FakeRay()
    orphan = await running_job(ray)
    alive = await running_job(ray, uid=OTHER)
    assert await sweeper(ray, {OTHER}).sweep() == [orphan]
    assert ray.jobs[orphan].state is RayJobState.STOPPED and ray.jobs[alive].state is RayJobState.RUNNING
    # Stopped once: the next sweep lists the AIJobs again (for the running one) and stops nothing.
    ray.stopped.clear()
    assert await sweeper(ray, {OTHER}).sweep() == [] and ray.stopped == ["<listed>"]


async def test_young_ended_unkeyed_and_other_pools_jobs_are_left_alone() -> None:
    ray = FakeRay()
    young = await running_job(ray, age_s=30)  # under the grace: maybe just submitted
    ended = await running_job(ray, uid="e" * 8 + UID[8:])
    ray.set_state(ended, RayJobState.SUCCEEDED)
    other_pool = await running_job(ray, uid="a" * 8 + UID[8:], key=b"x" * 40)
    for submission_id in (submission_id_for("b" * 8 + UID[8:], 1), "koinon-made-up-1-0123456789abcdef", "raysubmit_1"):
        ray.jobs[submission_id] = replace(ray.jobs[young], submission_id=submission_id, start_time_ms=0)
    assert await sweeper(ray, set()).sweep() == []
    assert ray.stopped == []  # nothing stopped, and no AIJob LIST either: nothing could be an orphan
    assert {young, ended, other_pool} <= set(ray.jobs)


async def test_an_operator_of_one_namespace_sweeps_only_that_namespaces_jobs() -> None:
    ray = FakeRay()
    mine = await running_job(ray, namespace="team-a")
    theirs = await running_job(ray, namespace="team-b", uid=OTHER)  # its AIJob is not in team-a's LIST
    assert await sweeper(ray, set(), namespace="team-a").sweep() == [mine]
    assert ray.jobs[theirs].state is RayJobState.RUNNING


async def test_copies_are_named_by_their_attempts_uid() -> None:
    for copy in (0, 1, 12):
        assert owner_uid(copy_submission_id(UID, 3, copy, NONCE(UID, 3)), NONCE) == UID
    assert owner_uid(copy_submission_id(UID, 3, 1, NONCE(UID, 2)), NONCE) is None  # another attempt's nonce


async def test_nothing_is_stopped_on_a_failed_list_and_ray_is_listed_before_the_aijobs() -> None:
    ray = FakeRay()
    orphan = await running_job(ray)
    with pytest.raises(RuntimeError, match="API away"):
        await sweeper(ray, RuntimeError("API away")).sweep()
    assert ray.stopped == ["<listed>"] and ray.jobs[orphan].state is RayJobState.RUNNING

    async def unreachable() -> list[Any]:
        raise RayUnavailableError("connection refused")

    ray.stopped.clear()
    swept = sweeper(ray, set())
    swept.ray = replace_list(ray, unreachable)
    with pytest.raises(RayUnavailableError):
        await swept.sweep()
    assert ray.stopped == []  # no LIST, no stop
    # Ray's jobs are listed first: each was submitted after its AIJob was created, so one whose
    # AIJob still exists is in the later LIST (a LIST taken first could miss a job created since).
    assert await sweeper(ray, set()).sweep() == [orphan]
    assert ray.stopped == ["<listed>", orphan]


def replace_list(ray: FakeRay, list_unfinished_jobs: Callable[[], Any]) -> Any:
    class Listing:
        stop = ray.stop

    listing: Any = Listing()
    listing.list_unfinished_jobs = list_unfinished_jobs
    return listing


async def test_a_sweep_stops_nothing_once_the_lease_is_lost_and_the_loop_outlives_failures() -> None:
    ray = FakeRay()
    orphan = await running_job(ray)
    assert await sweeper(ray, set()).sweep(leading=lambda: False) == []
    assert ray.jobs[orphan].state is RayJobState.RUNNING

    failures = [RuntimeError("API away")]
    leader = {"leading": False, "term": 1}

    async def list_uids() -> set[str]:
        if failures:
            raise failures.pop()
        return set()

    fake: Any = ray
    loop = asyncio.create_task(
        sweep_orphans_forever(
            OrphanSweeper(fake, list_uids, NONCE, None, grace_s=60, clock=lambda: NOW),
            0.01,
            lambda: bool(leader["leading"]),
            lambda: int(leader["term"]),
        )
    )
    try:
        await asyncio.sleep(0.1)
        assert ray.jobs[orphan].state is RayJobState.RUNNING and failures  # a follower does not sweep
        leader["leading"] = True
        for _ in range(100):
            if ray.jobs[orphan].state is RayJobState.STOPPED:
                break
            await asyncio.sleep(0.01)
        assert not failures and ray.jobs[orphan].state is RayJobState.STOPPED  # swept again after the failure
    finally:
        loop.cancel()


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatorThread]:
    crd = yaml.safe_load((REPO / "manifests" / "crds" / "aijobs.koinon.dev.yaml").read_text())
    with emulator_for_kube_client(tmp_path, monkeypatch, crd) as server:
        yield server


async def test_the_aijob_list_is_every_page_of_the_namespace_or_of_all(
    cluster: EmulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube, "AIJOB_LIST_PAGE", 2)  # 5 jobs: three pages
    uids: dict[str, set[str]] = {"a": set(), "b": set()}

    def create(document: dict[str, Any]) -> dict[str, Any]:
        created: dict[str, Any] = cluster.call(lambda e: e.create(document))
        return created

    for namespace in uids:
        create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    for index in range(5):
        namespace = "a" if index < 4 else "b"
        job = {"apiVersion": API, "kind": "AIJob", "metadata": {"name": f"j{index}", "namespace": namespace},
               "spec": {"entrypoint": "x"}}  # fmt: skip
        uids[namespace].add(create(job)["metadata"]["uid"])
    assert await kube.list_aijob_uids("a") == uids["a"]
    assert await kube.list_aijob_uids(None) == uids["a"] | uids["b"]
