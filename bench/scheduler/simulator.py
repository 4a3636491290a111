"""Discrete-event simulation of a volunteer fleet driving the real scheduler code.

Every policy sees the same volunteers and the same job stream (drawn from the seed); the node
behaviour that depends on chance (RTT jitter, crashes, churn, lies) comes from one generator per
policy seeded identically. The simulator calls the policy's `place(jobs, snapshots, now)` once per
tick with every pending job (up to `max_batch`), and uses the scheduler's own pure functions for
RTT smoothing, reputation updates, quorum decisions and failover.

Work is counted in reference GPU-hours (GPU-hours on an RTX 4090-class GPU, speed 1.0): an hour on
a GPU of speed s is s reference hours, so a fast and a slow node doing the same job cost the same.

Metrics (per policy, over the measured jobs; the warm-up stream before them is not counted):
- correct_rate: accepted results whose digest is the true one / accepted results.
- completion: submit -> accepted result, including queueing, failovers and verification copies.
- replication_overhead: work of executions that ran to the end (every verification copy, results
  rejected by a quorum, reruns of revoked results) / work of one execution per accepted job. A
  policy that runs each job once has 1.0.
- crash_loss_overhead: work lost to crashes and to nodes that left mid-job / the same useful work.
- wasted_gpu_hours: all work executed minus one execution per accepted job (both kinds of loss).
Baselines run one copy per job and accept the first result that comes back, as a naive system does.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    Accepted,
    JobAttemptState,
    JobRequest,
    NodeResult,
    NodeSnapshot,
    Placer,
    ReputationEvidence,
    Reschedule,
    Revoke,
    RttEstimate,
    apply_quorum_outcome,
    decide_quorum,
    observe_rtt,
    on_node_lost,
    recheck_accepted,
    record_failure,
    record_heartbeats,
    record_success,
    record_timeout,
    record_work,
)

from .params import SimParams
from .population import FASTEST_GPU_SPEED, JobSpec, Volunteer, VolunteerFactory, job_stream

ARRIVE, TICK, DONE, CRASH, DOWN, UP, REQUEUE = range(7)
TRUE_DIGEST = "ok"


@dataclass(slots=True)
class SimNode:
    v: Volunteer
    online: bool = True
    free_gpus: int = 0
    cpus_free: float = 0.0
    evidence: ReputationEvidence = field(default_factory=ReputationEvidence)
    rtt: RttEstimate | None = None
    running: set[int] = field(default_factory=set)
    results_returned: int = 0
    generation: int = 0
    since: float = 0.0
    snapshot: NodeSnapshot | None = None


@dataclass(slots=True)
class Execution:
    job: int
    node: str
    owner: str
    start: float
    end: float
    gpus: int
    speed: float
    """The node's true speed: GPU-seconds here are worth `speed` reference GPU-seconds of work."""
    live: bool = True


@dataclass(slots=True)
class SimJob:
    spec: JobSpec
    quorum: int
    planned: int = 0
    placements: int = 0
    running: set[int] = field(default_factory=set)
    results: dict[str, NodeResult] = field(default_factory=dict)
    result_exec: dict[str, int] = field(default_factory=dict)
    excluded: frozenset[str] = frozenset()
    missing: int = 0
    """Copies to (re)place: lost ones after their loss is detected, or extra ones for a tie."""
    awaiting_detection: int = 0
    """Copies lost whose loss the control plane has not noticed yet."""
    done: bool = False
    gave_up: bool = False
    vouchers: dict[str, NodeResult] = field(default_factory=dict)
    """Nodes whose results the accepted digest stands on (for retroactive invalidation)."""
    credited: set[str] = field(default_factory=set)
    """Nodes whose agreement on this job has already been recorded (a kept vote is not paid twice)."""
    banned_owners: set[str] = field(default_factory=set)
    pending_since: float = 0.0
    """When the current attempt started waiting for placement."""
    """Owners caught lying since the job was first accepted: no copy goes to them again."""


class Simulation:
    def __init__(self, params: SimParams, placer: Placer, verify: bool) -> None:
        self.p = params
        self.placer = placer
        self.verify = verify
        self.cfg = getattr(placer, "config", DEFAULT_CONFIG)  # the policy's own weights and limits
        pop_rng = np.random.default_rng(params.seed)
        self.factory = VolunteerFactory(params, pop_rng)
        volunteers = self.factory.initial()
        self.specs = job_stream(params, pop_rng)
        # Separate streams so churn and RTT jitter are identical for every policy; only crashes and
        # lies (which depend on what runs where) come from the per-policy execution stream.
        self.rng = np.random.default_rng(params.seed + 1)
        self.churn_rng = np.random.default_rng(params.seed + 2)
        self.rtt_rng = np.random.default_rng(params.seed + 3)
        self.factory.rng = np.random.default_rng(params.seed + 4)
        self.departed: dict[str, Volunteer] = {}
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self.events: list[tuple[float, int, int, int, str]] = []
        self.seq = 0
        self.execs: list[Execution] = []
        self.jobs: dict[int, SimJob] = {}
        self.pending: dict[int, JobRequest] = {}
        self.job_work: dict[tuple[int, str], float] = {}
        """Reference GPU-seconds executed per (job, how the execution ended: finished, crashed,
        lost, cancelled)."""
        # job -> (completion_s, correct, gpu_s of one copy, verified by a quorum); the final acceptance
        # counts, so a revoked job counts when (and if) its rerun is accepted.
        self.accepted: dict[int, tuple[float, bool, float, bool]] = {}
        self.revocation = verify
        """Koinon invalidates results vouched for by an owner caught lying; a naive system cannot."""
        self.vouched: dict[str, set[int]] = {}
        """owner -> accepted jobs whose result stands on that owner's vote."""
        self.caught_owners: set[str] = set()
        self.revoked = 0
        self.revoked_wrong = 0
        self.scheduler_s = 0.0
        self.scheduler_calls = 0
        self.tick_no = 0
        self.gave_up = 0
        for v in volunteers:
            self._join(v, 0.0)
        for spec in self.specs:
            self._push(spec.submit_s, ARRIVE, spec.index)
        self._push(0.0, TICK)

    # --- event plumbing -------------------------------------------------------------------------

    def _push(self, t: float, kind: int, a: int = 0, b: str = "") -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a, b))

    def _exp(self, rate_per_s: float, rng: np.random.Generator | None = None) -> float:
        if rate_per_s <= 0:
            return math.inf
        return float((rng or self.rng).exponential(1.0 / rate_per_s))

    def _join(self, v: Volunteer, now: float) -> None:
        node = SimNode(v=v, free_gpus=len(v.gpus), cpus_free=v.cpus, since=now)
        self.nodes[v.name] = node
        self._go_online(node, now)

    def _go_online(self, node: SimNode, now: float) -> None:
        node.online = True
        node.generation += 1
        node.since = now
        node.free_gpus = len(node.v.gpus)
        node.cpus_free = node.v.cpus
        node.snapshot = None
        self._push(now + self._exp(self.p.churn_per_h / 3600.0, self.churn_rng), DOWN, node.generation, node.v.name)

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        horizon = self.p.horizon_h * 3600.0
        handlers = {
            ARRIVE: self._on_arrive,
            TICK: self._on_tick,
            DONE: self._on_done,
            CRASH: self._on_crash,
            DOWN: self._on_down,
            UP: self._on_up,
            REQUEUE: self._on_requeue,
        }
        while self.events:
            t, _, kind, a, b = heapq.heappop(self.events)
            if t > horizon:
                break
            self.now = t
            handlers[kind](t, a, b)
            if kind == TICK and len(self.accepted) + self.gave_up == len(self.specs) and not self.pending:
                break
        return self._metrics()

    def _on_arrive(self, now: float, index: int, _: str) -> None:
        spec = self.specs[index]
        self.jobs[index] = job = SimJob(spec, self.p.verification_quorum if self.verify else 1, pending_since=now)
        self.pending[index] = self._request(job, replicas=1, quorum=job.quorum, owners=frozenset())

    def _request(self, job: SimJob, replicas: int, quorum: int, owners: frozenset[str]) -> JobRequest:
        s = job.spec
        return JobRequest(
            key=f"default/job-{s.index:06d}",
            replicas=replicas,
            gpus_per_replica=s.gpus,
            gpu_memory_mib=s.memory_mib,
            cpus_per_replica=2.0 * s.gpus,
            min_reputation=s.min_reputation,
            max_latency_ms=s.max_latency_ms,
            regions=s.regions,
            verification_quorum=quorum,
            excluded_nodes=job.excluded,
            excluded_owners=owners,
            creation_index=s.index,
            attempt=job.placements,
            expected_duration_s=s.duration_estimate_s,
            pending_since=job.pending_since,
        )

    def _on_requeue(self, now: float, index: int, _: str) -> None:
        job = self.jobs[index]
        job.awaiting_detection -= 1
        if job.done or job.gave_up:
            return
        if job.planned <= 1:
            # The only copy was lost: plan afresh (a new replication coin for a new placement).
            job.results.clear()
            job.result_exec.clear()
            self._place_afresh(job, now, frozenset())
        else:
            job.missing += 1
            self._request_missing(job)

    def _place_afresh(self, job: SimJob, now: float, owners: frozenset[str]) -> None:
        """Pending again as a new attempt (not on `owners`): the scheduler plans its copies."""
        job.missing = 0
        job.pending_since = now
        self.pending[job.spec.index] = self._request(job, 1, job.quorum, owners)

    def _request_missing(self, job: SimJob) -> None:
        self.pending[job.spec.index] = self._request(job, job.missing, 1, self._owners_holding(job))

    def _owners_holding(self, job: SimJob) -> frozenset[str]:
        owners = {r.owner for r in job.results.values()}
        owners.update(self.execs[e].owner for e in job.running)
        owners.update(job.banned_owners)
        return frozenset(owners)

    def _snapshot(self, node: SimNode) -> NodeSnapshot:
        if node.snapshot is None:
            node.snapshot = NodeSnapshot(
                name=node.v.name,
                owner=node.v.owner,
                region=node.v.region,
                ready=node.online,
                cordoned=False,
                gpus=node.v.gpus,
                free_gpus=node.free_gpus if node.online else 0,
                cpus_free=node.cpus_free if node.online else 0.0,
                rtt_ms=node.rtt.smoothed_ms if node.rtt else None,
                rtt_updated_at=node.rtt.updated_at if node.rtt else None,
                reputation=node.evidence,
                running_jobs=len(node.running),
                cpus_total=node.v.cpus,
            )
        return node.snapshot

    def _probe_rtts(self, now: float) -> None:
        """Staggered heartbeat RTT samples: each online node is probed every `rtt_probe_every_s`."""
        groups = max(1, round(self.p.rtt_probe_every_s / self.p.tick_s))
        lat = self.cfg.latency
        for i, node in enumerate(self.nodes.values()):
            if node.online and (i + self.tick_no) % groups == 0:
                sample = node.v.base_rtt_ms * float(self.rtt_rng.lognormal(0.0, 0.15))
                node.rtt = observe_rtt(node.rtt, sample, now, lat)
                node.snapshot = None

    def _on_tick(self, now: float, _: int, __: str) -> None:
        self._probe_rtts(now)
        self.tick_no += 1
        self._push(now + self.p.tick_s, TICK)
        if not self.pending:
            return
        batch = list(self.pending.values())[: self.p.max_batch]
        snapshots = [self._snapshot(n) for n in self.nodes.values()]
        started = time.perf_counter()
        result = self.placer.place(batch, snapshots, now)
        self.scheduler_s += time.perf_counter() - started
        self.scheduler_calls += 1
        for placement in result.placements:
            index = int(placement.job_key.rsplit("-", 1)[1])
            job = self.jobs[index]
            request = self.pending.pop(index)
            if request.verification_quorum > 1:
                job.planned = placement.copies
            elif job.planned == 0:
                job.planned = 1
            job.missing = 0
            job.placements += 1
            for name in placement.nodes:
                self._start(job, self.nodes[name], now)

    def _start(self, job: SimJob, node: SimNode, now: float) -> None:
        s = job.spec
        rtt_s = node.v.base_rtt_ms / 1000.0
        duration = s.compute_s / node.v.speed + s.syncs * rtt_s
        hazard = -math.log(node.v.reliability) / 3600.0
        crash_after = self._exp(hazard)
        exec_id = len(self.execs)
        self.execs.append(Execution(s.index, node.v.name, node.v.owner, now, now + duration, s.gpus, node.v.speed))
        job.running.add(exec_id)
        node.running.add(exec_id)
        node.free_gpus -= s.gpus
        node.cpus_free -= 2.0 * s.gpus
        node.snapshot = None
        if node.free_gpus < 0 or node.cpus_free < -1e-9:
            raise AssertionError(f"{self.placer.name} over-committed {node.v.name}")
        if crash_after < duration:
            self._push(now + crash_after, CRASH, exec_id)
        else:
            self._push(now + duration, DONE, exec_id)

    def _stop(self, exec_id: int, now: float, outcome: str) -> tuple[Execution, SimNode, SimJob]:
        ex = self.execs[exec_id]
        ex.live = False
        work = ex.gpus * (now - ex.start) * ex.speed
        key = (ex.job, outcome)
        self.job_work[key] = self.job_work.get(key, 0.0) + work
        node = self.nodes[ex.node]
        node.evidence = record_work(node.evidence, now, self.cfg.reputation, (now - ex.start) / 3600.0)
        node.running.discard(exec_id)
        if node.online:
            node.free_gpus += ex.gpus
            node.cpus_free += 2.0 * ex.gpus
        node.snapshot = None
        job = self.jobs[ex.job]
        job.running.discard(exec_id)
        return ex, node, job

    def _digest(self, node: SimNode, job: SimJob) -> str:
        v = node.v
        node.results_returned += 1
        lying = v.kind == "liar" or (v.kind == "sleeper" and node.results_returned > v.sleeper_after)
        if lying and self.rng.random() < v.lie_probability:
            return "bad" if self.p.colluding else f"bad-{v.name}"
        return TRUE_DIGEST

    def _on_done(self, now: float, exec_id: int, _: str) -> None:
        ex = self.execs[exec_id]
        if not ex.live:
            return
        ex, node, job = self._stop(exec_id, now, "finished")
        if job.done or job.gave_up:
            return
        digest = self._digest(node, job)
        job.results[ex.node] = NodeResult(ex.owner, digest)
        job.result_exec[ex.node] = exec_id
        rc = self.cfg.reputation
        if job.planned <= 1:
            node.evidence = record_success(node.evidence, now, rc)
            self._accept(job, now, digest, exec_id, {ex.node: job.results[ex.node]})
            return
        if job.running or job.missing or job.awaiting_detection:
            return
        decision = decide_quorum(job.results, job.quorum)
        if isinstance(decision, Accepted):
            evidence = {n: self.nodes[n].evidence for n in job.results if n in self.nodes and n not in job.credited}
            job.credited.update(evidence)
            decision = Accepted(
                decision.digest,
                tuple(n for n in decision.agreeing if n in evidence),
                tuple(n for n in decision.disagreeing if n in evidence),
            )
            for name, ev in apply_quorum_outcome(evidence, decision, now, rc).items():
                self.nodes[name].evidence = ev
                self.nodes[name].snapshot = None
            first = job.result_exec[decision.agreeing[0]] if decision.agreeing else exec_id
            agreeing = {n: r for n, r in job.results.items() if r.digest == decision.digest}
            self._accept(job, now, decision.digest, first, agreeing)
            caught = {job.results[n].owner for n in decision.disagreeing}
            if caught and self.revocation:
                self._revoke_vouched_by(caught, now)
            return
        if len(job.results) + decision.more_copies > self.cfg.verification.max_copies:
            job.gave_up = True
            self.gave_up += 1
            return
        job.missing = decision.more_copies
        self._request_missing(job)

    def _accept(self, job: SimJob, now: float, digest: str, exec_id: int, vouchers: dict[str, NodeResult]) -> None:
        job.done = True
        ex = self.execs[exec_id]
        correct = digest == TRUE_DIGEST
        index = job.spec.index
        one_execution = ex.gpus * (ex.end - ex.start) * ex.speed
        self.accepted[index] = (now - job.spec.submit_s, correct, one_execution, job.planned >= 2)
        job.vouchers = vouchers
        for result in vouchers.values():
            self.vouched.setdefault(result.owner, set()).add(index)
        for other in list(job.running):  # copies still running are cancelled
            self._stop(other, now, "cancelled")
        self.pending.pop(index, None)

    def _revoke_vouched_by(self, caught: set[str], now: float) -> None:
        """Retroactive invalidation: rerun every accepted job whose result no longer stands once the
        votes of the caught owners are struck out (the scheduler's `recheck_accepted` decides)."""
        self.caught_owners |= caught
        for owner in sorted(caught):
            for index in sorted(self.vouched.pop(owner, set())):
                job = self.jobs[index]
                if not job.done:
                    continue
                action = recheck_accepted(job.vouchers, self.caught_owners, max(job.quorum, 2))
                if isinstance(action, Revoke):
                    self._revoke(job, action, now)

    def _revoke(self, job: SimJob, action: Revoke, now: float) -> None:
        index = job.spec.index
        _, correct, _, _ = self.accepted.pop(index)
        if job.spec.measured:  # as every figure: the warm-up stream's jobs are not counted
            self.revoked += 1
            self.revoked_wrong += not correct
        job.done = False
        job.banned_owners |= {r.owner for r in job.vouchers.values()} & self.caught_owners
        job.results = {n: job.results[n] for n in action.keep}
        job.result_exec = {n: job.result_exec[n] for n in action.keep}
        job.vouchers = {}
        if not action.keep:
            # No vote stands: the job is placed afresh like any pending job (adaptive replication
            # decides its copies; the caught owners stay excluded).
            job.planned = 0
            self._place_afresh(job, now, frozenset(job.banned_owners))
            return
        job.planned = max(job.planned, 2)  # the kept votes are completed to a quorum
        job.missing = action.more_copies
        self._request_missing(job)

    def _fail_over(self, job: SimJob, node_name: str, now: float) -> None:
        if job.done or job.gave_up:
            return
        state = JobAttemptState(
            key=str(job.spec.index),
            attempt=0,
            backoff_limit=0,
            assigned_nodes=(node_name,),
            excluded_nodes=job.excluded,
        )
        action = on_node_lost(state, node_name)
        if isinstance(action, Reschedule):
            job.excluded = action.excluded_nodes
            job.awaiting_detection += 1
            self._push(now + self.p.lost_detection_s, REQUEUE, job.spec.index)

    def _on_crash(self, now: float, exec_id: int, _: str) -> None:
        if not self.execs[exec_id].live:
            return
        ex, node, job = self._stop(exec_id, now, "crashed")
        node.evidence = record_failure(node.evidence, now, self.cfg.reputation)
        self._fail_over(job, ex.node, now)

    def _on_down(self, now: float, generation: int, name: str) -> None:
        node = self.nodes.get(name)
        if node is None or not node.online or node.generation != generation:
            return
        rc = self.cfg.reputation
        node.evidence = record_heartbeats(node.evidence, now, rc, (now - node.since) / self.p.heartbeat_s, 0.0)
        lost = list(node.running)
        node.online = False
        for exec_id in lost:
            _, _, job = self._stop(exec_id, now, "lost")
            node.evidence = record_timeout(node.evidence, now, rc)
            self._fail_over(job, name, now)
        node.since = now
        node.snapshot = None
        back_after = self._exp(1.0 / (self.p.offline_mean_h * 3600.0), self.churn_rng)
        if self.churn_rng.random() < self.p.churn_returns:
            self._push(now + back_after, UP, 0, name)
        else:
            # Gone for good (its VolunteerNode is deleted); a brand-new volunteer joins later.
            self.departed[name] = self.nodes.pop(name).v
            self._push(now + back_after, UP, 1, name)

    def _on_up(self, now: float, replace_it: int, name: str) -> None:
        if replace_it:
            self._join(self.factory.replacement(self.departed.pop(name)), now)
            return
        node = self.nodes[name]
        node.evidence = record_heartbeats(
            node.evidence, now, self.cfg.reputation, 0.0, (now - node.since) / self.p.heartbeat_s
        )
        self._go_online(node, now)

    # --- metrics --------------------------------------------------------------------------------

    def _work_by_outcome(self, jobs: set[int]) -> dict[str, float]:
        """Reference GPU-seconds of these jobs' executions by how they ended; work still running
        when the simulation stops counts as "running"."""
        out: dict[str, float] = {}
        for (job, outcome), work in self.job_work.items():
            if job in jobs:
                out[outcome] = out.get(outcome, 0.0) + work
        running = sum(e.gpus * (self.now - e.start) * e.speed for e in self.execs if e.live and e.job in jobs)
        if running:
            out["running"] = running
        return out

    def _figures(self, jobs: set[int]) -> dict[str, Any]:
        final = [v for i, v in self.accepted.items() if i in jobs]
        # No accepted result, no completion time: a policy that finishes nothing must not score 0 s.
        completions = np.array([c for c, _, _, _ in final]) if final else None
        correct = sum(1 for _, ok, _, _ in final if ok)
        useful = sum(g for _, _, g, _ in final)
        verified = sum(1 for _, _, _, v in final if v)
        wrong_verified = sum(1 for _, ok, _, v in final if v and not ok)
        work = self._work_by_outcome(jobs)
        executed = sum(work.values())
        ran_to_end = work.get("finished", 0.0) + work.get("cancelled", 0.0)
        lost = work.get("crashed", 0.0) + work.get("lost", 0.0)
        return {
            "jobs": len(jobs),
            "accepted": len(final),
            "unfinished": len(jobs) - len(final),
            "correct_rate": correct / max(len(final), 1),
            "wrong_accepted": len(final) - correct,
            "accepted_by_quorum": verified,
            "wrong_accepted_by_quorum": wrong_verified,
            "wrong_accepted_single_copy": len(final) - correct - wrong_verified,
            "completion_mean_s": float(completions.mean()) if completions is not None else None,
            "completion_p50_s": float(np.percentile(completions, 50)) if completions is not None else None,
            "completion_p95_s": float(np.percentile(completions, 95)) if completions is not None else None,
            "wasted_gpu_hours": (executed - useful) / 3600.0,
            "executed_gpu_hours": executed / 3600.0,
            "useful_gpu_hours": useful / 3600.0,
            "replication_overhead": ran_to_end / useful if useful else math.inf,
            "crash_loss_overhead": lost / useful if useful else math.inf,
            "executed_vs_useful": executed / useful if useful else math.inf,
            "work_gpu_hours_by_outcome": {k: v / 3600.0 for k, v in sorted(work.items())},
        }

    def _metrics(self) -> dict[str, Any]:
        measured = {s.index for s in self.specs if s.measured}
        start = self.p.warmup_h * 3600.0
        late = {s.index for s in self.specs if s.measured and s.submit_s >= start + self.p.arrival_window_h * 1800.0}
        # What no placement can beat: every job alone on the fastest GPU model, no latency, no crash.
        floor = np.percentile([s.compute_s for s in self.specs if s.measured], 95) / FASTEST_GPU_SPEED
        steady = self._figures(late)
        return {
            "steady_state": {k: steady[k] for k in STEADY_KEYS},
            **self._figures(measured),
            "warmup_jobs": len(self.specs) - len(measured),
            "gave_up_no_majority": sum(1 for i, j in self.jobs.items() if j.gave_up and i in measured),
            "revoked": self.revoked,
            "revoked_wrong": self.revoked_wrong,
            "owners_caught": len(self.caught_owners),
            "completion_floor_p95_s": float(floor),
            "executions": len(self.execs),
            "scheduler_calls": self.scheduler_calls,
            "scheduler_seconds": self.scheduler_s,
        }


STEADY_KEYS = ("jobs", "accepted", "correct_rate", "completion_mean_s", "completion_p95_s", "replication_overhead")
