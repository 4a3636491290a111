"""Deleting an AIJob while Ray cannot be reached: the finalizer waits for Ray for a grace period
(KOINON_STOP_GRACE), then lets the object go with a Warning that names what may still run."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from koinon_operator import handlers
from koinon_operator.config import OperatorConfig
from koinon_operator.ray_jobs import RayJobState, RayUnavailableError
from koinon_operator.reconciler import submission_id_for

from .fake_ray import UID, Clock, FakeRay, make_body, make_reconciler, step
from .test_tracing_and_ray_errors import _tracer


class UnreachableOnStop(FakeRay):
    unreachable: bool = False

    async def stop(self, submission_id: str) -> None:
        if self.unreachable:
            raise RayUnavailableError("connection refused")
        await super().stop(submission_id)


async def _running_job(ray: FakeRay) -> tuple[Any, dict[str, Any]]:
    reconciler = make_reconciler(ray, Clock())
    body = make_body({"entrypoint": "python x.py"})
    await step(reconciler, body)  # Accepted + Scheduled
    await step(reconciler, body)  # Submitted
    ray.set_state(submission_id_for(UID, 1), RayJobState.RUNNING)
    await step(reconciler, body)
    assert body["status"]["phase"] == "Running"
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    return reconciler, body


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    posted: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "event", lambda body, **kwargs: posted.append(kwargs))
    monkeypatch.setattr(handlers, "CONFIG", OperatorConfig(stop_grace_seconds=60))
    return posted


async def test_the_finalizer_holds_while_ray_is_unreachable_within_the_grace(events: list[dict[str, Any]]) -> None:
    ray = UnreachableOnStop()
    reconciler, body = await _running_job(ray)
    tracer, _exporter = _tracer()
    ray.unreachable = True
    stop_ray_job: Any = handlers.stop_ray_job  # kopf's decorator types it as a handler spec
    memo = SimpleNamespace(
        reconciler=reconciler, tracer=tracer, ray=ray, leader=SimpleNamespace(is_leader=True, term=1)
    )
    with pytest.raises(kopf.TemporaryError):
        await stop_ray_job(body=body, memo=memo, runtime=timedelta(seconds=59))
    assert events == []
    # Ray is back before the grace ran out: the job is stopped, as always.
    ray.unreachable = False
    await stop_ray_job(body=body, memo=memo, runtime=timedelta(seconds=65))
    assert ray.stopped == [submission_id_for(UID, 1)]
    assert [e["reason"] for e in events] == ["Stopped"]


async def test_past_the_grace_the_aijob_goes_with_a_warning_naming_its_ray_jobs(
    events: list[dict[str, Any]],
) -> None:
    ray = UnreachableOnStop()
    reconciler, body = await _running_job(ray)
    tracer, exporter = _tracer()
    ray.unreachable = True
    stop_ray_job: Any = handlers.stop_ray_job
    memo = SimpleNamespace(
        reconciler=reconciler, tracer=tracer, ray=ray, leader=SimpleNamespace(is_leader=True, term=1)
    )
    await stop_ray_job(body=body, memo=memo, runtime=timedelta(seconds=60))  # returns: the finalizer goes
    assert [(e["type"], e["reason"]) for e in events] == [("Warning", "StopUnconfirmed")]
    assert submission_id_for(UID, 1) in events[0]["message"]
    assert "connection refused" in events[0]["message"]
    assert "aijob" in [s.name for s in exporter.get_finished_spans()]  # the trace gets its root


def test_the_grace_is_checked_at_start() -> None:
    with pytest.raises(ValueError, match="KOINON_STOP_GRACE"):
        OperatorConfig(stop_grace_seconds=float("nan"))
    with pytest.raises(ValueError, match="KOINON_STOP_GRACE"):
        OperatorConfig(stop_grace_seconds=-1)
    assert OperatorConfig(stop_grace_seconds=0).stop_grace_seconds == 0  # give up at once, as KubeRay
