"""The scheduler benchmark's report: no completion figure for a policy that accepted nothing, and a
plot whose panels say what they show."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.axes
from koinon_operator.scheduler import JobRequest, NodeSnapshot, RandomPlacer
from koinon_operator.scheduler.types import SchedulingResult

from bench.scheduler import report
from bench.scheduler.params import QUICK
from bench.scheduler.simulator import Simulation


class PlacesNothing:
    name = "broken"

    def place(self, jobs: Sequence[JobRequest], nodes: Sequence[NodeSnapshot], now: float) -> SchedulingResult:
        return SchedulingResult()


def test_a_policy_that_accepts_nothing_has_no_completion_figure() -> None:
    params = replace(QUICK, nodes=40, jobs=40, warmup_h=0.0, horizon_h=3.0)
    broken = Simulation(params, PlacesNothing(), verify=False).run()  # type: ignore[arg-type]
    random = Simulation(params, RandomPlacer(seed=1), verify=False).run()
    policies = {"random": random, "broken": broken}
    report.add_ratios(policies)
    assert broken["accepted"] == 0
    # Before: completions of np.zeros(1), a p95 of 0 s and "0.0x random", a target met by doing nothing.
    assert broken["completion_p95_s"] is None and broken["vs_random"]["completion_p95_s"] is None
    assert random["completion_p95_s"] > 0


def test_the_last_panel_is_titled_after_what_it_plots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bars: dict[int, list[float]] = {}
    titles: dict[int, str] = {}
    real_bar, real_title = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.set_title

    def bar(self: Any, x: Any, height: Any, *args: Any, **kwargs: Any) -> Any:
        bars[id(self)] = list(height)
        return real_bar(self, x, height, *args, **kwargs)

    def set_title(self: Any, label: str, *args: Any, **kwargs: Any) -> Any:
        titles[id(self)] = label
        return real_title(self, label, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", bar)
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", set_title)
    one = {"correct_rate": 0.999, "completion_p95_s": None, "completion_mean_s": 1557.0,
           "wasted_gpu_hours": 13236.0, "replication_overhead": 1.176, "executed_vs_useful": 1.323}  # fmt: skip
    report.plot(tmp_path / "s.png", {name: dict(one) for name in report.POLICIES}, "t")
    by_title = {titles[ax]: values for ax, values in bars.items()}
    assert by_title["Replication overhead (runs to end / useful)"][0] == pytest.approx(1.176)
    assert "GPU-hours executed / useful" not in by_title
