"""An admission run in which the fleet placed nothing is no figure, and the
JSON's volunteer_gpus is what the cluster had, not a constant."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from koinon_dev.cluster import DevClusterConfig, DevClusterInfo

from bench.admission import __main__ as admission


class FakeCluster:
    """Came up, but its volunteers were not Ready yet: every job is answered Unschedulable at once."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def up(self, progress: bool = True) -> DevClusterInfo:
        return DevClusterInfo(
            kubeconfig=Path("/nonexistent"), api_url="", ray_dashboard_url="", ray_address="",
            process_groups={"operator": os.getpid()}, log_dir=Path("/nonexistent"),
        )  # fmt: skip

    def down(self) -> list[str]:
        return []


def _fake_kubectl(count: int) -> Any:
    def kubectl(kubeconfig: Path, *args: str, input_text: str | None = None, timeout: float = 60) -> str:
        if args[:2] == ("get", "aij"):
            status = {"phase": "Pending", "reason": "Unschedulable", "message": "0/0 nodes are available"}
            items = [{"metadata": {"name": f"bench-{i:04d}"}, "status": status} for i in range(count)]
            return json.dumps({"items": items})
        return ""

    return kubectl


async def _fake_watch(kubeconfig: Path, namespace: str, count: int, created: dict[str, float],
                      first_status: dict[str, float], all_decided: asyncio.Event) -> None:  # fmt: skip
    for i in range(count):
        created[f"bench-{i:04d}"] = 0.0
        first_status[f"bench-{i:04d}"] = 0.001
    all_decided.set()


def test_a_run_where_no_job_could_be_placed_is_no_figure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    count = 20
    monkeypatch.setattr(admission, "DevCluster", FakeCluster)
    monkeypatch.setattr(admission, "kubectl", _fake_kubectl(count))
    monkeypatch.setattr(admission, "watch_jobs", _fake_watch)
    with pytest.raises(RuntimeError):
        result = asyncio.run(admission._measure(tmp_path, count, 30))
        # Before the fix: a figure, recorded as if 4 GPUs had been there to place on.
        print(result["phases_at_end"], result["volunteer_gpus"], result["seconds_to_all_decided"])


def test_volunteer_gpus_is_what_the_control_plane_was_configured_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    count = 20

    def three_volunteers(**kwargs: Any) -> DevClusterConfig:
        return DevClusterConfig(volunteers=3, **kwargs)

    def kubectl(kubeconfig: Path, *args: str, input_text: str | None = None, timeout: float = 60) -> str:
        if args[:2] == ("get", "aij"):
            placed = {"phase": "Scheduled", "reason": "Scheduled"}
            waiting = {"phase": "Pending", "reason": "Unschedulable"}
            statuses = [placed if i < 6 else waiting for i in range(count)]
            items = [{"metadata": {"name": f"bench-{i:04d}"}, "status": s} for i, s in enumerate(statuses)]
            return json.dumps({"items": items})
        return ""

    monkeypatch.setattr(admission, "DevClusterConfig", three_volunteers)
    monkeypatch.setattr(admission, "DevCluster", FakeCluster)
    monkeypatch.setattr(admission, "kubectl", kubectl)
    monkeypatch.setattr(admission, "watch_jobs", _fake_watch)
    result = asyncio.run(admission._measure(tmp_path, count, 30))
    assert result["volunteer_gpus"] == 6 and result["phases_at_end"] == {"Scheduled": 6, "Pending": 14}


def test_jobs_that_finished_and_freed_their_gpu_still_count_as_placed() -> None:
    admission.check_fleet_placed({"Succeeded": 3, "Running": 4, "Pending": 13}, 20, 4)
    admission.check_fleet_placed({"Scheduled": 2}, 2, 4)  # fewer jobs than GPUs: all placed is enough
    with pytest.raises(RuntimeError, match="3 of 20 jobs placed on a fleet of 4 GPUs"):
        admission.check_fleet_placed({"Scheduled": 3, "Failed": 1, "Pending": 16}, 20, 4)
