"""The admission benchmark counts only decided jobs and keeps its record for the cited run; the
percentile helper picks the nearest rank exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# `bench` is a folder at the repository root, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from koinon_operator.ray_jobs import RayNodeInfo, RayUnavailableError

from bench.admission import __main__ as admission
from bench.percentiles import percentile
from tests.aijob.fake_ray import Clock, FakeRay, make_body, make_reconciler, step


class NoNodeList(FakeRay):
    async def nodes(self) -> list[RayNodeInfo]:
        raise RayUnavailableError("Ray dashboard unreachable: connection refused")


async def test_a_job_still_waiting_for_placement_is_not_decided() -> None:
    """A first pass that could not ask Ray leaves Pending/Accepted: the bench called that decided,
    so a run in which nothing was placed looked fast."""
    body = make_body({"entrypoint": "python -c pass", "resources": {"gpus": 1, "cpus": 0.1}})
    await step(make_reconciler(NoNodeList(), Clock()), body)
    assert (body["status"]["phase"], body["status"]["reason"]) == ("Pending", "Accepted")
    assert not admission.decided(body["status"])
    assert admission.decided({"phase": "Pending", "reason": "Unschedulable", "message": "0/4 nodes"})
    assert admission.decided({"phase": "Scheduled"})


def test_an_admission_run_of_another_size_does_not_replace_the_record(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def measured(count: int, timeout: float) -> dict[str, object]:
        return {"jobs": count}

    record = tmp_path / "admission.json"
    monkeypatch.setattr(admission, "RESULTS", record)
    monkeypatch.setattr(admission, "run", measured)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench.admission", "--jobs", "5"])
    admission.main()
    assert not record.exists() and (tmp_path / "koinon-bench-admission-5.json").exists()
    monkeypatch.setattr(sys, "argv", ["bench.admission"])
    admission.main()
    assert record.exists()


def test_nearest_rank_is_not_thrown_off_by_float_rounding() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert percentile(samples, 0.5) == 50.0 and percentile(samples, 0.99) == 99.0
    assert percentile(samples, 0.07) == 7.0  # 0.07 * 100 = 7.000000000000001
    assert percentile([float(i) for i in range(1, 51)], 0.14) == 7.0
    assert percentile(samples, 1.0) == 100.0 and percentile(samples, 0.001) == 1.0
