"""Tunable weights and thresholds of the scheduler core, with documented defaults.

Every number here is a policy choice; the defaults cite where they come from (BOINC, Petals, Jøsang)
or why they were picked. All dataclasses are frozen so a config can be shared and hashed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ReputationConfig:
    """Beta-reputation evidence weights (Jøsang: score = (r + a) / (r + s + a + b))."""

    prior_alpha: float = 1.0
    """Pseudo-successes of a node that has no evidence yet (uniform prior, Jøsang's +1)."""
    prior_beta: float = 1.0
    """Pseudo-failures of a node that has no evidence yet."""
    success_weight: float = 1.0
    """Positive evidence of one finished, unverified result."""
    agreement_weight: float = 1.0
    """Extra positive evidence when a result matched the accepted quorum digest."""
    failure_weight: float = 1.0
    """Negative evidence of an execution that crashed on the node."""
    timeout_weight: float = 1.0
    """Negative evidence of an execution lost because the node vanished (heartbeats stopped)."""
    disagreement_weight: float = 10.0
    """Negative evidence of a result that contradicted the accepted digest: a lie or a silent
    corruption is far worse than a crash, because a crash is visible and a wrong answer is not."""
    half_life_s: float = 7 * 24 * 3600.0
    """Evidence halves every week, so old behaviour fades and the score drifts back to the prior."""
    confidence_z: float = 1.645
    """z of the one-sided 95 % Wilson lower bound used for placement and for `minReputation`."""
    owner_disagreement_pooling: float = 1.0
    """Share of a sibling node's disagreements (same owner) charged to every node of that owner:
    lying is an owner's decision, so one caught node taints the whole fleet (Sybil resistance)."""


@dataclass(frozen=True, slots=True)
class LatencyConfig:
    """Smoothed RTT as in Petals: exponential smoothing, expiry when no fresh sample arrives."""

    alpha: float = 0.2
    """Weight of a new RTT sample (Petals uses 0.2)."""
    stale_after_s: float = 300.0
    """An RTT older than this is unknown again (Petals expires after 300 s)."""


@dataclass(frozen=True, slots=True)
class VerificationConfig:
    """Adaptive replication (BOINC-style) for jobs with `verification.mode: replicated`."""

    trust_after_valid: int = 3
    """Consecutive validated results after which a node may skip replication. BOINC waits for 10 and
    then checks 1 result in n; Koinon starts after 3 with a steeper check rate (`skip_ramp`), so a
    node is checked at least as often as BOINC checks its newly trusted hosts (1 in 6 at n = 3, 1 in
    10 from n = 5) while a fleet of new volunteers earns trust in about an hour instead of several
    (figures in the scheduler README)."""
    skip_ramp: float = 2.0
    """Skip probability is 1 - 1/(skip_ramp x n) for n consecutive validated results (BOINC: 1)."""
    max_skip_probability: float = 0.9
    """Cap on the skip probability: at least one result in ten of a trusted node is still
    spot-checked, so a node that turns bad after a long clean record is caught within ~10 results."""
    owner_disagreement_tolerance: float = 0.5
    """A node is never trusted while its owner's (decayed) disagreement count exceeds this."""
    trusted_partner: bool = True
    """A verification copy of a job whose primary node is not trusted goes to a trusted node when one
    fits, so two fresh colluders cannot form a quorum by themselves (falls back to any node)."""
    trusted_wait_s: float = 1800.0
    """How long a large replicated job (see `trusted_wait_gpu_hours`) waits for a trusted node when
    only untrusted ones fit. On an untrusted node it runs twice (the verification copy); on a trusted
    one it usually runs once: for a big job a bounded wait is cheaper than doubling it. After the
    wait it goes to any node. 0 = never wait."""
    trusted_wait_gpu_hours: float = 1.0
    """Size (GPUs per replica, at least 1, x replicas x expected duration) from which a replicated job
    waits: a CPU-only job counts as 1 GPU per replica, as in the score's job size (doubling it costs
    too). Small jobs do not: they are cheap to verify, and running them on fresh nodes is how those
    nodes earn trust."""
    max_copies: int = 7
    """Copies of one job after which the scheduler gives up finding a majority."""
    seed_key: bytes = field(default=b"", repr=False)
    """Secret key (at most 64 bytes) of the skip coin, a keyed hash of the job's uid (its key when
    it has none) and attempt. A node can learn both (its submission id, its driver's env): with a
    key it knows, it would compute whether its copy is the only one (and lie only then, never
    caught). Empty: the coin is public, fixed for reproducible simulations and tests; the operator
    passes a random key of its own (kept out of the repr, so a logged config does not show it)."""

    def __post_init__(self) -> None:
        if len(self.seed_key) > 64:  # BLAKE2b's key limit: fail at start, not at the first placement
            raise ValueError(f"seed_key must be at most 64 bytes, got {len(self.seed_key)}")


DEFAULT_GPU_SPEEDS: tuple[tuple[str, float], ...] = (
    ("T4", 0.2),
    ("RTX 2080", 0.35),
    ("RTX 3060", 0.3),
    ("RTX 3070", 0.42),
    ("RTX 3080", 0.55),
    ("RTX 3090", 0.65),
    ("RTX 4070", 0.5),
    ("RTX 4080", 0.75),
    ("RTX 4090", 1.0),
    ("V100", 0.45),
    ("A10", 0.45),
    ("L4", 0.35),
    ("A100", 1.2),
    ("H100", 2.0),
)
"""Relative deep-learning training throughput (mixed precision), RTX 4090 = 1.0, rounded from public
GPU benchmark tables (e.g. Lambda's); a ranking more than a measurement, good to within ~30 %."""


@dataclass(frozen=True, slots=True)
class ScoringConfig:
    """Weights of the Koinon placement score (higher is better)."""

    reputation_weight: float = 1.0
    """Weight of the Wilson lower bound of the node's (owner-adjusted) reputation, in [0, 1]."""
    latency_weight: float = 0.5
    """Penalty per `latency_scale_ms` of smoothed RTT (Petals routes by RTT too)."""
    latency_scale_ms: float = 300.0
    """RTT that costs `latency_weight` points; 300 ms is the slowest volunteer we expect."""
    unknown_latency_ms: float = 300.0
    """RTT assumed for a node whose RTT is unknown or stale: as bad as the worst expected."""
    load_weight: float = 0.2
    """Penalty for the share of a node's GPUs already busy, to spread load."""
    packing_weight: float = 0.2
    """Penalty per 8 GPUs a placement would leave free on the node: a 1-GPU job goes to a 1-GPU
    node before it splits an idle 8-GPU node that an 8-GPU job could use (best fit)."""
    uptime_weight: float = 0.3
    """Weight of the node's heartbeat uptime estimate in [0, 1]."""
    reliability_weight: float = 2.0
    """Penalty per `large_job_gpu_hours` of GPU-hours a crash is expected to waste: GPUs x crash
    rate x duration^2 / 2 (a crash loses the time already spent and the rerun starts from scratch,
    so the loss grows with the square of the duration). Long jobs go where work gets finished."""
    crash_prior_count: float = 1.0
    """Pseudo-crashes of the crash-rate estimate (Gamma prior), with `crash_prior_hours`: a node
    without history is assumed to crash once per 3 hours of work, about a volunteer's average."""
    crash_prior_hours: float = 3.0
    """Pseudo-hours of work of the crash-rate estimate."""
    trusted_weight: float = 1.0
    """Bonus (scaled by job size) for a node that may skip replication (BOINC-trusted, owner clean):
    a big job run there is usually run once, on a fresh node it is run twice."""
    trusted_reserve_weight: float = 0.25
    """Penalty (scaled by 1 - job size) for putting a small job on a trusted node, keeping trusted
    capacity for big jobs; small jobs then build trust on fresh nodes, where verifying them is cheap."""
    large_job_gpu_hours: float = 2.0
    """GPU-hours (GPUs x expected duration) at which a job counts as fully large (size 1)."""
    default_duration_s: float = 1800.0
    """Duration assumed for a job that gives no `expected_duration_s`."""
    runtime_weight: float = 0.5
    """Penalty per hour the job is expected to run on the node (its expected duration on the
    reference GPU divided by the node's relative speed): long jobs go to fast GPUs, where they finish
    sooner and are exposed to crashes and churn for less time."""
    gpu_speeds: tuple[tuple[str, float], ...] = DEFAULT_GPU_SPEEDS
    """Relative throughput per GPU model (RTX 4090 = 1.0); see `speed.py`."""
    unknown_gpu_speed: float = 1.0
    """Speed assumed for a GPU model not in `gpu_speeds`: neutral, so unknown models are neither
    preferred nor avoided (all nodes equal when the operator knows no models)."""
    quarantine_below: float = 0.25
    """Koinon places nothing on a node whose (owner-adjusted) beta mean is below this. A fresh node
    scores 0.5; with the default weights (a disagreement counts 10, an agreement 2: it is a success
    too) one disagreement keeps a node below it until 3 unchecked successes or 2 agreements, two
    until 6 successes or 3 agreements, so a caught liar stops receiving work until its evidence
    decays (half-life) back toward the prior."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Everything the pure scheduling function needs besides its inputs."""

    reputation: ReputationConfig = field(default_factory=ReputationConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)


DEFAULT_CONFIG = SchedulerConfig()
