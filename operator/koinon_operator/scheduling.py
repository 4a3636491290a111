"""The reputation- and latency-aware scheduler behind the operator's ``Placer`` interface.

Maps the operator's capacity snapshots to the scheduler core's types and back; the core stays a
pure function of its inputs (time included), so what runs here is what the simulator measured. The
operator places one AIJob per call (each job's own reconcile pass) where the simulator places every
pending job in one; so that a waiting multi-GPU job's hold on the nodes closest to fitting it lasts
as there, the waiting multi-GPU jobs placed before the one asked about are placed again in the same
call (only the job asked about is taken).

Each call converts the whole fleet; the conversion of a node whose capacity equals what it was in the
previous call is kept from that call (``_Converted``): the operator asks once per AIJob, against
thousands of volunteers of which few changed in between.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from koinon_operator.placement import NodeCapacity, PlacementDecision, PlacementRequest
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    MAX_EXPECTED_DURATION_S,
    Gpu,
    JobRequest,
    KoinonPlacer,
    NodeSnapshot,
    SchedulerConfig,
    ScoringConfig,
    from_status,
)
from koinon_operator.scheduler.speed import gpu_speed


def gpu_models(node: NodeCapacity, scoring: ScoringConfig = DEFAULT_CONFIG.scoring) -> tuple[str, ...]:
    """The model of each GPU the node is booked for (``gpus_total``, Ray's count, what can be placed),
    from those its VolunteerNode lists (``gpu_models``, as inventory.build_capacity counts them).

    As many listed as booked: each GPU its own. More listed (Ray counts fewer, e.g. a volunteer that
    joined with two GPUs and now registers one): which of them Ray's GPUs are is unknown, so each is
    taken to be the slowest listed, by `scoring`'s speed table, as its memory is the least listed;
    a swapped-in slower GPU is never scored as the faster one it joined with. A model the table
    lacks counts at ``unknown_gpu_speed``, the speed it has when the counts match (a node is as fast
    as its slowest GPU), so the node is never scored faster than all it lists would make it.
    Fewer listed (a bare Ray worker lists none; build_capacity books a volunteer for no more than it
    lists): "unknown", the neutral speed, as no model can be matched to the GPUs beyond the list."""
    listed, count = node.gpu_models, max(node.gpus_total, 0)  # a hand-built negative count: no GPUs
    if len(listed) == count:
        return listed
    if len(listed) > count:
        slowest = min(listed, key=lambda model: gpu_speed(model, scoring.gpu_speeds, scoring.unknown_gpu_speed))
        return (slowest,) * count
    return ("unknown",) * count


def to_snapshot(node: NodeCapacity, scoring: ScoringConfig = DEFAULT_CONFIG.scoring) -> NodeSnapshot:
    gpus = tuple(Gpu(model, node.gpu_memory_mib) for model in gpu_models(node, scoring))
    return NodeSnapshot(
        name=node.name,
        owner=node.owner or node.name,
        region=node.region,
        ready=node.ready,
        cordoned=node.cordoned,
        gpus=gpus,
        free_gpus=max(0, min(node.gpus_free, node.gpus_total)),
        cpus_free=max(0.0, node.cpus_free),
        rtt_ms=node.latency_ms,
        rtt_updated_at=node.latency_updated_at,
        reputation=from_status(node.reputation_status),
        running_jobs=node.running_jobs,
        cpus_total=node.cpus_total,
    )


def to_job(request: PlacementRequest) -> JobRequest:
    return JobRequest(
        key=request.job_key,
        replicas=request.replicas,
        gpus_per_replica=request.gpus_per_replica,
        gpu_memory_mib=request.gpu_memory_mib,
        cpus_per_replica=request.cpus_per_replica,
        min_reputation=request.min_reputation,
        max_latency_ms=request.max_latency_ms,
        regions=frozenset(request.regions),
        verification_quorum=request.verification_quorum,
        least_copies=request.least_copies,
        excluded_nodes=request.excluded_nodes,
        excluded_owners=request.excluded_owners,
        attempt=request.attempt,
        creation_index=request.creation_index,
        pending_since=request.pending_since,
        # kube-apiserver holds spec.expectedDurationSeconds to int64, under the scheduler's bound;
        # clamped all the same, so that no spec the operator is handed makes placement raise.
        expected_duration_s=(
            None if request.expected_duration_s is None else min(request.expected_duration_s, MAX_EXPECTED_DURATION_S)
        ),
        uid=request.uid,
    )


# A job that found no room is placed with the others for this long after it last asked: every
# pending AIJob asks again each poll, so one deleted, suspended or placed elsewhere stops holding
# nodes for others soon after (the operator passes at least three poll intervals).
WAITING_FOR_S = 120.0
# CPUs an idle node is taken to have (NodeCapacity knows only what is free).
IDLE_CPUS = 1e9


def _order(job: JobRequest) -> tuple[int, int, str]:
    """The scheduler's placing order (scheduler.placer: priority first, then the oldest)."""
    return (-job.priority, job.creation_index, job.key)


def spot_check_key(submission_key: bytes) -> bytes:
    """The spot-check coin's key, derived from the operator's submission key (its Secret: every
    replica and restart reads the same, handlers.configure), so every operator that places an
    attempt of a job draws the same coin for it. A pass acting on a body older than the write that
    placed the attempt places it again (reconciler.keyed_submission_nonce): with a coin of its own
    it could draw fewer copies than the first placement submitted, dropping the check. A key of its
    own, not the submission key itself: submission ids show HMACs of ``uid|attempt`` under that
    one, and this input, without a ``|``, is none of them."""
    return hmac.new(submission_key, b"spot-check-coin", hashlib.sha256).digest()


def with_seed_key(config: SchedulerConfig, seed_key: bytes | None) -> SchedulerConfig:
    """`config` whose skip coin is keyed with `seed_key` (None: a random key)."""
    key = secrets.token_bytes(32) if seed_key is None else seed_key
    return replace(config, verification=replace(config.verification, seed_key=key))


@dataclass(slots=True)
class _Converted:
    """One node's conversion, kept for the next call while its capacity stays equal.

    `to_snapshot` reads nothing but the capacity (and the placer's fixed scoring config), and a
    snapshot holds no time-dependent value: reputation decay and RTT staleness are computed from
    each call's ``now`` when the scheduler indexes the snapshots. So a node whose capacity equals
    `capacity` converts to `snapshot`, whenever it is asked. Equal as Python compares values: a
    number given as another type of the same value (1, 1.0) makes the same index columns; a status
    count given as a bool (True == 1), which `to_snapshot` refuses, could be served the snapshot of
    the number it equals. The operator never passes such a status (inventory.unreadable_status
    drops it before placement)."""

    capacity: NodeCapacity
    """The capacity converted, its reputation status copied: a status dict changed in place after
    the call must not compare equal to the copy of what was converted."""
    snapshot: NodeSnapshot
    idle: NodeSnapshot | None = None
    """The node as if idle (`_fits_an_idle_fleet`), made when first needed."""


def _converted(node: NodeCapacity, scoring: ScoringConfig) -> _Converted:
    snapshot = to_snapshot(node, scoring)  # first: a status it refuses is never kept
    status = node.reputation_status
    # Deep: a nested part (the evidence) changed in place must not compare equal either.
    kept = node if status is None else replace(node, reputation_status=copy.deepcopy(dict(status)))
    return _Converted(kept, snapshot)


class ReputationPlacer:
    """Operator ``Placer`` backed by the Koinon scheduling policy.

    The skip coin of adaptive replication is keyed with `seed_key`, secret: a volunteer can learn
    the job's uid and attempt it is hashed from (its Ray submission id, its driver's env), so with
    the key it could learn it would tell when its copy is the only one. The uid, not the name: an
    AIJob re-created under the same name draws afresh. The operator passes spot_check_key of its
    Secret (handlers.configure): every replica, before and after a restart, draws the same coin
    for an attempt, so one that places an attempt again from a body older than the placing write
    (a new leader whose watch is behind) draws the copies the first placement submitted. Without
    one (tests, the simulator) a random key of this process, kept nowhere: the coin is drawn when an
    attempt is placed and its copies are recorded in the AIJob's status then (a restarted operator
    follows them and never draws again), but an attempt placed twice could draw twice."""

    def __init__(
        self,
        config: SchedulerConfig = DEFAULT_CONFIG,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        waiting_for_s: float = WAITING_FOR_S,
        seed_key: bytes | None = None,
    ) -> None:
        self._placer = KoinonPlacer(with_seed_key(config, seed_key))
        self._scoring = config.scoring  # its speed table reads the models of a node listing more GPUs than Ray
        self._clock = clock  # the scheduler's notion of now (wall time, as in VolunteerNode status)
        self._monotonic = monotonic  # how long ago a waiting job last asked: immune to clock steps
        self._waiting_for_s = waiting_for_s
        self._waiting: dict[str, tuple[JobRequest, float]] = {}  # job key -> (request, last asked)
        # Node name -> its conversion in the last call (only the nodes of that call: bounded by the fleet).
        self._converted: dict[str, _Converted] = {}

    def forget_waiting(self) -> None:
        self._waiting.clear()

    def place(self, request: PlacementRequest, nodes: Sequence[NodeCapacity]) -> PlacementDecision:
        now, asked = self._clock(), self._monotonic()
        job = to_job(request)
        self._waiting = {k: e for k, e in self._waiting.items() if asked - e[1] <= self._waiting_for_s}
        self._waiting.pop(job.key, None)
        if not nodes:
            return PlacementDecision(total_nodes=0)
        by_name = {node.name: node for node in nodes}
        converted = self._convert(nodes)
        snapshots = [c.snapshot for c in converted]
        # Only waiting multi-GPU jobs placed before this one (the scheduler's order) can hold nodes
        # for themselves or take room from it: the batch stays small however many jobs wait.
        ahead = [w for w, _ in self._waiting.values() if w.gpus_per_replica > 1 and _order(w) < _order(job)]
        result = self._placer.place([job, *ahead], snapshots, now)
        placement = next((p for p in result.placements if p.job_key == job.key), None)
        if placement is not None:
            chosen = tuple(by_name[name] for name in placement.nodes)
            return PlacementDecision(nodes=chosen, total_nodes=len(nodes), copies=placement.copies)
        if job.gpus_per_replica > 1 and self._fits_an_idle_fleet(job, converted, now):
            # Waiting for room that will come: it holds nodes for itself in later jobs' calls. One
            # that could not run even on an idle fleet (too few owners, say) would hold them for good.
            self._waiting[job.key] = (job, asked)
        mine = next((u for u in result.unschedulable if u.job_key == job.key), None)
        return PlacementDecision(reasons=dict(mine.reasons) if mine else {}, total_nodes=len(nodes))

    def _convert(self, nodes: Sequence[NodeCapacity]) -> list[_Converted]:
        """Each node's conversion, in order: the last call's where its capacity is equal (compared by
        value: inventory.build_capacity hands out the last call's object for a node whose capacity
        did not change and a new one for each that did, but any caller may build them afresh), else
        a new one."""
        previous, current, out = self._converted, {}, []
        for node in nodes:
            entry = previous.get(node.name)
            if entry is None or entry.capacity != node:
                entry = _converted(node, self._scoring)
            current[node.name] = entry
            out.append(entry)
        self._converted = current
        return out

    def _fits_an_idle_fleet(self, job: JobRequest, converted: Sequence[_Converted], now: float) -> bool:
        idle = []
        for entry in converted:
            if entry.idle is None:
                # An idle node has all its CPUs (Ray's total; unknown: unlimited): a job that wants
                # more than any node has can never run, and must not hold nodes for itself.
                cpus = entry.capacity.cpus_total
                total = IDLE_CPUS if cpus is None else max(0.0, cpus)
                snapshot = entry.snapshot
                entry.idle = replace(snapshot, free_gpus=len(snapshot.gpus), running_jobs=0, cpus_free=total)
            idle.append(entry.idle)
        return any(p.job_key == job.key for p in self._placer.place([job], idle, now).placements)
