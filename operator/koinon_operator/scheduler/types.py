"""Plain frozen input and output types of the scheduler (the operator maps CRD objects to these).

Field names follow the CRDs: `AIJob.spec.resources.{gpus,gpuMemoryMiB,cpus}`,
`spec.constraints.{minReputation,maxLatencyMs,regions}`, `spec.verification.quorum`;
`VolunteerNode.spec.{owner,region,gpus,cordoned}`, `status.{connected,phase,latency.smoothedMs}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .reputation import FRESH, ReputationEvidence

# The longest expected duration a JobRequest takes (about 3e12 years). Scoring squares the hours (a
# crash's expected loss), so past ~1e150 s the values left the finite range, and from ~1e155 s every
# node's value fell below the "left out" mark: the job was refused as if no owners were left, and
# so was every ordinary job of its shape in the same call. Above the largest integer an AIJob's
# `spec.expectedDurationSeconds` can hold (int64, 9.2e18 s), so no valid AIJob is refused by it
# (the operator clamps to it besides, scheduling.to_job).
MAX_EXPECTED_DURATION_S = 1e20


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU of a volunteer (`VolunteerNode.spec.gpus[]`)."""

    model: str
    memory_mib: int

    def __post_init__(self) -> None:
        if self.memory_mib < 0:
            raise ValueError(f"Gpu.memory_mib must be >= 0, got {self.memory_mib}")


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """What the scheduler knows about one volunteer at decision time."""

    name: str
    owner: str
    region: str
    ready: bool
    """`status.connected` and `status.phase == "Ready"`."""
    cordoned: bool
    gpus: tuple[Gpu, ...]
    free_gpus: int
    cpus_free: float
    rtt_ms: float | None = None
    """`status.latency.smoothedMs`; None when never measured."""
    rtt_updated_at: float | None = None
    reputation: ReputationEvidence = FRESH
    running_jobs: int = 0
    cpus_total: float | None = None
    """All the node's CPUs (Ray's total), idle or not; None when unknown (taken as enough). Lets the
    scheduler tell a job that waits for CPUs to free up from one no node could ever run."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("NodeSnapshot.name must not be empty")
        if not 0 <= self.free_gpus <= len(self.gpus):
            raise ValueError(
                f"NodeSnapshot {self.name}: free_gpus must be within 0..{len(self.gpus)}, got {self.free_gpus}"
            )
        if self.cpus_free < 0 or not math.isfinite(self.cpus_free):
            raise ValueError(f"NodeSnapshot {self.name}: cpus_free must be >= 0, got {self.cpus_free}")
        if self.cpus_total is not None and not (math.isfinite(self.cpus_total) and self.cpus_total >= 0):
            raise ValueError(f"NodeSnapshot {self.name}: cpus_total must be >= 0, got {self.cpus_total}")
        if self.rtt_ms is not None and (self.rtt_ms < 0 or not math.isfinite(self.rtt_ms)):
            raise ValueError(f"NodeSnapshot {self.name}: rtt_ms must be >= 0, got {self.rtt_ms}")


@dataclass(frozen=True, slots=True)
class JobRequest:
    """One pending AIJob attempt, as the scheduler sees it."""

    key: str
    """`namespace/name` of the AIJob (unique among the pending jobs)."""
    replicas: int = 1
    gpus_per_replica: int = 1
    gpu_memory_mib: int = 0
    """Minimum memory of each GPU a replica gets."""
    cpus_per_replica: float = 0.0
    min_reputation: float = 0.0
    """Compared with the node's reputation lower bound, not its mean."""
    max_latency_ms: float | None = None
    regions: frozenset[str] = frozenset()
    """Empty means any region."""
    verification_quorum: int = 1
    """1 = no verification; N >= 2 = `verification.mode: replicated` with quorum N."""
    least_copies: int = 1
    """Copies this attempt runs at least (up to the quorum), whatever the spot-check coin says: an
    earlier attempt of the job drew that many. A node that sees its job checked (the head's job list
    shows the other copy) and stops the check copy ends the attempt without failing; were the coin
    drawn afresh for the next attempt, a trusted liar would stop checks until a skip was drawn."""
    excluded_nodes: frozenset[str] = frozenset()
    """Nodes this placement leaves out. The operator passes the nodes of copies that gave no
    majority (status.scheduling.excludedNodes), and adds the nodes it tries last (failed, lost, or
    that failed the spec's runtime_env) only to a first try that places the job elsewhere
    (reconciler; the simulator, bench/scheduler, likewise); lost and failed nodes are left out for good
    only by scheduler/rescheduling.py's rules."""
    excluded_owners: frozenset[str] = frozenset()
    """Owners that already hold a copy of this job (a fresh copy must come from someone else)."""
    priority: int = 0
    creation_index: int = 0
    """Submission order (e.g. creationTimestamp as a number): earlier is placed first."""
    attempt: int = 0
    expected_duration_s: float | None = None
    """The submitter's runtime estimate; None = unknown. Only weighs how much reliability and trust
    matter for this job (a crash late in a long job wastes more), never a limit."""
    pending_since: float | None = None
    """When this attempt started waiting for placement (same clock as `now`); None = unknown. Lets a
    large job that would need a verification copy wait a bounded time for a trusted node."""
    uid: str = ""
    """The AIJob's `metadata.uid`; "" = unknown, the key stands for it. The spot-check coin is drawn
    from it and the attempt: an AIJob re-created under the same name (a nightly job, a rerun after
    ResultRevoked) is another object, and must not draw the coin its predecessor drew."""

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("JobRequest.key must not be empty")
        # One comparison also refuses NaN and inf, and takes an int of any size (math.isfinite raised
        # OverflowError for one beyond float).
        if self.expected_duration_s is not None and not 0 < self.expected_duration_s <= MAX_EXPECTED_DURATION_S:
            raise ValueError(
                f"{self.key}: expected duration (spec.expectedDurationSeconds) must be a number of seconds"
                f" > 0 and <= {MAX_EXPECTED_DURATION_S:g}, got {self.expected_duration_s}"
            )
        if self.replicas < 1:
            raise ValueError(f"{self.key}: spec.replicas must be >= 1, got {self.replicas}")
        if self.gpus_per_replica < 0:
            raise ValueError(f"{self.key}: spec.resources.gpus must be >= 0, got {self.gpus_per_replica}")
        if self.gpu_memory_mib < 0:
            raise ValueError(f"{self.key}: spec.resources.gpuMemoryMiB must be >= 0, got {self.gpu_memory_mib}")
        if not (math.isfinite(self.cpus_per_replica) and self.cpus_per_replica >= 0):  # NaN passed `< 0`
            raise ValueError(f"{self.key}: spec.resources.cpus must be >= 0, got {self.cpus_per_replica}")
        if not 0.0 <= self.min_reputation <= 1.0:
            raise ValueError(
                f"{self.key}: spec.constraints.minReputation must be within 0..1, got {self.min_reputation}"
            )
        if self.max_latency_ms is not None and not self.max_latency_ms >= 0:
            raise ValueError(f"{self.key}: spec.constraints.maxLatencyMs must be >= 0, got {self.max_latency_ms}")
        if self.pending_since is not None and not math.isfinite(self.pending_since):
            raise ValueError(f"{self.key}: pending_since must be a finite time, got {self.pending_since}")
        if self.verification_quorum < 1:
            raise ValueError(f"{self.key}: spec.verification.quorum must be >= 1, got {self.verification_quorum}")
        if self.least_copies < 1:
            raise ValueError(f"{self.key}: least_copies must be >= 1, got {self.least_copies}")


@dataclass(frozen=True, slots=True)
class Placement:
    """Nodes chosen for a job: `copies` groups of `replicas` nodes, copy-major order."""

    job_key: str
    nodes: tuple[str, ...]
    copies: int = 1


@dataclass(frozen=True, slots=True)
class Unschedulable:
    """Why a job was not placed: each node counted once, under the first filter it failed."""

    job_key: str
    reasons: dict[str, int]
    message: str


@dataclass(frozen=True, slots=True)
class SchedulingResult:
    placements: tuple[Placement, ...] = ()
    unschedulable: tuple[Unschedulable, ...] = field(default_factory=tuple)
