"""Simulation parameters (the full run and the `--quick` smoke run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class SimParams:
    seed: int = 1
    nodes: int = 10_000
    jobs: int = 100_000
    arrival_window_h: float = 10.0
    """The measured jobs arrive as a Poisson stream over this window (about 40 % of online GPU
    capacity)."""
    warmup_h: float = 5.0
    """Hours of the same job stream before the measured window, so the platform has a history (as
    one that runs continuously does) and the figures are not those of its first hours; warm-up
    jobs are not counted. 0 = cold start: every node new when the first measured job arrives."""
    horizon_h: float = 40.0
    """Simulation stops here; jobs without an accepted result by then count as unfinished."""
    rtt_ms: tuple[float, float] = (5.0, 300.0)
    reliability: tuple[float, float] = (0.50, 0.999)
    """Probability that a node runs one hour of work without crashing it (uniform per node)."""
    churn_per_h: float = 0.05
    """Rate at which an online volunteer leaves (exponential)."""
    churn_returns: float = 0.5
    """Share of leavers that come back with the same identity; the rest are replaced by a new node."""
    offline_mean_h: float = 1.0
    speed_noise_sigma: float = 0.2
    """Lognormal spread of a node's true speed around its GPU model's table speed (clipped to
    0.5-1.5x): the scheduler knows the model, not the node."""
    adversary_share: float = 0.10
    sleeper_share: float = 0.5
    """Share of adversary owners that behave well for a while (10-40 results) before lying."""
    sleeper_lie_probability: float = 0.5
    liar_lie_probability: float = 1.0
    adversary_fleet_share: float = 0.5
    """Share of adversary nodes that belong to fleets of `fleet_size` nodes under one owner (Sybil)."""
    fleet_size: int = 10
    whitewash_share: float = 0.5
    """Share of replacement adversary nodes that join under a new owner identity."""
    colluding: bool = True
    """Adversaries return the same wrong digest for a job, so two of them can outvote honesty."""
    verification_quorum: int = 2
    """What every simulated AIJob asks for (`verification.mode: replicated`); baselines ignore it."""
    duration_estimate_sigma: float = 0.5
    """Lognormal error of the runtime estimate each job carries (`JobRequest.expected_duration_s`)."""
    tick_s: float = 60.0
    rtt_probe_every_s: float = 240.0
    lost_detection_s: float = 30.0
    heartbeat_s: float = 60.0
    backoff_limit: int = 2
    """Every simulated AIJob's `spec.backoffLimit` (the AIJob default): failed attempts, and
    verified attempts without a majority, each counted against it; one more fails the job."""
    max_batch: int = 2000

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


FULL = SimParams()
QUICK = replace(FULL, nodes=600, jobs=3000, horizon_h=30.0)
