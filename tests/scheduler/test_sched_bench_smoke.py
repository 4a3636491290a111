"""Smoke test of the simulator benchmark: JSON shape and determinism for a seed."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

# `bench` is a folder at the repository root, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from koinon_operator.scheduler import KoinonPlacer, RandomPlacer

from bench.scheduler.__main__ import main
from bench.scheduler.params import QUICK
from bench.scheduler.simulator import Simulation

METRICS = ("correct_rate", "completion_mean_s", "completion_p95_s", "wasted_gpu_hours", "replication_overhead")
SMALL = ["--quick", "--nodes", "150", "--jobs", "400", "--parallel", "1", "--no-throughput"]


def test_quick_run_writes_the_documented_json(tmp_path: Path) -> None:
    out = tmp_path / "scheduler.json"
    assert main([*SMALL, "--out", str(out), "--plot", str(tmp_path / "s.png")]) == 0
    data = json.loads(out.read_text())
    assert set(data["policies"]) == {"koinon", "random", "round_robin", "least_latency", "reputation_only"}
    for metrics in data["policies"].values():
        for key in METRICS:
            assert isinstance(metrics[key], float)
        assert 0.0 <= metrics["correct_rate"] <= 1.0
        assert metrics["replication_overhead"] >= 1.0
        assert metrics["accepted"] + metrics["unfinished"] == 400
    assert data["policies"]["random"]["vs_random"]["completion_p95_s"] == 1.0
    assert "placements_per_s" in data and data["simulation"]["nodes"] == 150
    assert (tmp_path / "s.png").stat().st_size > 0


def test_simulation_is_deterministic_for_a_seed() -> None:
    params = replace(QUICK, nodes=120, jobs=300)
    a = Simulation(params, KoinonPlacer(), verify=True).run()
    b = Simulation(params, KoinonPlacer(), verify=True).run()
    for m in (a, b):
        m.pop("scheduler_seconds")
    assert a == b
    r1 = Simulation(params, RandomPlacer(seed=1), verify=False).run()
    r2 = Simulation(replace(params, seed=2), RandomPlacer(seed=2), verify=False).run()
    assert r1["executions"] != r2["executions"] or r1["completion_mean_s"] != r2["completion_mean_s"]


def test_a_run_with_another_fleet_or_stream_does_not_replace_the_record(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`--nodes 150 --jobs 300 --no-throughput` (no --quick) overwrote scheduler.json and its plot,
    which the README cites for 10,000 volunteers, 100,000 jobs and a placements/s figure."""
    import bench.scheduler.__main__ as scheduler_bench

    monkeypatch.setattr(scheduler_bench, "ROOT", tmp_path)
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert main(["--nodes", "150", "--jobs", "300", "--parallel", "1", "--no-throughput"]) == 0
    assert not (tmp_path / "bench" / "results" / "scheduler.json").exists()
    assert (
        json.loads((tmp_path / "tmp" / "koinon-bench-scheduler-trial.json").read_text())["simulation"]["nodes"] == 150
    )
