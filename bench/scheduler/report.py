"""Benchmark JSON and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

POLICIES = ("koinon", "random", "round_robin", "least_latency", "reputation_only")
RATIO_KEYS = (
    "completion_mean_s",
    "completion_p95_s",
    "completion_p95_all_jobs_s",
    "wasted_gpu_hours",
    "replication_overhead",
)


def add_ratios(policies: dict[str, dict[str, Any]]) -> None:
    base = policies["random"]
    for metrics in policies.values():
        metrics["vs_random"] = {
            k: (metrics[k] / base[k] if base.get(k) and metrics.get(k) is not None else None) for k in RATIO_KEYS
        }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def minutes(seconds: float | None) -> float:
    """For plots and printouts: NaN (no bar) where a policy accepted no result at all."""
    return math.nan if seconds is None else seconds / 60


def plot(
    path: Path, policies: dict[str, dict[str, Any]], title: str, variants: dict[str, dict[str, Any]] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = {**policies, **(variants or {})}
    names = [p for p in POLICIES if p in policies] + list(variants or {})
    colors = ["#2a7" if n == "koinon" else "#8cd" if n.startswith("koinon") else "#999" for n in names]
    panels = [
        ("Accepted results correct when accepted (%)", [100 * policies[n]["correct_rate"] for n in names]),
        ("Completion p95 (min)", [minutes(policies[n]["completion_p95_s"]) for n in names]),
        ("Completion mean (min)", [minutes(policies[n]["completion_mean_s"]) for n in names]),
        ("Wasted GPU-hours", [policies[n]["wasted_gpu_hours"] for n in names]),
        # replication_overhead: work of executions run to the end / one execution per accepted job.
        ("Replication overhead (runs to end / useful)", [policies[n]["replication_overhead"] for n in names]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (label, values) in zip(axes, panels, strict=True):
        ax.bar(range(len(names)), values, color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        if label.startswith("Accepted"):
            ax.set_ylim(min(values) - 2, 100.2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
