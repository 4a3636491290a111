"""spec.constraints.regions is bounded by the operator (ratcheted as its other newer checks are; the
CRD leaves it to the operator, as it does those: README "AIJob"; an edit of the regions is checked,
though submission_digest leaves them out: status.scheduling.regionsDigest), and an
Unschedulable reason names a long list in a few words: it is a key of status.scheduling.reasons,
which otherwise grew with the spec (20,000 regions: a 346 KB status patch, and past the API server's
object limit a job that never shows any status)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from koinon_operator.api.aijob import MAX_REGION_CHARS, MAX_REGIONS, SpecError, parse_spec, parse_spec_ratcheting
from koinon_operator.ray_jobs import RayJobState
from koinon_operator.reconciler import PLACED_REGIONS
from koinon_operator.scheduler.index import MAX_REGIONS_REASON, region_reason
from koinon_operator.scheduling import ReputationPlacer

from .fake_ray import Clock, FakeRay, make_body, make_reconciler, step
from .test_spec_ratcheting import _running_under_previous_operator

TOO_MANY = ["unknown", *(f"region-{i:06d}" for i in range(MAX_REGIONS))]  # 257, vn-1's region first
LONGEST = [f"{i:03d}-".ljust(MAX_REGION_CHARS, "r") for i in range(MAX_REGIONS)]  # the most the operator takes
VOLUNTEER = {"spec": {"owner": "a", "gpus": [{"model": "L4", "memoryMiB": 1}]}, "status": {"phase": "Ready"}}


def _job(regions: list[str]) -> dict[str, Any]:
    return {"entrypoint": "python x.py", "constraints": {"regions": regions}}


async def test_an_unschedulable_job_with_the_longest_regions_list_keeps_a_small_status() -> None:
    rec = make_reconciler(FakeRay(), Clock())
    rec.placer = ReputationPlacer()  # the operator's own placer (handlers.configure)
    outcome = await rec.reconcile(make_body(_job(LONGEST)), {}, {"vn-1": {**VOLUNTEER, "status": {
        "phase": "Ready", "address": "127.0.20.1"}}})  # fmt: skip
    assert (outcome.status["phase"], outcome.status["reason"]) == ("Pending", "Unschedulable"), outcome.status
    assert len(json.dumps(outcome.status)) < 8 * 1024
    (reason,) = [r for r in outcome.status["scheduling"]["reasons"] if r.startswith("region")]
    assert reason.startswith(f"region not in the {MAX_REGIONS} listed ['000-rrr") and reason.endswith(" and 253 more")
    assert len(reason) <= MAX_REGIONS_REASON


@pytest.mark.parametrize(
    "regions", [["eu-west", "us-east"], [f"region-{i:06d}" for i in range(20_000)], ["x" * 100_000]]
)
def test_a_regions_reason_is_short_whatever_the_list(regions: list[str]) -> None:
    """Also for a list beyond the bounds (a job an earlier operator placed runs on with it)."""
    reason = region_reason(regions)
    assert len(reason) <= MAX_REGIONS_REASON, reason
    if len(regions) == 2:
        assert reason == "region not in ['eu-west', 'us-east']"  # few and short: named whole, as before


def test_the_operator_refuses_more_or_longer_regions_than_its_bounds() -> None:
    parse_spec(_job(LONGEST))
    with pytest.raises(SpecError) as raised:
        parse_spec(_job([*LONGEST, "one-more"]))
    assert raised.value.field_path == "spec.constraints.regions"
    assert f"at most {MAX_REGIONS} regions" in str(raised.value)
    with pytest.raises(SpecError) as raised:
        parse_spec(_job(["eu", "x" * (MAX_REGION_CHARS + 1)]))
    assert raised.value.field_path == "spec.constraints.regions[1]"
    # Ratcheted, as the other checks added after operators took such specs.
    _, refusal = parse_spec_ratcheting(_job(["x" * (MAX_REGION_CHARS + 1)]))
    assert refusal is not None and refusal.field_path == "spec.constraints.regions[0]"


async def test_a_new_job_with_too_many_regions_fails_naming_the_field() -> None:
    """Refused with the field, not placed."""
    ray, clock = FakeRay(), Clock()
    body = make_body(_job([f"region-{i:06d}" for i in range(20_000)]))
    await step(make_reconciler(ray, clock), body)
    status = body["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "InvalidSpec"), status["reason"]
    assert status["message"].startswith("spec.constraints.regions: at most 256 regions")
    assert ray.submissions == []


async def test_a_job_placed_with_too_many_regions_before_the_bound_runs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    ray, clock, body = await _running_under_previous_operator(monkeypatch, _job(TOO_MANY))
    events = []
    for _ in range(2):
        clock.advance(30)
        events += (await step(make_reconciler(ray, clock), body)).events
    assert body["status"]["phase"] == "Running", body["status"]
    (warning,) = [e for e in events if e.reason == "InvalidSpecTolerated"]
    assert warning.message.startswith("spec.constraints.regions: ")


def _edit_regions(body: dict[str, Any], regions: list[str]) -> None:
    body["spec"] = {**body["spec"], "constraints": {"regions": regions}}
    body["metadata"]["generation"] += 1


async def test_an_edit_of_a_running_job_into_too_many_regions_fails_it() -> None:
    """The regions are not in the submission digest (they decide where, not what, a job runs), yet
    a ratcheted check reads them: the edit is checked as any invalid edit is (README "AIJob"), not
    taken for the spec an earlier operator placed, with a Warning saying so."""
    ray, clock = FakeRay(), Clock()
    body = make_body(_job(["unknown"]))
    rec = make_reconciler(ray, clock)
    for _ in range(2):
        await step(rec, body)
    sid = body["status"]["submissionId"]
    ray.set_state(sid, RayJobState.RUNNING)
    await step(rec, body)
    assert body["status"]["phase"] == "Running"
    _edit_regions(body, TOO_MANY)
    clock.advance(30)
    events = (await step(rec, body)).events
    assert [e for e in events if e.reason == "InvalidSpecTolerated"] == []
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec"), body["status"]
    assert body["status"]["message"].startswith("spec.constraints.regions: at most 256 regions")
    assert sid in ray.stopped


async def test_a_job_waiting_to_retry_edited_into_too_many_regions_is_not_placed_with_them() -> None:
    ray, clock = FakeRay(), Clock()
    body = make_body({**_job(["unknown"]), "backoffLimit": 2})
    rec = make_reconciler(ray, clock)
    await step(rec, body)
    await step(rec, body)
    ray.set_state(body["status"]["submissionId"], RayJobState.FAILED, exit_code=1, message="boom")
    clock.advance(10)
    await step(rec, body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "BackOff"), body["status"]
    _edit_regions(body, TOO_MANY)
    clock.advance(30)
    await step(rec, body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec"), body["status"]
    assert body["status"]["attempts"] == 1 and len(ray.submissions) == 1


async def test_a_tolerated_job_whose_regions_are_edited_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Placed with too many regions before the bound, then edited to other regions still too many."""
    ray, clock, body = await _running_under_previous_operator(monkeypatch, _job(TOO_MANY))
    new = make_reconciler(ray, clock)
    await step(new, body)
    assert body["status"]["phase"] == "Running", body["status"]
    _edit_regions(body, [*TOO_MANY, "one-more"])
    clock.advance(30)
    await step(new, body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Failed", "InvalidSpec"), body["status"]
    assert body["status"]["submissionId"] in ray.stopped


async def test_a_status_recording_no_regions_digest_keeps_its_job_running_after_a_regions_edit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An operator before regionsDigest recorded none: what its job was placed with is unknown, so
    the job runs on, as it did (stopping it could kill work nobody edited)."""
    ray, clock, body = await _running_under_previous_operator(monkeypatch, _job(TOO_MANY))
    del body["status"]["scheduling"][PLACED_REGIONS]
    _edit_regions(body, [*TOO_MANY, "one-more"])
    for _ in range(2):
        clock.advance(30)
        await step(make_reconciler(ray, clock), body)
    assert body["status"]["phase"] == "Running", body["status"]
    assert body["status"]["submissionId"] not in ray.stopped
