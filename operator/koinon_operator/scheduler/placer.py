"""The scheduling function: filter, score, place; one engine shared by Koinon and the baselines.

`schedule(jobs, nodes, now, config)` is the Koinon policy as a pure function. Every policy goes
through the same hard filters and capacity accounting (`_run`); they differ only in how they pick
among the nodes that fit (`candidates.Policy`) and in whether they plan verification copies.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from typing import Protocol

import numpy as np

from .candidates import HighestValue, NodeValues, Policy, candidates
from .config import DEFAULT_CONFIG, SchedulerConfig
from .index import (
    BoolArray,
    FloatArray,
    NodeIndex,
    Positions,
    build_index,
    explain,
    reasons_message,
    reserve_for,
    static_mask,
)
from .types import JobRequest, NodeSnapshot, Placement, SchedulingResult, Unschedulable
from .verification import TrustRecord, plan_replication, skip_probability, stable_seed


class Placer(Protocol):
    name: str

    def place(self, jobs: Sequence[JobRequest], nodes: Sequence[NodeSnapshot], now: float) -> SchedulingResult: ...


def expected_hours(job: JobRequest, cfg: SchedulerConfig) -> float:
    """The job's expected run time on the reference GPU, in hours (the configured default if unknown)."""
    duration = job.expected_duration_s if job.expected_duration_s is not None else cfg.scoring.default_duration_s
    return duration / 3600.0


def best_score(cfg: SchedulerConfig) -> HighestValue:
    """Koinon: highest reputation lower bound, least latency and load, best GPU fit, plus two terms
    in GPU-hours that grow with the job: the work a crash is expected to waste on this node, and the
    second copy a BOINC-trusted node saves (ties: first node by name)."""
    sc = cfg.scoring
    skip = cfg.verification.max_skip_probability

    def key(job: JobRequest) -> Hashable:
        # Everything `values` reads from the job.
        return ("koinon", job.gpu_memory_mib, job.gpus_per_replica, expected_hours(job, cfg))

    def values(index: NodeIndex, job: JobRequest) -> NodeValues:
        memory, needed = job.gpu_memory_mib, job.gpus_per_replica
        hours = expected_hours(job, cfg)
        gpus = max(needed, 1)
        unit = sc.large_job_gpu_hours
        size = min(gpus * hours / unit, 1.0)
        trust = sc.trusted_weight * skip * gpus * hours / unit - (1.0 - size) * sc.trusted_reserve_weight

        # Hours on each node are hours / speed (the estimate is for the reference GPU). A crash at
        # a uniform point loses half the run on average and the rerun starts from scratch, so the
        # expected loss is crashRate * nodeHours^2 / 2 (per-node factors precomputed in the index).
        crash_loss = sc.reliability_weight * gpus * hours * hours / 2.0 / unit
        # Terms that placements do not change, once per call; only the load and fit terms are
        # recomputed for the nodes a placement changed.
        runtime = index.memo(("runtime", hours), lambda: (sc.runtime_weight * hours) * index.inverse_speed)
        crash = index.memo(("crash", crash_loss), lambda: crash_loss * index.crash_rate_per_speed2)
        trusted = index.memo(("trusted", trust), lambda: trust * index.trusted) if trust else None
        # x * pw / 8 == x * (pw / 8) exactly: dividing by 8 only changes the exponent.
        packing = index.packing_weight / 8.0

        def scores(at: Positions) -> FloatArray:
            # score - leftover * packing - runtime - crash (+ trusted), in this order, in place: each
            # new array of the fleet's size costs more than the arithmetic on it.
            leftover = np.subtract(index.fit_count(memory)[at], index.busy_gpus[at])
            leftover -= needed
            values: FloatArray = np.multiply(leftover, packing)
            np.subtract(index.score[at], values, out=values)
            np.subtract(values, runtime[at], out=values)
            np.subtract(values, crash[at], out=values)
            if trusted is not None:
                np.add(values, trusted[at], out=values)
            return values

        return scores

    return HighestValue(key, values)


_DEFAULT_POLICY = best_score(DEFAULT_CONFIG)


WAITING_FOR_TRUSTED = "not trusted yet (a large replicated job waits a while for a trusted node)"


def waits_for_trusted(job: JobRequest, now: float, cfg: SchedulerConfig) -> bool:
    """A replicated job of at least `trusted_wait_gpu_hours` that has waited less than
    `trusted_wait_s` is placed only on trusted nodes (where it usually runs once)."""
    vc = cfg.verification
    if job.verification_quorum <= 1 or job.pending_since is None or now - job.pending_since >= vc.trusted_wait_s:
        return False
    return job.replicas * max(job.gpus_per_replica, 1) * expected_hours(job, cfg) >= vc.trusted_wait_gpu_hours


def _hold_trusted_for(index: NodeIndex, job: JobRequest, static: BoolArray) -> None:
    """Hold, for a multi-GPU job waiting for trusted nodes, the trusted nodes closest to fitting its
    replicas, so that smaller jobs do not keep taking the nodes it waits for as they drain (it would
    then wait out its whole `trusted_wait_s` and run twice on untrusted ones). Only trusted ones:
    it takes no untrusted node before its wait ends, so holding those would idle them and refuse
    the small jobs that fit there meanwhile. Only its replicas' worth: on trusted nodes its
    verification copy is usually skipped, and one that is not may go to any node."""
    reserve_for(index, job, static & index.trusted, job.replicas)


def _ordered(jobs: Sequence[JobRequest]) -> list[JobRequest]:
    ordered = sorted(jobs, key=lambda j: (-j.priority, j.creation_index, j.key))
    for a, b in itertools.pairwise(ordered):
        if a.key == b.key:
            raise ValueError(f"pending jobs must have unique keys; {a.key!r} appears twice")
    return ordered


def _run(
    jobs: Sequence[JobRequest],
    nodes: Sequence[NodeSnapshot],
    now: float,
    cfg: SchedulerConfig,
    policy: Policy,
    verify: bool,
) -> SchedulingResult:
    """Shared engine. `verify` = Koinon behaviour: plan verification copies and keep quarantined
    nodes out; the baselines run with it off (one copy, no reputation floor of their own)."""
    quarantine = cfg.scoring.quarantine_below if verify else None
    index = build_index(nodes, now, cfg)
    placements: list[Placement] = []
    unschedulable: list[Unschedulable] = []
    static_cache: dict[tuple[object, ...], BoolArray] = {}
    # Capacity only shrinks during a call, so a shape that found no primary nodes stays unplaceable
    # for the rest of the call. Its reasons are computed once, at its first failure (an O(nodes)
    # pass), and shared by the later jobs of that shape in this call.
    failed_shapes: dict[tuple[object, ...], dict[str, int]] = {}

    def refuse(job: JobRequest, reasons: dict[str, int]) -> None:
        unschedulable.append(Unschedulable(job.key, reasons, reasons_message(reasons, index.size)))

    for job in _ordered(jobs):
        # What the job needs distinct owners for: all its copies' nodes (64 replicas x quorum 9 need
        # 576, not the 64 its first copy takes; a trusted node's skip of the others is a draw).
        copies_needed = job.verification_quorum if verify else 1
        signature = (
            job.gpus_per_replica,
            job.gpu_memory_mib,
            job.min_reputation,
            job.max_latency_ms,
            job.regions,
        )
        shape = None
        if not job.excluded_nodes and not job.excluded_owners:
            shape = (*signature, job.cpus_per_replica, job.replicas, copies_needed)
            failed = failed_shapes.get(shape)
            if failed is not None:
                refuse(job, failed)
                continue
        static = static_cache.get(signature)
        if static is None:
            static = static_cache[signature] = static_mask(index, job, quarantine)
        nodes_left = candidates(index, job, static, policy)
        waiting = verify and waits_for_trusted(job, now, cfg)
        primary = nodes_left.pick(job.replicas, trusted_only=waiting)
        # Waiting is for trust only where untrusted nodes could take the job now: else nothing
        # fits, and the reasons below say why (not "not trusted yet", for 30 minutes).
        untrusted_fit = 0
        if primary is None and waiting and nodes_left.pick(job.replicas) is not None:
            untrusted_fit = nodes_left.count()
        if untrusted_fit:
            # Untrusted nodes fit, but the job would run twice there: it waits (bounded).
            refuse(job, {WAITING_FOR_TRUSTED: untrusted_fit})
            if job.gpus_per_replica > 1:
                _hold_trusted_for(index, job, static)
            continue
        if primary is None:
            reasons = explain(index, job, copies_needed, quarantine)
            if shape is not None:
                failed_shapes[shape] = reasons
            refuse(job, reasons)
            if verify and job.gpus_per_replica > 1:
                # Koinon holds nodes for the oldest waiting multi-GPU job (no starvation of 8-GPU jobs
                # by a stream of 1-GPU ones); naive baselines do not.
                if waiting:
                    _hold_trusted_for(index, job, static)
                else:
                    reserve_for(index, job, static, job.replicas * job.verification_quorum)
            continue
        copies = 1
        chosen = primary
        if verify and job.verification_quorum > 1:
            record = TrustRecord(
                consecutive_valid=min(int(index.consecutive_valid[i]) for i in primary),
                owner_disagreements=max(float(index.owner_disagreements[i]) for i in primary),
            )
            copies = job.verification_quorum
            # An earlier attempt's check stands: no coin is drawn below it (JobRequest.least_copies).
            least = min(job.least_copies, copies)
            if least < copies and skip_probability(record, cfg.verification) > 0.0:  # else the coin cannot matter
                # Keyed: the node can learn the uid and attempt (its submission id, env), not the key.
                # The uid, not the name: a job re-created under the same name must draw afresh
                # (by name, one that skipped verification once would skip it every time). Without
                # a uid (the simulator, whose keys are unique) the key stands for it.
                seed = stable_seed(job.uid or job.key, job.attempt, key=cfg.verification.seed_key)
                copies = max(plan_replication(copies, record, seed, cfg.verification), least)
            if copies > 1:
                extra = None
                if cfg.verification.trusted_partner and not bool(index.trusted[primary].all()):
                    # Pairing rule: an untrusted primary is checked by trusted nodes when they fit.
                    extra = nodes_left.pick((copies - 1) * job.replicas, trusted_only=True, after=primary)
                if extra is None:
                    extra = nodes_left.pick((copies - 1) * job.replicas, after=primary)
                if extra is None:
                    refuse(job, explain(index, job, copies, quarantine))
                    if job.gpus_per_replica > 1:
                        reserve_for(index, job, static, copies * job.replicas)
                    continue
                chosen = primary + extra
        index.consume(chosen, job.gpus_per_replica, job.cpus_per_replica)
        placements.append(Placement(job.key, tuple(index.names[i] for i in chosen), copies))
    return SchedulingResult(tuple(placements), tuple(unschedulable))


def schedule(
    jobs: Sequence[JobRequest],
    nodes: Sequence[NodeSnapshot],
    now: float,
    config: SchedulerConfig = DEFAULT_CONFIG,
) -> SchedulingResult:
    """Koinon placement: pure and deterministic; independent of the order of `jobs` and `nodes`.

    Jobs are placed by (priority desc, creation order, key). Each replica (and each verification
    copy) goes to a node of a distinct owner that passes every filter with the capacity left after
    earlier placements of this call; the node with the best score wins.
    """
    policy = _DEFAULT_POLICY if config == DEFAULT_CONFIG else best_score(config)
    return _run(jobs, nodes, now, config, policy, verify=True)


class KoinonPlacer:
    """The Koinon policy behind the `Placer` protocol."""

    name = "koinon"

    def __init__(self, config: SchedulerConfig = DEFAULT_CONFIG) -> None:
        self.config = config

    def place(self, jobs: Sequence[JobRequest], nodes: Sequence[NodeSnapshot], now: float) -> SchedulingResult:
        return schedule(jobs, nodes, now, self.config)
