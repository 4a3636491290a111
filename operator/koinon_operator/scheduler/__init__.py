"""Koinon scheduler core: pure placement, reputation, latency, verification and rescheduling.

No Kubernetes, Ray, I/O or clock here: time is always an argument. The operator maps CRD objects to
the snapshot types in `types` and calls `schedule` (or a `Placer`).
"""

from .baselines import LeastLatencyPlacer, RandomPlacer, ReputationOnlyPlacer, RoundRobinPlacer
from .config import (
    DEFAULT_CONFIG,
    LatencyConfig,
    ReputationConfig,
    SchedulerConfig,
    ScoringConfig,
    VerificationConfig,
)
from .latency import RttEstimate, current_rtt_ms, is_stale, observe_rtt
from .placer import KoinonPlacer, Placer, schedule
from .reputation import (
    FRESH,
    ReputationEvidence,
    decayed,
    from_status,
    lower_bound,
    record_agreement,
    record_disagreement,
    record_failure,
    record_heartbeats,
    record_success,
    record_timeout,
    score,
    to_status,
    uptime,
)
from .rescheduling import Action, FailJob, Ignore, JobAttemptState, Reschedule, on_job_failed, on_node_lost
from .types import Gpu, JobRequest, NodeSnapshot, Placement, SchedulingResult, Unschedulable
from .verification import (
    Accepted,
    NodeResult,
    NoMajority,
    TrustRecord,
    apply_quorum_outcome,
    decide_quorum,
    plan_replication,
    skip_probability,
    stable_seed,
)

__all__ = [
    "DEFAULT_CONFIG",
    "FRESH",
    "Accepted",
    "Action",
    "FailJob",
    "Gpu",
    "Ignore",
    "JobAttemptState",
    "JobRequest",
    "KoinonPlacer",
    "LatencyConfig",
    "LeastLatencyPlacer",
    "NoMajority",
    "NodeResult",
    "NodeSnapshot",
    "Placement",
    "Placer",
    "RandomPlacer",
    "ReputationConfig",
    "ReputationEvidence",
    "ReputationOnlyPlacer",
    "Reschedule",
    "RoundRobinPlacer",
    "RttEstimate",
    "SchedulerConfig",
    "SchedulingResult",
    "ScoringConfig",
    "TrustRecord",
    "Unschedulable",
    "VerificationConfig",
    "apply_quorum_outcome",
    "current_rtt_ms",
    "decayed",
    "decide_quorum",
    "from_status",
    "is_stale",
    "lower_bound",
    "observe_rtt",
    "on_job_failed",
    "on_node_lost",
    "plan_replication",
    "record_agreement",
    "record_disagreement",
    "record_failure",
    "record_heartbeats",
    "record_success",
    "record_timeout",
    "schedule",
    "score",
    "skip_probability",
    "stable_seed",
    "to_status",
    "uptime",
]
