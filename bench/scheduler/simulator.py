"""Discrete-event simulation of a volunteer fleet driving the real scheduler code.

Every policy sees the same volunteers and the same job stream (drawn from the seed); the node
behaviour that depends on chance (RTT jitter, crashes, churn, lies) comes from one generator per
policy seeded identically. The simulator calls the policy's `place(jobs, snapshots, now)` once per
tick with every pending job (up to `max_batch`), and uses the scheduler's own pure functions for
RTT smoothing, reputation updates and retroactive invalidation, and the operator's `judge` for votes.

What happens to an attempt follows the operator (koinon_operator/reconciler.py), so that what it
runs is what this measures: a node lost mid-attempt (noticed `lost_detection_s` later) stops every
copy of the attempt, throws away the answers already in and places the whole attempt again,
uncounted, the lost node tried last (`_node_lost`); a copy that fails counts as an owner without an
answer, the attempt is judged once every copy has ended (or early, once the answers in decide the
vote), and without a majority a whole quorum reruns on nodes and owners that took no part, judged
with the earlier answers (`_conclude_verified`; one answer and one failure is no majority); a
single copy that fails, or an attempt of which no copy answered, is a failed attempt, its nodes
tried last (`_attempt_failed`). Failed attempts and reruns each count against `backoff_limit`
(the AIJob default, 2): one more fails the job for good (BackoffLimitExceeded, NoMajority). A
revoked result is flagged, not rerun (revocation.py): it stays accepted and its user resubmits.
Where the operator differs: it judges on its polls, the simulator at each event; it tries the
nodes it tries last within each job's own call, the simulator after the tick's batch; it rechecks
accepted results every 60 s, the simulator when an owner is caught (an owner counts as caught from
its first disagreement with an accepted quorum, where the operator sums its nodes' decayed
disagreements past a tolerance of 0.5, which one disagreement passes for days).

Work is counted in reference GPU-hours (GPU-hours on an RTX 4090-class GPU, speed 1.0): an hour on
a GPU of speed s is s reference hours, so a fast and a slow node doing the same job cost the same.

Metrics (per policy, over the measured jobs; the warm-up stream before them is not counted):
- correct_rate: accepted results whose digest is the true one / accepted results, each as it was
  accepted (a result revoked later included: nothing replaces it).
- standing_correct_rate: the same over the results that stand at the end (accepted, not revoked).
- revoked: accepted results flagged ResultRevoked (jobs whose user must resubmit).
- failed: jobs failed for good (failed_backoff_limit, failed_no_majority); with the jobs still
  running at the horizon they are `unfinished`, and have no completion time.
- completion: submit -> accepted result, including queueing, failovers and verification copies;
  completion_p95_s over accepted results, completion_p95_all_jobs_s over every job with the
  unfinished ones counted as slower than all.
- replication_overhead: work of executions that ran to the end (every verification copy, results
  rejected by a quorum, copies stopped once a vote was decided) / work of one execution per
  accepted job. A policy that runs each job once has 1.0.
- crash_loss_overhead: work lost to crashes and to nodes that left mid-job (with the other copies
  of the attempt stopped then, and the answers it threw away) / the same useful work.
- wasted_gpu_hours: all work executed minus one execution per accepted job (both kinds of loss).
Baselines run one copy per job and accept the first result that comes back, as a naive system does;
they fail over and fail for good by the same rules.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    Accepted,
    JobRequest,
    NodeResult,
    NodeSnapshot,
    Placer,
    ReputationEvidence,
    Revoke,
    RttEstimate,
    apply_quorum_outcome,
    observe_rtt,
    recheck_accepted,
    record_failure,
    record_heartbeats,
    record_success,
    record_timeout,
    record_work,
)
from koinon_operator.verification import CopyResult, Verdict, judge

from .params import SimParams
from .population import FASTEST_GPU_SPEED, JobSpec, Volunteer, VolunteerFactory, job_stream

ARRIVE, TICK, DONE, CRASH, DOWN, UP, REQUEUE, LOST = range(8)
TRUE_DIGEST = "ok"
TRIED_LAST_KEPT = 16
"""Failed and lost nodes a job keeps to try last, of each (reconciler.MAX_FAILED_NODES_KEPT; not
imported: the reconciler module pulls in the Kubernetes and Ray clients)."""


def _newest_last(kept: list[str], added: list[str]) -> list[str]:
    return ([n for n in kept if n not in added] + list(dict.fromkeys(added)))[-TRIED_LAST_KEPT:]


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
    """One AIJob as the operator keeps it: attempts, their copies, and what its status carries from
    one attempt to the next (reconciler.py: failures, verificationReruns, earlierResults,
    excludedNodes/excludedOwners, failedNodes/lostNodes, checkedCopies)."""

    spec: JobSpec
    quorum: int
    attempt: int = 0
    """Attempts placed so far (status.attempts)."""
    planned: int = 0
    """Copies of the current attempt (status.scheduling.copies); 0 while the job waits for placement."""
    copies: list[int] = field(default_factory=list)
    """Executions of the current attempt, in copy order."""
    running: set[int] = field(default_factory=set)
    answers: dict[int, str | None] = field(default_factory=dict)
    """Copies of the current attempt that ended: their digest, or None for a copy that failed."""
    unnoticed: int = 0
    """Copies of the current attempt that failed where the control plane has not seen it yet."""
    lost: list[str] = field(default_factory=list)
    """Nodes of the current attempt lost mid-copy whose loss has not been noticed yet."""
    earlier: list[CopyResult] = field(default_factory=list)
    """Answers of earlier attempts that gave no majority (status.verification.earlierResults): every
    later attempt is judged with them."""
    result_exec: dict[str, int] = field(default_factory=dict)
    """node -> the execution that gave its answer (this attempt's or an earlier one's)."""
    failures: int = 0
    """Attempts that failed (status.failures): counted against backoffLimit."""
    reruns: int = 0
    """Attempts without a majority (status.verificationReruns): counted against backoffLimit too."""
    checked: int = 1
    """The most copies any attempt ran (status.scheduling.checkedCopies): later attempts run as many."""
    excluded_nodes: frozenset[str] = frozenset()
    """Nodes of copies that gave no majority: left out of every later attempt (excludedNodes)."""
    excluded_owners: frozenset[str] = frozenset()
    failed_nodes: list[str] = field(default_factory=list)
    """Nodes blamed for a failed attempt, tried last (status.scheduling.failedNodes)."""
    lost_nodes: list[str] = field(default_factory=list)
    """Nodes lost mid-attempt, tried last (status.scheduling.lostNodes)."""
    done: bool = False
    failed: str = ""
    """Why the job failed for good (the AIJob's reason: BackoffLimitExceeded, NoMajority); "" if not."""
    revoked: bool = False
    """Its accepted result was flagged ResultRevoked (it stays accepted; nothing reruns it)."""
    vouchers: dict[str, NodeResult] = field(default_factory=dict)
    """Nodes whose results the accepted digest stands on (for retroactive invalidation)."""


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
        lost, stopped, cancelled, discarded)."""
        # job -> (completion_s, correct, gpu_s of one copy, verified by a quorum). A job is accepted
        # once: a revoked result stays here (flagged in SimJob.revoked), as the operator leaves it.
        self.accepted: dict[int, tuple[float, bool, float, bool]] = {}
        self.revocation = verify
        """Koinon flags results vouched for by an owner caught lying; a naive system cannot."""
        self.vouched: dict[str, set[int]] = {}
        """owner -> accepted jobs whose result stands on that owner's vote."""
        self.caught_owners: set[str] = set()
        self.revoked = 0
        self.revoked_wrong = 0
        self.scheduler_s = 0.0
        self.scheduler_calls = 0
        self.tick_no = 0
        self.failed_jobs = 0
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
            LOST: self._on_lost,
        }
        while self.events:
            t, _, kind, a, b = heapq.heappop(self.events)
            if t > horizon:
                break
            self.now = t
            handlers[kind](t, a, b)
            if kind == TICK and len(self.accepted) + self.failed_jobs == len(self.specs) and not self.pending:
                break
        return self._metrics()

    def _on_arrive(self, now: float, index: int, _: str) -> None:
        spec = self.specs[index]
        self.jobs[index] = job = SimJob(spec, self.p.verification_quorum if self.verify else 1)
        self.pending[index] = self._request(job)

    def _request(self, job: SimJob) -> JobRequest:
        """The next attempt's placement request, as the operator's _place builds it: the full quorum
        every time (the copies are drawn afresh), at least as many copies as any attempt ran unless
        earlier answers are kept, and the nodes it tries last left out (_on_tick takes them back)."""
        s = job.spec
        return JobRequest(
            key=f"default/job-{s.index:06d}",
            replicas=1,
            gpus_per_replica=s.gpus,
            gpu_memory_mib=s.memory_mib,
            cpus_per_replica=2.0 * s.gpus,
            min_reputation=s.min_reputation,
            max_latency_ms=s.max_latency_ms,
            regions=s.regions,
            verification_quorum=job.quorum,
            least_copies=1 if job.earlier else job.checked,
            excluded_nodes=job.excluded_nodes | self._tried_last(job),
            excluded_owners=job.excluded_owners,
            creation_index=s.index,
            attempt=job.attempt,
            expected_duration_s=s.duration_estimate_s,
            # The first attempt has waited since submission (a large replicated job may wait a
            # bounded time for a trusted node); failovers and reruns do not wait, as in the operator.
            pending_since=s.submit_s if job.attempt == 0 else None,
        )

    @staticmethod
    def _tried_last(job: SimJob) -> frozenset[str]:
        return frozenset((*job.failed_nodes, *job.lost_nodes)) - job.excluded_nodes

    def _pend(self, job: SimJob) -> None:
        """The attempt is over without a result: the job waits for its next one."""
        job.planned = 0
        job.copies = []
        job.answers = {}
        job.unnoticed = 0
        job.lost = []
        self.pending[job.spec.index] = self._request(job)

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
        self._place(batch, now)
        # Tried last (the operator's _place): a job that found no room away from the nodes it
        # failed or was lost on is placed again with them. The operator does this within each
        # job's own call; here after the whole batch (only where one of those nodes could hold it).
        again = [
            replace(request, excluded_nodes=job.excluded_nodes)
            for request in batch
            if (job := self.jobs[request.creation_index]).spec.index in self.pending and self._tried_last_fit(job)
        ]
        if again:
            self._place(again, now)

    def _tried_last_fit(self, job: SimJob) -> bool:
        return any(
            (node := self.nodes.get(name)) is not None and node.online and node.free_gpus >= job.spec.gpus
            for name in self._tried_last(job)
        )

    def _place(self, batch: list[JobRequest], now: float) -> None:
        snapshots = [self._snapshot(n) for n in self.nodes.values()]
        started = time.perf_counter()
        result = self.placer.place(batch, snapshots, now)
        self.scheduler_s += time.perf_counter() - started
        self.scheduler_calls += 1
        for placement in result.placements:
            index = int(placement.job_key.rsplit("-", 1)[1])
            job = self.jobs[index]
            del self.pending[index]
            job.attempt += 1
            job.planned = placement.copies
            job.checked = max(job.checked, placement.copies)
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
        job.copies.append(exec_id)
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
        if job.done or job.failed:
            return
        digest = self._digest(node, job)
        job.answers[exec_id] = digest
        job.result_exec[ex.node] = exec_id
        self._conclude(job, now)

    def _votes(self, job: SimJob) -> list[CopyResult]:
        """The attempt's votes for the operator's judge: one per copy; None for a copy that failed,
        was lost, or has not answered yet (reconciler.copy_votes)."""
        return [
            CopyResult(k, self.execs[e].node, self.execs[e].owner, job.answers.get(e)) for k, e in enumerate(job.copies)
        ]

    def _conclude(self, job: SimJob, now: float) -> None:
        """What the operator's passes do with an attempt (reconciler._follow, _decide_early, _judge,
        _conclude_single, _conclude_verified, _attempt_failed), once its copies have ended."""
        single = job.planned == 1 and not job.earlier
        votes = self._votes(job)
        if job.running or job.unnoticed or job.lost:
            # Copies still running (or an end not seen yet): a verified attempt is decided early
            # when the answers in (with earlier attempts') give a digest a majority that the copies
            # left cannot overturn (_decide_early: judge counts them as owners without an answer).
            if single or not any(v.digest is not None for v in votes):
                return
            verdict = judge(votes, job.earlier)
            if verdict.accepted_digest is not None:
                self._accept_verdict(job, now, verdict, votes)
            return
        if single:
            (exec_id,) = job.copies
            digest = job.answers[exec_id]
            if digest is None:
                self._attempt_failed(job, [self.execs[exec_id].node])
                return
            node = self.nodes[self.execs[exec_id].node]
            node.evidence = record_success(node.evidence, now, self.cfg.reputation)
            self._accept(job, now, digest, exec_id, {node.v.name: NodeResult(node.v.owner, digest)})
            return
        verdict = judge(votes, job.earlier)
        if verdict.accepted_digest is not None:
            self._accept_verdict(job, now, verdict, votes)
            return
        answered = [v for v in votes if v.digest is not None]
        if not answered:
            # No copy produced a result: the attempt failed as a whole (_ray_jobs_failed).
            self._attempt_failed(job, list(verdict.failed))
            return
        # No majority (a copy that failed counts as an owner without an answer, so one answer and
        # one failure is none): rerun a whole quorum on nodes and owners that took no part, judged
        # with the answers so far; counted against backoffLimit as verificationReruns.
        job.reruns += 1
        if job.reruns > self.p.backoff_limit:
            self._fail(job, "NoMajority")
            return
        assigned = [self.execs[e] for e in job.copies]
        job.excluded_nodes |= {ex.node for ex in assigned}
        job.excluded_owners |= {ex.owner for ex in assigned}
        job.earlier = [*job.earlier, *answered]
        self._pend(job)

    def _attempt_failed(self, job: SimJob, blamed: list[str]) -> None:
        """Counted against backoffLimit; the blamed nodes are tried last (_attempt_failed)."""
        job.failures += 1
        if job.failures > self.p.backoff_limit:
            self._fail(job, "BackoffLimitExceeded")
            return
        job.failed_nodes = _newest_last(job.failed_nodes, blamed)
        self._pend(job)

    def _fail(self, job: SimJob, reason: str) -> None:
        job.failed = reason
        self.failed_jobs += 1
        for other in list(job.running):
            self._stop(other, self.now, "cancelled")
        self.pending.pop(job.spec.index, None)

    def _accept_verdict(self, job: SimJob, now: float, verdict: Verdict, votes: list[CopyResult]) -> None:
        digest = verdict.accepted_digest
        assert digest is not None
        rc = self.cfg.reputation
        # Agreement and disagreement for every node judged, this attempt's and earlier ones' (none
        # was charged while there was no majority); nodes that left for good have no record.
        decision = Accepted(
            digest,
            tuple(n for n in verdict.agreeing if n in self.nodes),
            tuple(n for n in verdict.disagreeing if n in self.nodes),
        )
        evidence = {n: self.nodes[n].evidence for n in (*decision.agreeing, *decision.disagreeing)}
        for name, ev in apply_quorum_outcome(evidence, decision, now, rc).items():
            self.nodes[name].evidence = ev
            self.nodes[name].snapshot = None
        owner = {v.node: v.owner for v in (*job.earlier, *votes)}
        vouchers = {n: NodeResult(owner[n], digest) for n in verdict.agreeing}
        self._accept(job, now, digest, job.result_exec[verdict.agreeing[0]], vouchers)
        caught = {owner[n] for n in verdict.disagreeing}
        if caught and self.revocation:
            self._revoke_vouched_by(caught, now)

    def _accept(self, job: SimJob, now: float, digest: str, exec_id: int, vouchers: dict[str, NodeResult]) -> None:
        job.done = True
        ex = self.execs[exec_id]
        correct = digest == TRUE_DIGEST
        index = job.spec.index
        one_execution = ex.gpus * (ex.end - ex.start) * ex.speed
        self.accepted[index] = (now - job.spec.submit_s, correct, one_execution, job.planned >= 2 or bool(job.earlier))
        job.vouchers = vouchers
        for result in vouchers.values():
            self.vouched.setdefault(result.owner, set()).add(index)
        for other in list(job.running):  # copies still running are stopped (a decided vote)
            self._stop(other, now, "cancelled")
        self.pending.pop(index, None)
        if self.revocation and {r.owner for r in vouchers.values()} & self.caught_owners:
            # Vouched for by an owner already caught: the operator's next look flags it.
            self._recheck(job, now)

    def _revoke_vouched_by(self, caught: set[str], now: float) -> None:
        """Retroactive invalidation: flag every accepted job whose result no longer stands once the
        votes of the caught owners are struck out (the scheduler's `recheck_accepted` decides)."""
        self.caught_owners |= caught
        for owner in sorted(caught):
            for index in sorted(self.vouched.pop(owner, set())):
                self._recheck(self.jobs[index], now)

    def _recheck(self, job: SimJob, now: float) -> None:
        if not job.done or job.revoked:
            return
        action = recheck_accepted(job.vouchers, self.caught_owners, max(job.quorum, 2))
        if isinstance(action, Revoke):
            self._revoke(job, action, now)

    def _revoke(self, job: SimJob, action: Revoke, now: float) -> None:
        """What the operator does (revocation.py): the condition ResultRevoked on a job that stays
        Succeeded. Nothing reruns it (its result may have been used; its owners re-create it), so
        the accepted result, right or wrong, stays accepted and is counted as revoked."""
        job.revoked = True
        if job.spec.measured:  # as every figure: the warm-up stream's jobs are not counted
            _, correct, _, _ = self.accepted[job.spec.index]
            self.revoked += 1
            self.revoked_wrong += not correct

    def _current(self, job: SimJob, attempt: str) -> bool:
        """An end noticed for the attempt that is running now ("" = whichever that is)."""
        return not (job.done or job.failed or job.planned == 0 or (attempt and int(attempt) != job.attempt))

    def _on_crash(self, now: float, exec_id: int, _: str) -> None:
        if not self.execs[exec_id].live:
            return
        _ex, node, job = self._stop(exec_id, now, "crashed")
        node.evidence = record_failure(node.evidence, now, self.cfg.reputation)
        if job.done or job.failed:
            return
        job.answers[exec_id] = None
        job.unnoticed += 1
        self._push(now + self.p.lost_detection_s, REQUEUE, job.spec.index, str(job.attempt))

    def _on_requeue(self, now: float, index: int, attempt: str) -> None:
        """The control plane sees a copy's failure (Ray reports its job FAILED)."""
        job = self.jobs[index]
        if not self._current(job, attempt):
            return
        job.unnoticed -= 1
        self._conclude(job, now)

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
            if not (job.done or job.failed):
                job.lost.append(name)
                self._push(now + self.p.lost_detection_s, LOST, job.spec.index, str(job.attempt))
        node.since = now
        node.snapshot = None
        back_after = self._exp(1.0 / (self.p.offline_mean_h * 3600.0), self.churn_rng)
        if self.churn_rng.random() < self.p.churn_returns:
            self._push(now + back_after, UP, 0, name)
        else:
            # Gone for good (its VolunteerNode is deleted); a brand-new volunteer joins later.
            self.departed[name] = self.nodes.pop(name).v
            self._push(now + back_after, UP, 1, name)

    def _on_lost(self, now: float, index: int, attempt: str) -> None:
        """The control plane sees a node of the attempt lost (Ray marks it dead): unless the vote
        was decided meanwhile, the operator's _node_lost. It stops every copy of the attempt,
        throws away the answers already in (an attempt's answers count only in its own vote), and
        places the whole attempt again, uncounted, the lost node tried last."""
        job = self.jobs[index]
        if not self._current(job, attempt):
            return
        for exec_id in list(job.running):
            self._stop(exec_id, now, "stopped")
        for exec_id, digest in job.answers.items():
            if digest is not None:  # ran to its end, for nothing: lost to the failover
                ex = self.execs[exec_id]
                work = ex.gpus * (ex.end - ex.start) * ex.speed
                self.job_work[(ex.job, "finished")] -= work
                self.job_work[(ex.job, "discarded")] = self.job_work.get((ex.job, "discarded"), 0.0) + work
        job.lost_nodes = _newest_last(job.lost_nodes, job.lost)
        self._pend(job)

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
        standing = [v for i, v in self.accepted.items() if i in jobs and not self.jobs[i].revoked]
        # No accepted result, no completion time: a policy that finishes nothing must not score 0 s.
        completions = np.array([c for c, _, _, _ in final]) if final else None
        correct = sum(1 for _, ok, _, _ in final if ok)
        standing_correct = sum(1 for _, ok, _, _ in standing if ok)
        useful = sum(g for _, _, g, _ in final)
        verified = sum(1 for _, _, _, v in final if v)
        wrong_verified = sum(1 for _, ok, _, v in final if v and not ok)
        failed = [self.jobs[i].failed for i in jobs if i in self.jobs and self.jobs[i].failed]
        work = self._work_by_outcome(jobs)
        executed = sum(work.values())
        ran_to_end = work.get("finished", 0.0) + work.get("cancelled", 0.0)
        lost = sum(work.get(k, 0.0) for k in ("crashed", "lost", "stopped", "discarded"))
        return {
            "jobs": len(jobs),
            "accepted": len(final),
            "unfinished": len(jobs) - len(final),
            "failed": len(failed),
            "failed_backoff_limit": failed.count("BackoffLimitExceeded"),
            "failed_no_majority": failed.count("NoMajority"),
            "correct_rate": correct / max(len(final), 1),
            "standing": len(standing),
            "standing_correct_rate": standing_correct / max(len(standing), 1),
            "wrong_accepted": len(final) - correct,
            "wrong_standing": len(standing) - standing_correct,
            "accepted_by_quorum": verified,
            "wrong_accepted_by_quorum": wrong_verified,
            "wrong_accepted_single_copy": len(final) - correct - wrong_verified,
            "completion_mean_s": float(completions.mean()) if completions is not None else None,
            "completion_p50_s": float(np.percentile(completions, 50)) if completions is not None else None,
            "completion_p95_s": float(np.percentile(completions, 95)) if completions is not None else None,
            "completion_p95_all_jobs_s": _p95_unfinished_last(completions, len(jobs)),
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
            "revoked": self.revoked,
            "revoked_wrong": self.revoked_wrong,
            "owners_caught": len(self.caught_owners),
            "completion_floor_p95_s": float(floor),
            "executions": len(self.execs),
            "scheduler_calls": self.scheduler_calls,
            "scheduler_seconds": self.scheduler_s,
        }


def _p95_unfinished_last(completions: np.ndarray | None, jobs: int) -> float | None:
    """p95 completion over every job, one without an accepted result (failed for good, or still
    unfinished when the simulation stops) counted as slower than all: None when those are more
    than 5 % of the jobs (the p95 job never completed)."""
    done = 0 if completions is None else len(completions)
    rank = math.ceil(0.95 * jobs)  # nearest rank
    if jobs == 0 or completions is None or rank > done:
        return None
    return float(np.sort(completions)[rank - 1])


STEADY_KEYS = (
    "jobs",
    "accepted",
    "failed",
    "correct_rate",
    "standing_correct_rate",
    "completion_mean_s",
    "completion_p95_s",
    "replication_overhead",
)
