"""One reconcile pass of an AIJob: read its object, talk to Ray, return the status to write.

Kept free of kopf so it can be driven directly in tests. Writes are returned, not performed:
the caller (a kopf handler) patches status and posts the events.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from koinon_operator.api.aijob import (
    MAX_QUORUM,
    AIJobSpec,
    AIJobStatus,
    SpecError,
    format_micro_time,
    format_time,
    parse_spec_ratcheting,
    parse_time,
)
from koinon_operator.api.conditions import set_condition
from koinon_operator.api.constants import AIJOB_METADATA_KEY, SUBMISSION_PREFIX, ConditionType, Phase
from koinon_operator.inventory import Allocation, RayNodeCache, build_capacity, node_name
from koinon_operator.placement import PlacementDecision, PlacementRequest, Placer
from koinon_operator.ray_jobs import (
    RayJobInfo,
    RayJobsClient,
    RayJobState,
    RayNodeInfo,
    RayRequestError,
    RayUnavailableError,
    Submission,
    SubmittedAs,
)
from koinon_operator.telemetry import (
    LOG_TAIL_SEPARATOR,
    RAY_QUOTED_LOGS,
    RESULT_SEPARATOR,
    trace_id_for,
    traceparent,
)
from koinon_operator.verification import CopyResult, Verdict, judge

logger = logging.getLogger(__name__)
LOG_GONE = "its driver's log (and the result line in it) could not be read: the driver's node left the cluster"
# A driver log that its node, still alive, does not serve is read again until this long has passed
# since this process's first failed read of it (by its own monotonic clock), and at least
# LOG_UNSERVED_MIN_FAILURES reads have failed. After that the log is taken for gone, as with a node
# that left: retried for ever, the job stayed Running (its nodes booked, its deadline met already)
# and a decided vote undecided. The node's own dashboard agent serves the log, and a volunteer
# controls its node. Not counted from Ray's end time: that is stamped by the job's supervisor on the
# volunteer's own node (a clock behind by minutes made the first failed read final), and an
# operator that was down while the job ended would give up on its first read, a blip included.
LOG_UNSERVED_GIVE_UP_SECONDS = 300.0
LOG_UNSERVED_MIN_FAILURES = 3
# Submissions whose log reads are failing, remembered before stale ones are looked for: those
# whose last failed read is LOG_UNSERVED_STALE_SECONDS old. A job's timer pass reads again every
# poll interval, so only jobs gone without their deletion handler (a finalizer removed by hand)
# leave entries that old. Live entries are never dropped: a dropped one starts its wait again, and
# with more failing logs than kept, read in turn, the one dropped would always be the next read,
# and none would ever be given up on. (The table is bounded by the jobs themselves: entries go
# when their job finishes or is stopped, on a read that succeeds, and on a change of leader.)
LOG_UNSERVED_KEPT = 1024
LOG_UNSERVED_STALE_SECONDS = 24 * 3600.0
LOG_UNSERVED = (
    "its driver's log (and the result line in it) could not be read: the driver's node, still alive, did not "
    f"serve it for {LOG_UNSERVED_GIVE_UP_SECONDS / 60:g} min"
)

RESULT_MARKER = "KOINON_RESULT "
LOG_TAIL_LINES = 20
# Ray reports SUCCEEDED before the driver's log is flushed: a served log without a result line is
# read again until this long after the first pass of this process that found it so (its own
# monotonic clock: Ray's end time is stamped on the volunteer's node, and one far ahead held the
# job Running for ever). The result line is optional: after the wait, the log is taken as it is.
LOG_SETTLE_SECONDS = 5.0
# How long a body that predates this process's last status write is left alone (the watch is
# behind); after that the write is taken for lost and the body acted on again.
STALE_BODY_GRACE_SECONDS = 30.0


class _LeaseLost(Exception):
    """A pass that may no longer act on Ray (AIJobReconciler.reconcile's may_act) ends with it."""


@dataclass(frozen=True)
class JobEvent:
    type: str  # "Normal" or "Warning", as in Kubernetes Events
    reason: str
    message: str


@dataclass
class Outcome:
    """What a reconcile pass wants written: a status merge patch, events, maybe a deletion."""

    status: dict[str, Any] = field(default_factory=dict)
    events: list[JobEvent] = field(default_factory=list)
    delete: bool = False
    # (node, kind) evidence for the volunteers' reputation: success, failure, timeout,
    # agreement or disagreement.
    reputation: list[tuple[str, str]] = field(default_factory=list)
    # Per node, the work its replicas did in the attempt that ended in this pass (whatever its
    # outcome): the exposure behind its crash rate and its contributed GPU-seconds.
    work: dict[str, NodeWork] = field(default_factory=dict)

    def event(self, reason: str, message: str, warning: bool = False) -> None:
        self.events.append(JobEvent("Warning" if warning else "Normal", reason, message))


def keyed_submission_nonce(key: bytes) -> Callable[[str, int], str]:
    """The nonce of each attempt's submission ids (submission_id_for): an HMAC-SHA256 of the job's
    uid and the attempt number under ``key`` (64 bits of it, hex).

    Unguessable without the key, as a random nonce is; but the same for the same attempt, whoever
    places it. A pass acting on a body older than the write that placed the attempt (a new leader
    whose watch is behind, or this process past STALE_BODY_GRACE_SECONDS with its watch stalled)
    places the same attempt again: under the same ids it adopts the Ray job the first placement
    submitted, where a nonce drawn at random per placement named a second job, submitted while the
    first ran on referenced by nothing (never stopped, its nodes free in the ledger). The key is
    the operator's Secret (handlers.configure: shared by every replica, kept across restarts)."""

    def nonce(uid: str, attempt: int) -> str:
        return hmac.new(key, f"{uid}|{attempt}".encode(), hashlib.sha256).hexdigest()[:16]

    return nonce


def submission_id_for(uid: str, attempt: int, nonce: str = "") -> str:
    """The Ray submission id of an attempt, ``koinon-<uid>-<attempt>-<nonce>``.

    The nonce (keyed_submission_nonce) is recorded with the attempt (status.submissionId, in the
    write that places it); every submission is made from that record once it is read back
    (AIJobReconciler._follow), so a restarted operator computes the same ids and adopts what it
    submitted, never submits it twice. Keyed, because anyone with the cluster's Ray token (every
    volunteer: README, "What a volunteer can still do") can submit under any id it can name, and
    the uid and the attempt number are no secret (the head's job list shows them): an id known
    before the operator submits could be taken first by a job of the volunteer's own, whose log
    would then be read as the attempt's answer (foreign_submission is the second guard). Without
    a nonce: the ids of attempts an earlier operator placed (``koinon-<uid>-<attempt>``); with a
    random one: those placed by an operator that drew it so. Both are read from status, as any is."""
    base = f"{SUBMISSION_PREFIX}-{uid}-{attempt}"
    return f"{base}-{nonce}" if nonce else base


def copy_submission_id(uid: str, attempt: int, copy: int, nonce: str = "") -> str:
    """Verification copy ``copy`` of an attempt; copy 0 is the attempt's own submission."""
    base = submission_id_for(uid, attempt, nonce)
    return base if copy == 0 else f"{base}-copy{copy}"


STOPPED_KEPT_S = 3600.0
# Finished jobs remembered before the old ones are looked for (each pass that finishes one).
FINISHED_KEPT = 1024


def submission_digest(spec: AIJobSpec) -> str:
    """What an attempt's copies are submitted from (recorded at placement): copies submitted
    later must run what the earlier ones run, or they would be judged against each other."""
    submitted = {
        "entrypoint": spec.entrypoint,
        "runtimeEnv": spec.runtime_env,
        "replicas": spec.replicas,
        "resources": [spec.resources.gpus, spec.resources.gpu_memory_mib, spec.resources.cpus],
    }
    return hashlib.sha256(json.dumps(submitted, sort_keys=True, default=str).encode()).hexdigest()[:16]


# status.scheduling: a digest of what the ratcheted checks (aijob.parse_spec_ratcheting) read that
# submission_digest leaves out, recorded at placement, so that _ratchet tells an edit of it (e.g. a
# running job edited to more regions than the operator takes) from the spec an earlier operator
# placed. Its own field: widening submission_digest would read as an edit of every job placed before.
PLACED_REGIONS = "regionsDigest"


def regions_digest(spec: AIJobSpec) -> str:
    """spec.constraints.regions, the one field a ratcheted check reads outside submission_digest."""
    return hashlib.sha256(json.dumps(list(spec.constraints.regions)).encode()).hexdigest()[:16]


# status.scheduling: the spec digest a Warning was given for, that the job runs with a spec the
# operator's newer checks refuse (AIJobReconciler._ratchet).
TOLERATED_SPEC = "toleratedSpecDigest"

# status.scheduling: the spec digest a SpecChangeDeferred Event was given for, that an edit of the
# running attempt's program or resources waits for a next attempt (AIJobReconciler._defer_edit).
# Dropped with the rest of status.scheduling when the next attempt is placed (it runs the edit).
DEFERRED_SPEC = "deferredSpecDigest"


def copy_submission_id_from(submission_id: str | None, copy: int) -> str | None:
    if not submission_id:
        return None
    return submission_id if copy == 0 else f"{submission_id}-copy{copy}"


def ray_submissions_of(state: AIJobStatus) -> list[str]:
    """The Ray submissions of the job's current attempt: its own and its verification copies'."""
    found = (copy_submission_id_from(state.submission_id, copy) for copy in range(state.copies))
    return [submission_id for submission_id in found if submission_id]


def submission_of(key: str, spec: AIJobSpec, state: AIJobStatus, copy: int) -> Submission:
    """What the operator submits to Ray for copy ``copy`` of the attempt ``state`` records (its
    ids, nodes and addresses), running ``spec``."""
    namespace, name = key.split("/", 1)
    nodes, addresses = state.copy_nodes(copy), state.copy_addresses(copy)
    env_vars = dict(spec.runtime_env.get("env_vars") or {})
    env_vars.update(
        KOINON_JOB=key,
        KOINON_ATTEMPT=str(state.attempts),
        KOINON_COPY=str(copy),
        KOINON_REPLICAS=str(spec.replicas),
        KOINON_GPUS_PER_REPLICA=str(spec.resources.gpus),
        KOINON_NODE_NAMES=",".join(nodes),
        KOINON_NODE_ADDRESSES=",".join(addresses),
    )
    if state.trace_id:
        # W3C trace context: an instrumented job's own spans join the job's trace.
        env_vars["TRACEPARENT"] = traceparent(state.trace_id)
    runtime_env = dict(spec.runtime_env)
    runtime_env["env_vars"] = env_vars
    return Submission(
        submission_id=copy_submission_id_from(state.submission_id, copy) or "",
        entrypoint=spec.entrypoint,
        runtime_env=runtime_env,
        # The driver runs on the copy's first volunteer, never on the head (which has no CPUs
        # for user work); the tiny amount of the node's own resource only pins it there.
        entrypoint_resources={f"node:{addresses[0]}": 0.001} if addresses else {},
        metadata={
            AIJOB_METADATA_KEY: f"{namespace}/{name}",
            "koinon.dev/attempt": str(state.attempts),
            "koinon.dev/copy": str(copy),
        },
    )


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# status.scheduling: per copy, submitted_digest of what the operator submits for it, recorded by
# the write that places the attempt: what a job found under the copy's id is compared with
# (foreign_submission), whatever the spec says by then.
PLACED_SUBMISSIONS = "submissionDigests"


def submitted_digest(entrypoint: str, runtime_env: object, metadata: object) -> str:
    """A digest of what Ray's job record echoes back of a submission: its entrypoint, its whole
    runtime_env (the spec's, with the KOINON_* env vars and TRACEPARENT the operator adds) and its
    metadata. Ray's record of a job submitted without a runtime_env or metadata says None: as {}.
    TRACEPARENT's trace-flags are in it as the placing process set them: matches_placed compares
    with each value they can have."""
    record = {"entrypoint": entrypoint, "runtime_env": runtime_env or {}, "metadata": metadata or {}}
    return hashlib.sha256(_canonical(record).encode()).hexdigest()[:32]


def digest_of(submission: Submission) -> str:
    return submitted_digest(submission.entrypoint, submission.runtime_env, submission.metadata)


# A W3C traceparent as telemetry.traceparent writes it: version, trace id, parent id, trace-flags.
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_TRACE_FLAGS = ("00", "01")  # what telemetry.traceparent sets: not sampled, sampled


def with_trace_flags(runtime_env: object, flags: str) -> object:
    """``runtime_env`` with its TRACEPARENT's trace-flags set to ``flags`` (unchanged where it has
    none of telemetry.traceparent's form). Those flags are the sampling decision of the operator
    process that built the submission (telemetry.root_sampled: its tracer provider and sampler),
    which a rollout or a new leader configured otherwise changes between the pass that places an
    attempt (and records its digests) and the one that submits or follows it: they take no part in
    telling the operator's own submission (foreign_submission); the trace and parent ids do."""
    if not isinstance(runtime_env, Mapping):
        return runtime_env
    env_vars = runtime_env.get("env_vars")
    if not isinstance(env_vars, Mapping):
        return runtime_env
    value = env_vars.get("TRACEPARENT")
    if not isinstance(value, str) or not _TRACEPARENT.fullmatch(value):
        return runtime_env
    return {**runtime_env, "env_vars": {**env_vars, "TRACEPARENT": value[:-2] + flags}}


def matches_placed(submitted: SubmittedAs, placed: str) -> bool:
    """Whether Ray's record ``submitted`` is what the placing write recorded digest ``placed`` of,
    whatever the trace-flags of either (with_trace_flags). The digest keeps its formula, the placing
    process's flags in it: statuses already written carry it, and an operator of the previous
    version, leading again during a rollout, reads those this one writes."""
    return any(
        submitted_digest(submitted.entrypoint, with_trace_flags(submitted.runtime_env, flags), submitted.metadata)
        == placed
        for flags in _TRACE_FLAGS
    )


def placed_submissions(state: AIJobStatus) -> list[str] | None:
    """The per-copy digests the placing write recorded (PLACED_SUBMISSIONS); None where it
    recorded none that fits the attempt (an operator before them placed it)."""
    digests = state.scheduling.get(PLACED_SUBMISSIONS)
    if not isinstance(digests, list) or len(digests) != state.copies:
        return None
    if not all(isinstance(digest, str) and digest for digest in digests):
        return None
    return [str(digest) for digest in digests]


def foreign_submission(
    expected: Submission, info: RayJobInfo, whole: bool = True, placed: str | None = None
) -> str | None:
    """What Ray's record of a job found under one of the attempt's submission ids has other than
    what this operator submits under that id (``expected``): the names of the fields that differ,
    or None when none does (or Ray's reply did not say what the job was submitted with).

    Anyone with the cluster's Ray token can submit under an id once it has seen it (a copy's id
    is listed by the head as soon as the attempt's first copy is submitted; a job that ended can
    be deleted and its id submitted again): a job that differs is no answer of the attempt's. One
    that does not runs what the operator would have run; where its driver ran is driver_elsewhere's
    to check (Ray 2.60 reports no entrypoint resources, the driver's pin: they, and the entrypoint's
    CPUs, GPUs and memory, are compared only where Ray reports them).

    ``placed``: the digest the placing write recorded for this copy (PLACED_SUBMISSIONS): Ray's
    entrypoint, runtime_env and metadata are compared with it, not with ``expected``'s, which is
    built from the spec as it is now. Without one (an attempt placed by an operator before them)
    they are compared with ``expected``'s, and with ``whole`` False (the spec was edited after the
    attempt was placed, so what the operator would submit now is not what it submitted then) only
    what comes from status is: the metadata (and the pin). Either way TRACEPARENT's trace-flags
    take no part (with_trace_flags): they are the sampling decision of whichever operator process
    built the submission, not of the job."""
    submitted = info.submitted
    if submitted is None:
        return None
    differs: list[str] = []
    if placed is not None:
        if not matches_placed(submitted, placed):
            differs.append(f"entrypoint, runtime_env or metadata ({PLACED_SUBMISSIONS})")
    else:
        if whole and submitted.entrypoint != expected.entrypoint:
            differs.append("entrypoint")
        # Whatever either's trace-flags (with_trace_flags): this process's tracing is not the submitter's.
        ours = _canonical(with_trace_flags(expected.runtime_env, _TRACE_FLAGS[0]))
        if whole and _canonical(with_trace_flags(submitted.runtime_env or {}, _TRACE_FLAGS[0])) != ours:
            differs.append("runtime_env")
        if _canonical(submitted.metadata or {}) != _canonical(expected.metadata):
            differs.append("metadata")
    reported_pin = submitted.entrypoint_resources
    if reported_pin is not None and _canonical(reported_pin) != _canonical(expected.entrypoint_resources):
        differs.append("entrypoint_resources")
    # Never set by the operator (Ray records 0): any other value reserves what the job did not ask for.
    for name in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory"):
        if getattr(submitted, name) not in (None, 0):
            differs.append(name)
    return ", ".join(differs) or None


# Ray could not start the driver with what was submitted (runtime_env of the wrong shape, a local
# working_dir, ...): raised while creating the job's supervisor, the same on every node.
SUPERVISOR_START_FAILURE = "JOB_SUPERVISOR_ACTOR_START_FAILURE"
# The runtime_env could not be set up on the node (a pip package that does not exist, say): most
# often the spec's doing, and an honest volunteer must not pay for a typo. Still retried (counted),
# since a node's broken network gives the same error.
RUNTIME_ENV_SETUP_FAILURE = "RUNTIME_ENV_SETUP_FAILURE"
# Ray's supervisor (on the driver's node) raised in its run(): most often while starting the
# entrypoint, Popen refusing the command (ValueError: a NUL byte, which parse_spec refuses first;
# the same on every node, so a rejection: _spec_refused_by_ray) or failing on the node (OSError: no
# fork, no log file). Ray reports any exception of run()'s try block so, though, also one raised
# while it polled or stopped the driver or wrote its end (the driver may have run). Either way: as
# for a runtime_env that failed to set up, the volunteer is charged only once another node has
# started the same spec (_settle_env_failures).
ENTRYPOINT_START_FAILURE = "JOB_ENTRYPOINT_COMMAND_START_ERROR"
# What failed before the job's own code ran, on the driver's node, for reasons the spec may cause.
DRIVER_NOT_STARTED = (RUNTIME_ENV_SETUP_FAILURE, ENTRYPOINT_START_FAILURE)


def ray_start_time(infos: Iterable[RayJobInfo | None]) -> datetime | None:
    """When the attempt started by Ray's record: the earliest start_time of its copies (Ray stamps
    it as it accepts a submission, whenever the operator looks). None when Ray recorded none."""
    starts = [info.start_time_ms for info in infos if info is not None and info.start_time_ms is not None]
    if not starts:
        return None
    return datetime.fromtimestamp(min(starts) / 1000, UTC)


@dataclass(frozen=True)
class NodeWork:
    """Work one node did in one attempt: its replicas' Ray run time."""

    hours: float
    """Hours of execution, one copy's run time per replica the node held (the scheduler's
    exposure: wall-clock hours per execution, as the simulator's ``record_work`` counts them)."""
    gpu_seconds: float
    """GPUs per replica times the same run time, in seconds."""


def attempt_work(
    copies: Iterable[tuple[Sequence[str], RayJobInfo | None]], gpus_per_replica: float, now_ms: float
) -> dict[str, NodeWork]:
    """Pure: per node, the work of an attempt's copies, each given as (its nodes, one per replica;
    Ray's record of it). A copy runs from Ray's start_time to its end_time, or to ``now_ms`` when
    Ray has recorded no end (stopped or lost in this very pass). A copy Ray never started (not
    submitted, or no start recorded) did no work; a node that did none is left out."""
    seconds: dict[str, float] = {}
    for nodes, info in copies:
        if info is None or info.start_time_ms is None:
            continue
        end_ms = info.end_time_ms if info.end_time_ms is not None else now_ms
        run_s = max(0.0, (end_ms - info.start_time_ms) / 1000.0)
        for node in nodes:
            seconds[node] = seconds.get(node, 0.0) + run_s
    gpus = max(0.0, float(gpus_per_replica))
    return {node: NodeWork(s / 3600.0, gpus * s) for node, s in seconds.items() if s > 0}


def lost_nodes(state: AIJobStatus, nodes: Iterable[RayNodeInfo]) -> list[str]:
    """The attempt's assigned nodes that Ray, by ``nodes``, no longer has alive: by the Ray node id
    recorded at placement where there is one, since a restarted agent (or raylet) brings up a new
    Ray node under the same name; by name otherwise."""
    listed = list(nodes)
    alive_names = {node_name(n) for n in listed if n.alive and not n.is_head}
    alive_ids = {n.node_id for n in listed if n.alive}
    recorded = dict(zip(state.assigned_nodes, state.ray_node_ids, strict=False))
    return [
        node
        for node in state.assigned_nodes
        if node not in alive_names or (recorded.get(node) and recorded[node] not in alive_ids)
    ]


def placed_ray_node(state: AIJobStatus, copy: int) -> str | None:
    """The Ray node id recorded at placement (status.rayNodeIds) for the copy's driver, its first
    node; None where none was (an attempt placed before they were recorded)."""
    node = next(iter(state.copy_nodes(copy)), None)
    return dict(zip(state.assigned_nodes, state.ray_node_ids, strict=False)).get(node or "") or None


def driver_elsewhere(state: AIJobStatus, copy: int, info: RayJobInfo) -> str | None:
    """The Ray node id recorded at placement for the copy's driver (its first node) when Ray says
    the driver ran on another Ray node, or that it ran but names no node; None when they match,
    when none was recorded, or when no driver ran.

    The driver is pinned by its node's `node:<address>` resource, which each raylet declares for
    itself: a driver that ran elsewhere was taken by another Ray node claiming that address (or
    the copy's agent restarted as a new Ray node before it was submitted). Its log, read from the
    node Ray names, is that node's answer, not the copy's owner's: one node could answer for two
    owners and make a quorum alone.

    Ray's supervisor records the driver's node as it marks the job RUNNING, before it starts the
    entrypoint (Ray 2.60 JobSupervisor.run), so the record of every job whose driver ran (one that
    SUCCEEDED, or any with a driver exit code) names it; only a job that failed before its driver
    started (its runtime_env not set up, its supervisor not started: Ray's job manager records
    those) or was stopped while PENDING names none, and neither gives an answer. A record that says
    the driver ran and names no node was not written so: it lives in GCS, where any holder of the
    cluster's Ray token can write it, and Ray would serve its log from whatever agent address it
    names (RayJobsClient.logs)."""
    recorded = placed_ray_node(state, copy)
    if not recorded:
        return None
    if info.driver_node_id:
        return None if info.driver_node_id == recorded else recorded
    ran = info.state is RayJobState.SUCCEEDED or info.driver_exit_code is not None
    return recorded if ran else None


@dataclass(frozen=True)
class CopyAnswer:
    """What one copy of an attempt answered, as its vote counts it (AIJobReconciler._answers)."""

    log: str | None  # its driver's log; None when not read, or gone with its node
    result: dict[str, Any] | None  # its declared result: only a copy that succeeded, with its log, on its own node
    misplaced: bool = False  # Ray ran its driver on another Ray node than the copy's own: no answer
    gone: str = LOG_GONE  # why a log that was to be read is None (LOG_GONE or LOG_UNSERVED)

    @property
    def digest(self) -> str | None:
        return self.result["digest"] if self.result is not None else None


@dataclass
class _SettlingLog:
    """A SUCCEEDED submission's log, served without a result line (AIJobReconciler._settling)."""

    first: float  # monotonic: the first pass of this process that found it so
    text: str  # as last served: what the operator has, should its node leave before it settles
    read_at: float  # monotonic: when ``text`` was served (settled when LOG_SETTLE_SECONDS after first)


@dataclass(frozen=True)
class _LogRead:
    """One read of a copy's driver log (AIJobReconciler._driver_log)."""

    text: str | None  # None: not had, for ``why``
    # Why ``text`` is None: LOG_GONE only when the driver's own node was seen gone (by its Ray node
    # id, or by the copy's first node, where Ray ran the driver, when Ray recorded none), else
    # LOG_UNSERVED.
    why: str = LOG_GONE
    # ``text`` is the log as served before its node left: it can grow no more, no settle wait.
    final: bool = False


@dataclass
class _UnservedLog:
    """Failed reads of one submission's driver log while its node lives (AIJobReconciler._unserved)."""

    first: float  # monotonic: this process's first failed read of it
    last: float  # monotonic: the latest
    failures: int


_Entry = TypeVar("_Entry")


def _drop_stale(table: dict[str, _Entry], now: float, since: Callable[[_Entry], float]) -> None:
    """Bounds a per-submission table before it takes another entry: once LOG_UNSERVED_KEPT are
    held, those untouched for LOG_UNSERVED_STALE_SECONDS go (live ones stay: evicting those made
    the longest-quiet, i.e. the next read, wait anew for ever)."""
    if len(table) >= LOG_UNSERVED_KEPT:
        for key in [k for k, entry in table.items() if now - since(entry) > LOG_UNSERVED_STALE_SECONDS]:
            del table[key]


@dataclass(frozen=True)
class _FinishedHere:
    """A job a pass of this process finished (AIJobReconciler._finished)."""

    uid: str
    submission: str  # the attempt it finished ("" when none was submitted)
    at: float  # monotonic


def earlier_votes(state: AIJobStatus) -> list[CopyResult]:
    """The answers of earlier attempts without a majority, judged again with this one's."""
    return [CopyResult(-1, node, owner, digest) for node, owner, digest in state.earlier_results]


def _ended_on_their_own(infos: Iterable[RayJobInfo | None]) -> bool:
    """Every copy ended in Ray by itself. A stopped one was stopped by this operator (a suspend
    whose status write was lost, a decided vote): not an end of its own."""
    return all(info is not None and info.state.terminal and info.state is not RayJobState.STOPPED for info in infos)


def copy_votes(state: AIJobStatus, answers: Sequence[CopyAnswer]) -> list[CopyResult]:
    """The attempt's votes for judge: one per copy, under its first (driver) node and its owner."""
    return [
        CopyResult(k, state.copy_nodes(k)[0], state.owner_of(state.copy_nodes(k)[0]), answer.digest)
        for k, answer in enumerate(answers)
    ]


def _spec_refused_by_ray(info: RayJobInfo) -> bool:
    """Ray could not create the job's supervisor, or its supervisor could not start the entrypoint,
    because of what was submitted: its check of the runtime_env, or Popen's of the command line,
    raised TypeError or ValueError (the traceback's last line). Other failures to start either (a
    GCS timeout while the head is busy, a node that cannot fork) are not the spec's, and are retried;
    so is a ValueError the supervisor raised anywhere but in Popen (_raised_by_popen)."""
    if info.error_type == ENTRYPOINT_START_FAILURE:
        if not _raised_by_popen(info.message):
            return False
    elif info.error_type != SUPERVISOR_START_FAILURE:
        return False
    return _raised(info.message).startswith(("TypeError:", "ValueError:"))


# A frame of a Python traceback as traceback.format_exc() writes it.
_TRACEBACK_FRAME = re.compile(r'^  File "(?P<file>[^"]*)", line \d+, in (?P<function>\S+)$')


def _last_traceback(message: str) -> tuple[list[tuple[str, str]], str]:
    """The (file, function) frames, outermost first, and the exception line of the last traceback
    in Ray's message (([], "") without one): that line is the first unindented one after the last
    "Traceback" header; a multi-line message (Ray's pip+conda ValueError) goes on below it."""
    lines = message.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return [], ""
    frames: list[tuple[str, str]] = []
    for line in lines[starts[-1] + 1 :]:
        if line and not line[0].isspace():
            return frames, line
        if found := _TRACEBACK_FRAME.match(line):
            frames.append((found["file"], found["function"]))
    return frames, ""


def _raised(message: str) -> str:
    """The exception line of the last traceback in Ray's message ("" without one)."""
    return _last_traceback(message)[1]


def _raised_by_popen(message: str) -> bool:
    """Whether the last traceback was raised starting the entrypoint: in subprocess (Popen) called
    from Ray 2.60's JobSupervisor._exec_entrypoint, every frame below that one in subprocess.py.
    Ray reports any exception of JobSupervisor.run's try block as JOB_ENTRYPOINT_COMMAND_START_ERROR,
    also one raised once the driver ran (polling it, stopping it, writing its end: a ValueError of
    int(RAY_JOB_STOP_WAIT_TIME_S), say): that one says nothing of the spec."""
    frames, _ = _last_traceback(message)
    entry = max((i for i, (_, function) in enumerate(frames) if function == "_exec_entrypoint"), default=None)
    below = frames[entry + 1 :] if entry is not None else []
    return bool(below) and all(re.split(r"[/\\]", file)[-1] == "subprocess.py" for file, _ in below)


# What of Ray's failure message the status, conditions and Events carry: Ray quotes up to 20,000
# characters of the driver's log after its reason, which pushed the operator's own words ("retrying
# (1/2)", "backoffLimit reached") out of every length limit; the log tail follows them anyway.
MAX_RAY_REASON = 400  # with the operator's words and the log tail, an Event stays under kopf's 1 KiB cut


def _ray_reason(message: str) -> str:
    reason = message.split(RAY_QUOTED_LOGS, 1)[0]
    return reason if len(reason) <= MAX_RAY_REASON else f"{reason[:MAX_RAY_REASON]}..."


def _env_set_up(info: RayJobInfo) -> bool:
    """The runtime_env was set up on the driver's node: the driver ran, whatever it did then."""
    return info.error_type is None and (info.state is RayJobState.SUCCEEDED or info.driver_exit_code is not None)


MAX_ENV_FAILURES_KEPT = 16


def _env_failed_nodes(state: AIJobStatus, digest: str) -> frozenset[str]:
    entries = state.scheduling.get("envSetupFailures") or ()
    return frozenset(
        str(e["node"]) for e in entries if isinstance(e, Mapping) and e.get("digest") == digest and e.get("node")
    )


# Nodes blamed for a failed attempt of a job, kept in its status.scheduling.failedNodes (newest
# last), and nodes lost mid-attempt, in lostNodes: bounded, as a job may retry up to
# backoffLimit=100 times, and fail over uncounted any number of times.
MAX_FAILED_NODES_KEPT = 16


def _failed_nodes(state: AIJobStatus) -> list[str]:
    """Nodes blamed for an earlier failed attempt of the job (status.scheduling.failedNodes), oldest
    first; entries not of that shape are skipped (a hand-edited status must not stop the job)."""
    entries = state.scheduling.get("failedNodes")
    if not isinstance(entries, list):
        return []
    return list(dict.fromkeys(e for e in entries if isinstance(e, str) and e))


# status.scheduling: the most verification copies any attempt of the job was placed with, carried
# from placement to placement; later attempts run at least as many (_place). Absent in statuses
# written before it: those draw the spot-check coin for each attempt, as they did.
CHECKED_COPIES = "checkedCopies"


# How far apart (Ray's end times) the copies of an attempt found stopped may have ended for the
# node of one that has left to count as lost (_judge): _node_lost stops them all in one pass; a
# volunteer that stopped another's copy, ran its own on until that node went home, then stopped its
# own, left them hours apart. Generous: a retried pass, or Ray's own wait before it kills a driver.
STOPPED_TOGETHER_MS = 300_000


def _stopped_together(infos: Sequence[RayJobInfo]) -> bool:
    """Every copy was found stopped, each within STOPPED_TOGETHER_MS of the others (where Ray's
    records name no end time, that is taken as so: Ray stamps every job it ends)."""
    if not infos or any(info.state is not RayJobState.STOPPED for info in infos):
        return False
    ends = [info.end_time_ms for info in infos if info.end_time_ms is not None]
    return not ends or max(ends) - min(ends) <= STOPPED_TOGETHER_MS


def _checked_copies(state: AIJobStatus) -> int:
    """status.scheduling.checkedCopies: 1 where absent, or not a positive whole number (a
    hand-edited status must not stop the job)."""
    value = state.scheduling.get(CHECKED_COPIES)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def _user_error(info: RayJobInfo) -> bool:
    """The job's fault, not the volunteer's: the driver exited with its own non-zero code, or Ray
    could not start it with the job's runtime_env or entrypoint."""
    return info.driver_exit_code not in (None, 0) or info.error_type in (SUPERVISOR_START_FAILURE, *DRIVER_NOT_STARTED)


EARLIER_RESULT_NOT_KEPT = (
    "the accepted answer is an earlier attempt's, whose result (but for its digest) this job's status does not keep"
)


def accepted_result(
    verdict: Verdict, results: Mapping[str, Mapping[str, Any]], kept: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any] | None:
    """The result to report for an accepted verdict (None: not accepted): the one of an agreeing
    copy of this attempt, else the one kept with an agreeing earlier answer (kept_answers): a
    majority can be made of earlier answers alone (judge counts their owners, not their failed
    copies). Where none was kept (a status an older operator wrote), the accepted digest only."""
    if verdict.accepted_digest is None:
        return None
    for node in verdict.agreeing:
        if node in results:
            return dict(results[node])
    for node in verdict.agreeing:
        result = kept.get(node)
        if result is not None and result.get("digest") == verdict.accepted_digest:
            return dict(result)
    return {"digest": verdict.accepted_digest, "unavailable": EARLIER_RESULT_NOT_KEPT}


def kept_answers(
    entries: list[dict[str, Any]],
    answered: Sequence[CopyResult],
    results: Mapping[str, Mapping[str, Any]],
    kept: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """``entries`` (verification.earlierResults for ``answered``, in its order) with the result of
    one answer of the digest a strict majority of ``answered``'s owners gave, if one did, kept on
    its entry (``result``): only that digest can win a later vote without an agreeing copy of that
    attempt (its earlier votes must then outnumber every other owner's, the earlier ones included),
    and that vote must report it (accepted_result). One result, however many reruns add entries.
    The result comes from this attempt's copies (``results``) or is the one kept before."""
    leading = judge((), answered).accepted_digest
    if leading is None:
        return entries
    for i, vote in enumerate(answered):
        if vote.digest != leading:
            continue
        result = results.get(vote.node) or kept.get(vote.node)
        if result is not None and result.get("digest") == leading:
            return [*entries[:i], {**entries[i], "result": dict(result)}, *entries[i + 1 :]]
    return entries


def agreeing_earlier(agreeing: Sequence[str], this_attempt: Mapping[str, object]) -> str:
    """ ", with N earlier answers" for the agreeing nodes of earlier attempts (none: "")."""
    earlier = sum(node not in this_attempt for node in agreeing)
    return f", with {earlier} earlier answer{'s' if earlier != 1 else ''}" if earlier else ""


def _exited_on_its_own(info: RayJobInfo) -> bool:
    """The driver exited with a code of its own (> 0), not killed by a signal (< 0): a node that
    shuts down kills its driver, and that failure is the node's leaving, not the job's."""
    return info.driver_exit_code is not None and info.driver_exit_code > 0


# Terminal escape sequences (colours, cursor moves: Ray's and many libraries' log output) and the
# other control characters but tab and line breaks: kubectl, Events and tracing backends show them
# as garbage.
_TERMINAL_CONTROLS = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
)


def log_tail(logs: str, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a driver's log, as plain text (status and Events show it)."""
    return "\n".join(_TERMINAL_CONTROLS.sub("", logs.rstrip()).splitlines()[-lines:])


def extract_result(logs: str) -> dict[str, Any]:
    """The job's declared result (last line starting with ``KOINON_RESULT ``) and its digest.

    Without a declared result the digest covers the whole log, which is weaker (timestamps differ
    between replicas), so examples declare one.
    """
    declared = [line[len(RESULT_MARKER) :] for line in logs.splitlines() if line.startswith(RESULT_MARKER)]
    value = declared[-1].strip() if declared else None
    digest_input = value if value is not None else logs
    result: dict[str, Any] = {
        "digest": "sha256:" + hashlib.sha256(digest_input.encode()).hexdigest(),
        "logTail": log_tail(logs)[-4000:],
    }
    if value is not None:
        result["value"] = value[:2048]
    return result


class Ledger:
    """Capacity held by AIJobs.

    The authoritative record is each AIJob's status (seen through a kopf index, which is complete
    before handlers start, so a restarted operator knows every allocation). Decisions taken in this
    process are also kept here until the watch reflects them, so two jobs admitted in the same
    instant never take the same GPUs.
    """

    def __init__(self) -> None:
        self._local: dict[str, Allocation | None] = {}

    def reserve(self, key: str, allocation: Allocation) -> None:
        self._local[key] = allocation

    def release(self, key: str) -> None:
        self._local[key] = None

    def forget(self, key: str) -> None:
        self._local.pop(key, None)

    def clear(self) -> None:
        self._local.clear()

    def current(self, recorded: Mapping[str, Allocation], excluding: str | None = None) -> list[Allocation]:
        """What every job holds; ``excluding`` a job being placed, whose new placement replaces
        whatever it held (its own reservation must not make it look full to itself).

        Local decisions the index (``recorded``) reflects are dropped here: from then on the job's
        status is the record. Kept until its deletion handler ran, a reservation outlived a job
        whose object went without that handler running here (its finalizer removed by hand), and
        its GPUs stayed booked until this process restarted or lost the Lease."""
        self._local = {
            key: allocation
            for key, allocation in self._local.items()
            # A reservation stays until the index shows that very allocation; a release (None) only
            # while the index still lists an allocation of the job for it to hide.
            if (recorded.get(key) != allocation if allocation is not None else key in recorded)
        }
        merged: dict[str, Allocation | None] = dict(recorded)
        merged.update(self._local)
        merged.pop(excluding, None)  # type: ignore[arg-type]
        return [allocation for allocation in merged.values() if allocation is not None]


@dataclass
class RayBackoff:
    """Per-job exponential backoff while Ray is unreachable (no phase changes meanwhile)."""

    base_seconds: float = 1.0
    max_seconds: float = 30.0
    _failures: dict[str, int] = field(default_factory=dict)
    _next_try: dict[str, float] = field(default_factory=dict)

    def ready(self, key: str, now: float) -> bool:
        return now >= self._next_try.get(key, float("-inf"))

    def failed(self, key: str, now: float) -> float:
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        delay: float = min(self.max_seconds, self.base_seconds * 2.0 ** (count - 1))
        self._next_try[key] = now + delay
        return delay

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)
        self._next_try.pop(key, None)

    def forget(self, key: str) -> None:
        """The job is gone (deleted): nothing of it is retried, and nothing of it is kept."""
        self.succeeded(key)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class AIJobReconciler:
    ray: RayJobsClient
    placer: Placer
    nodes: RayNodeCache
    ledger: Ledger = field(default_factory=Ledger)
    backoff: RayBackoff = field(default_factory=RayBackoff)
    clock: Callable[[], datetime] = _utcnow
    monotonic: Callable[[], float] = time.monotonic
    placement_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    allow_bare_ray_workers: bool = False  # OperatorConfig's: unlabelled Ray nodes take AIJobs
    # The nonce of each attempt's submission ids, from (uid, attempt): keyed_submission_nonce. The
    # operator keys it with its Secret (handlers.configure); this default, a key of this object's
    # own, would name other ids after a restart (tests that need ids of their own pass one).
    submission_nonce: Callable[[str, int], str] = field(
        default_factory=lambda: keyed_submission_nonce(secrets.token_bytes(32))
    )
    # Per job: the resourceVersion of the body the last status write was computed from, and when.
    _written_from: dict[str, tuple[str, float]] = field(default_factory=dict)
    _job_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    # Uids of jobs whose deletion handler ran (and when, on the monotonic clock): a pass still
    # queued behind it must not start anything. Forgotten after STOPPED_KEPT_S, as nothing of the
    # job is left to run a pass by then; kept for ever, a long-lived operator grew by every job.
    _stopped: dict[str, float] = field(default_factory=dict)
    # Per job: a pass of this process finished it (Succeeded or Failed): its uid, the attempt's
    # submission and when. A deletion handler that waited for that pass judges from an older body,
    # which still says that attempt runs. Dropped when that write is discarded, and after
    # STOPPED_KEPT_S.
    _finished: dict[str, _FinishedHere] = field(default_factory=dict)
    # Per job with a pass in flight: whether that pass may still act on Ray (reconcile's may_act).
    _may_act: dict[str, Callable[[], bool]] = field(default_factory=dict)
    # Per Ray submission: the failing reads of its driver log while its node lives (_driver_log).
    # Dropped on a read that succeeds, when the job is stopped or finished, on a change of leader,
    # and (beyond LOG_UNSERVED_KEPT) when not read for LOG_UNSERVED_STALE_SECONDS.
    _unserved: dict[str, _UnservedLog] = field(default_factory=dict)
    # Per Ray submission: when (monotonic) a pass first found it SUCCEEDED with its log served but
    # no result line in it yet, and that log as last served (_logs_settled). Dropped as _unserved is.
    _settling: dict[str, _SettlingLog] = field(default_factory=dict)
    # Per job: the attempt (its submission id and recorded copies) this process last looked for
    # stray copies of in Ray (_stop_strays). Dropped on delete and on a change of leader.
    _swept: dict[str, tuple[str, int]] = field(default_factory=dict)
    # Per Pending job: the attempt (its submission id and recorded copies) whose copies this process
    # stopped (or found ended) before placing the next one (_stop_left_attempt), so that a job left Pending
    # (Unschedulable) does not ask Ray to stop them again at every pass. Dropped once the job is
    # seen in another phase, on delete and on a change of leader.
    _left_stopped: dict[str, tuple[str, int]] = field(default_factory=dict)

    async def reconcile(
        self,
        body: Mapping[str, Any],
        recorded_allocations: Mapping[str, Allocation],
        volunteers: Mapping[str, Mapping[str, Any]],
        may_act: Callable[[], bool] = lambda: True,
    ) -> Outcome:
        """One pass over ``body``. ``may_act``: whether this process still leads in the term the
        pass began in; asked right before each Ray submission, and a pass that may no longer act
        ends there and writes nothing (the caller's check after the pass discards its status, but
        a submission cannot be taken back: the new leader may have let the job go meanwhile, its
        deletion handler finding nothing to stop, and the late submission would run for nobody)."""
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        version = meta.get("resourceVersion")
        if self._behind_own_write(key, version):
            return Outcome()
        # One pass or stop at a time per job: kopf runs the deletion handler while a timer pass that
        # began before the deletion may still be submitting; stop() waits for it, then stops that.
        async with self._job_lock(key):
            if str(meta.get("uid") or "") in self._stopped:
                return Outcome()  # deleted meanwhile: nothing more to start
            self._may_act[key] = may_act
            try:
                outcome = await self._reconcile(body, recorded_allocations, volunteers)
            except _LeaseLost as lost:
                logger.warning("%s: %s; the pass ends without submitting or writing", key, lost)
                return Outcome()
            finally:
                self._may_act.pop(key, None)
        current = body.get("status") or {}
        if current.get("phase"):
            # Every pass has looked at the latest spec, even one that changes nothing else.
            outcome.status.setdefault("observedGeneration", meta.get("generation"))
            # The conditions too: kubectl wait ignores a condition whose observedGeneration is
            # behind metadata.generation, so a finished job edited later (a TTL added, a manifest
            # applied again) never met `--for=condition=Complete` again.
            conditions = outcome.status.get("conditions", current.get("conditions")) or []
            generation = meta.get("generation")
            if generation is not None and any(
                "observedGeneration" in c and c["observedGeneration"] != generation for c in conditions
            ):
                outcome.status["conditions"] = [
                    {**c, "observedGeneration": generation} if "observedGeneration" in c else c for c in conditions
                ]
        outcome.status = changed_fields(current, outcome.status)
        if outcome.status and version:
            self._written_from[key] = (str(version), self.monotonic())
        if outcome.status.get("phase") in (Phase.SUCCEEDED, Phase.FAILED):
            now = self.monotonic()
            if len(self._finished) >= FINISHED_KEPT:  # jobs that finish and are never deleted
                for old in [k for k, seen in self._finished.items() if now - seen.at > STOPPED_KEPT_S]:
                    del self._finished[old]
            submission = str(current.get("submissionId") or "")
            self._finished[key] = _FinishedHere(str(meta.get("uid") or ""), submission, now)
            self._forget_log_waits(str(meta.get("uid") or ""))
        return outcome

    def _behind_own_write(self, key: str, version: object) -> bool:
        """Whether ``version`` is the very body this process last wrote status from: the watch has
        not delivered that write yet (a kopf timer acts on the last body it saw), and acting on the
        old status again would repeat the last pass (place again, count again). A write that never
        landed is acted on again after STALE_BODY_GRACE_SECONDS."""
        written = self._written_from.get(key)
        if written is None or not version:
            return False
        if str(version) != written[0] or self.monotonic() - written[1] >= STALE_BODY_GRACE_SECONDS:
            del self._written_from[key]  # the watch caught up (or the write never landed)
            return False
        logger.debug("%s: body %s predates this operator's last status write; pass skipped", key, version)
        return True

    async def _reconcile(
        self,
        body: Mapping[str, Any],
        recorded_allocations: Mapping[str, Allocation],
        volunteers: Mapping[str, Mapping[str, Any]],
    ) -> Outcome:
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        uid = str(meta.get("uid") or "")
        generation = meta.get("generation")
        raw_status: Mapping[str, Any] = body.get("status") or {}
        state = AIJobStatus.from_status(raw_status)
        now = self.clock()
        outcome = Outcome()
        writer = _StatusWriter(outcome, raw_status, generation, format_time(now))

        if state.phase is None and uid:
            writer.set(traceId=trace_id_for(uid))  # a job refused at once is traced too
        try:
            spec, tolerated = self._ratchet(body.get("spec") or {}, state)
        except SpecError as error:
            if state.phase is not None and state.phase.finished:
                # Still cleaned up after ttlSecondsAfterFinished (read on its own: the rest of the
                # spec is what could not be parsed), or a job that failed as invalid stayed for good.
                ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
                if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl >= 0:
                    self.ledger.forget(key)
                    if state.completion_time is not None and (now - state.completion_time).total_seconds() >= ttl:
                        outcome.delete = True
                        outcome.event("Deleted", f"ttlSecondsAfterFinished={ttl} passed")
                return outcome
            try:
                if state.phase is not None and state.phase.holds_nodes and state.submission_id:
                    # Edited into a spec this operator cannot act on while it runs: stop what it
                    # started, or its Ray job would run on and its capacity stay held.
                    await self._stop_copies(state)
                elif state.phase is Phase.PENDING:
                    # Failed now, the attempt a late write left running would never be stopped.
                    await self._stop_left_attempt(key, uid, state)
            except RayUnavailableError as stop_error:
                return self._ray_unavailable(key, uid, writer, stop_error, outcome)
            self._finish(key, writer, outcome, Phase.FAILED, "InvalidSpec", str(error))
            # As at the end of every other pass that met no Ray error: finished, the job is never
            # reconciled with Ray again, and a RayReachable=False of an earlier outage would stay.
            self._ray_reached(writer)
            await self._record_work(key, body, state, outcome)
            return outcome

        if state.phase is None:
            writer.set(attempts=0, failures=0, traceId=trace_id_for(uid))
            writer.phase(Phase.PENDING, "Accepted", "waiting for placement")
            outcome.event("Accepted", f"accepted: {spec.replicas} replica(s) x {spec.resources.gpus} GPU(s)")
            state = AIJobStatus(phase=Phase.PENDING)

        if state.phase is not None and state.phase.finished:
            self.ledger.forget(key)
            if self._ttl_expired(spec, state, now):
                outcome.delete = True
                outcome.event("Deleted", f"ttlSecondsAfterFinished={spec.ttl_seconds_after_finished} passed")
            return outcome

        # By uid, as _stopped: an AIJob created again under the same name is another job, and must
        # not wait out the backoff of the one deleted while Ray was away.
        if not self.backoff.ready(uid or key, self.monotonic()):
            return outcome
        try:
            creation = parse_time(meta.get("creationTimestamp"))
            creation_index = int(creation.timestamp()) if creation else 0
            await self._advance(
                key, uid, spec, state, writer, outcome, recorded_allocations, volunteers, creation_index
            )
        except RayUnavailableError as error:
            return self._ray_unavailable(key, uid, writer, error, outcome)
        if tolerated is not None:
            self._warn_tolerated(tolerated, spec, state, writer, outcome)
        self._defer_edit(spec, state, writer, outcome)
        self.backoff.succeeded(uid or key)
        await self._record_work(key, body, state, outcome, spec)
        self._ray_reached(writer)
        return outcome

    @staticmethod
    def _ray_reached(writer: _StatusWriter) -> None:
        """RayReachable back to True after an outage, once a pass got through its Ray calls."""
        if writer.has_condition_false(ConditionType.RAY_REACHABLE):
            writer.condition(ConditionType.RAY_REACHABLE, True, "RayAvailable", "Ray dashboard reachable")

    @staticmethod
    def _ratchet(raw_spec: Mapping[str, Any], state: AIJobStatus) -> tuple[AIJobSpec, SpecError | None]:
        """The spec, and a refusal of a ratcheted check (aijob.parse_spec_ratcheting) it is let
        through with; raises SpecError for what the job cannot run with.

        As Kubernetes' validation ratcheting: the newer refusals apply to a job never placed
        (attempts 0: phase None, or Pending, Suspended before its first placement) and to an
        edit of one that was, but not to a spec an earlier operator placed and that nobody has
        edited since (its submitted digest, status.scheduling.specDigest, unchanged, and so its
        regions, status.scheduling.regionsDigest, which a ratcheted check reads and
        submission_digest leaves out; a digest the placing operator did not record counts as
        unchanged: its regions can be told edited only from this operator's first placement on).
        That job runs on, with a Warning Event
        (_warn_tolerated): stopping it on an operator upgrade would kill work its owner was told
        was accepted. An edit that leaves the refused value in place (or puts one there) is
        checked as any invalid edit is: a job that holds nodes has its Ray copies stopped and
        fails InvalidSpec. The running attempt would be unaffected by the edit, but its next
        attempt would run the refused spec, and the owner who just edited it is the one to tell,
        now, rather than at some retry hours later; the rule is the one the other checks follow."""
        spec, refusal = parse_spec_ratcheting(raw_spec)
        if refusal is None:
            return spec, None
        recorded = state.scheduling.get("specDigest")
        recorded_regions = state.scheduling.get(PLACED_REGIONS)
        placed_before = state.attempts > 0 or bool(state.submission_id)
        unedited = (not recorded or recorded == submission_digest(spec)) and (
            not recorded_regions or recorded_regions == regions_digest(spec)
        )
        if placed_before and unedited:
            return spec, refusal
        raise refusal

    @staticmethod
    def _warn_tolerated(
        refusal: SpecError, spec: AIJobSpec, state: AIJobStatus, writer: _StatusWriter, outcome: Outcome
    ) -> None:
        """One Warning Event per spec (by digest) that _ratchet let through, naming the field;
        status.scheduling keeps the digest it was given for, across passes and operator restarts."""
        digest = submission_digest(spec)
        written = outcome.status.get("scheduling")
        scheduling = written if isinstance(written, Mapping) else state.scheduling
        if scheduling.get(TOLERATED_SPEC) == digest:
            return
        if state.scheduling.get(TOLERATED_SPEC) != digest:
            outcome.event(
                "InvalidSpecTolerated",
                f"{refusal}. This operator refuses such a spec for a new job; this one was placed before "
                "it did and runs on as submitted. An edit of the spec must fix it.",
                warning=True,
            )
        # Again where this pass rewrote status.scheduling whole (a new placement): or it warned again.
        writer.scheduling(state.scheduling, **{TOLERATED_SPEC: digest})

    @staticmethod
    def _defer_edit(spec: AIJobSpec, state: AIJobStatus, writer: _StatusWriter, outcome: Outcome) -> None:
        """One Normal Event per edited spec (by digest) that the running attempt does not run: an
        edit of what it was submitted with (status.scheduling.specDigest) applies from the next
        attempt, and there is none if this one succeeds. observedGeneration moves on at once (every
        pass looks at the latest spec), so without this a `kubectl apply` said "configured" and
        nothing told that the result to come is of the spec before it. status.scheduling keeps the
        digest it was given for, across passes and operator restarts (as _warn_tolerated)."""
        if state.phase is None or not state.phase.holds_nodes or not state.submission_id:
            return
        if "attempts" in outcome.status:
            return  # this pass placed a new attempt: it runs the spec as edited
        written = outcome.status.get("phase")
        if written is not None and (written not in Phase._value2member_map_ or not Phase(written).holds_nodes):
            return  # the attempt ended in this pass (a success says which spec it ran: _ran_spec_note)
        placed = state.scheduling.get("specDigest")
        digest = submission_digest(spec)
        if not placed or placed == digest:
            return  # unedited, an edit the attempt is unaffected by, or one an older operator placed
        current = outcome.status.get("scheduling")
        scheduling = current if isinstance(current, Mapping) else state.scheduling
        if scheduling.get(DEFERRED_SPEC) == digest:
            return
        ran = (
            f"generation {state.attempt_generation}'s spec"
            if state.attempt_generation is not None
            else "the spec it was placed with"
        )
        outcome.event(
            "SpecChangeDeferred",
            f"generation {writer.generation} changes entrypoint, runtimeEnv, replicas or resources; running "
            f"attempt {state.attempts} keeps {ran}, and the change applies from the next attempt, if "
            "there is one (none if this one succeeds)",
        )
        writer.scheduling(state.scheduling, **{DEFERRED_SPEC: digest})

    async def _record_work(
        self, key: str, body: Mapping[str, Any], state: AIJobStatus, outcome: Outcome, spec: AIJobSpec | None = None
    ) -> None:
        """When this pass ends the attempt ``state`` ran (succeeded, failed, stopped, its node
        lost, suspended, past its deadline: it no longer holds its nodes), the work of its Ray
        copies goes into ``outcome.work``. Ray is asked again after the pass, so copies this pass
        stopped are counted up to now."""
        if state.phase is None or not state.phase.holds_nodes or not state.submission_id:
            return
        written = outcome.status.get("phase")
        try:
            still_holds = written is None or Phase(written).holds_nodes
        except ValueError:  # not a phase of ours: nothing this pass ended
            still_holds = True
        if still_holds:
            return
        try:
            # A job someone else submitted under an id of the attempt's did no work of its nodes.
            infos = (
                await self._copies_in_ray(key, spec, state)
                if spec is not None
                else [await self.ray.get(submission_id) for submission_id in ray_submissions_of(state)]
            )
        except RayUnavailableError as error:  # the job's own outcome is written all the same
            logger.warning("%s: work of attempt %s not recorded, Ray unavailable: %s", key, state.attempts, error)
            return
        copies = [(state.copy_nodes(k), info) for k, info in enumerate(infos)]
        outcome.work = attempt_work(copies, _gpus_per_replica(body, state), self.clock().timestamp() * 1000)

    def _ray_unavailable(
        self, key: str, uid: str, writer: _StatusWriter, error: Exception, outcome: Outcome
    ) -> Outcome:
        delay = self.backoff.failed(uid or key, self.monotonic())
        writer.condition(ConditionType.RAY_REACHABLE, False, "RayUnavailable", f"{error}; retrying in {delay:.0f}s")
        logger.warning("Ray unavailable while reconciling %s; retry in %.0fs: %s", key, delay, error)
        return outcome

    def discard_write(self, key: str) -> None:
        """The pass's outcome was not written (its lease ran out): nothing to wait for the watch
        to show, so the next pass must not skip the body as superseded by it."""
        self._written_from.pop(key, None)
        self._finished.pop(key, None)  # not finished as far as anyone knows: a later pass may run it

    def forget_memory(self) -> None:
        """Drops what this process decided on its own (reservations the watch has not shown yet,
        backoffs, a placer's waiting list): on a change of leader, the
        jobs' statuses are the record, and another operator may have changed them meanwhile."""
        self.ledger.clear()
        # _written_from stays: skipping a body this process's own write has superseded is safe in
        # any term (another operator's write changes the resourceVersion, which ends the skip).
        self.backoff = RayBackoff()
        self._finished.clear()  # another leader may have run the jobs again since
        # A new term reads again before giving up: this process did not look meanwhile, and one
        # failed read after the gap must not end a wait that began before it.
        self._unserved.clear()
        self._settling.clear()
        self._swept.clear()  # another leader may have placed attempts again meanwhile
        self._left_stopped.clear()  # and written their statuses
        forget = getattr(self.placer, "forget_waiting", None)
        if callable(forget):
            forget()

    async def stop(self, body: Mapping[str, Any]) -> bool:
        """Stop the job's Ray job (on delete); True when there was one to stop. Waits for a pass
        of this job in flight, and stops what that pass may have submitted too (the body kopf
        hands the deletion handler predates it)."""
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        lock = self._job_lock(key)
        async with lock:
            # By uid: an AIJob created again under the same name is another job.
            now = self.monotonic()
            for old in [uid for uid, when in self._stopped.items() if now - when > STOPPED_KEPT_S]:
                del self._stopped[old]
            uid = str(meta.get("uid") or "")
            self._stopped[uid] = now
            self.backoff.forget(uid or key)
            self._forget_log_waits(uid)
            state = AIJobStatus.from_status(body.get("status"))
            self.ledger.forget(key)
            self._written_from.pop(key, None)
            self._swept.pop(key, None)
            # A pass of this process finished the job (the pass this waited for, maybe, which the
            # body predates): that pass stopped what ran; there is nothing to stop or to report.
            finished = self._finished.pop(key, None)
            finished_here = (
                finished is not None
                and finished.uid == uid
                and finished.submission == (state.submission_id or "")
                and now - finished.at <= STOPPED_KEPT_S
            )
            stopped = bool(
                not finished_here and state.submission_id and state.phase is not None and state.phase.holds_nodes
            )
            try:
                if stopped:
                    await self._stop_copies(state)
                elif not finished_here and state.phase is Phase.PENDING:
                    # A Pending job holds no nodes, but a late status write may have left the attempt
                    # its status names running (_stop_left_attempt); deleted, nothing would stop it.
                    # RayUnavailableError reaches the deletion handler, which keeps the finalizer.
                    stopped = await self._stop_left_attempt(key, uid, state)
            finally:
                self._left_stopped.pop(key, None)  # after it: one this process found ended is not read again
        if self._job_locks.get(key) is lock and not lock.locked():
            del self._job_locks[key]
        return stopped

    def _forget_log_waits(self, uid: str) -> None:
        """Drops the failing log reads and settle waits of every submission of job ``uid`` (stopped,
        or finished)."""
        if not uid:
            return
        prefix = f"{SUBMISSION_PREFIX}-{uid}-"  # as submission_id_for: its attempts and their copies
        for submission_id in [s for s in self._unserved if s.startswith(prefix)]:
            del self._unserved[submission_id]
        for submission_id in [s for s in self._settling if s.startswith(prefix)]:
            del self._settling[submission_id]

    def _job_lock(self, key: str) -> asyncio.Lock:
        return self._job_locks.setdefault(key, asyncio.Lock())

    async def _stop_copies(self, state: AIJobStatus) -> None:
        for submission_id in ray_submissions_of(state):
            await self.ray.stop(submission_id)
        await self._stop_strays_of_left_attempt(state)

    async def _stop_strays_of_left_attempt(self, state: AIJobStatus) -> bool:
        """Stops copies beyond those the status records (a placement again from an older body that
        drew fewer: _stop_strays), which a suspend, a delete, a deadline, an invalid edit or the next
        attempt may come before any pass swept for: once the attempt is left, nothing would stop
        them. Only an attempt that drew, or must keep, more than one copy can have them. True when
        it stopped one."""
        if state.submission_id and (state.copies > 1 or _checked_copies(state) > 1):
            return await self._stop_copies_beyond_recorded(state, MAX_QUORUM)
        return False

    async def _stop_copies_beyond_recorded(self, state: AIJobStatus, most: int) -> bool:
        """Stops the Ray jobs found running under the attempt's copy ids beyond the copies its
        status records (``<id>-copy<k>``, k below ``most``); True when it stopped one."""
        stopped = False
        for k in range(max(1, state.copies), most):
            submission_id = copy_submission_id_from(state.submission_id, k)
            info = await self.ray.get(submission_id) if submission_id is not None else None
            if submission_id is None or info is None or info.state.terminal:
                continue
            logger.warning(
                "Ray job %s (%s) is copy %d of attempt %d, which its status places with %d "
                "(placed again from an older body?); stopping it",
                submission_id,
                info.state.value,
                k,
                state.attempts,
                state.copies,
            )
            await self.ray.stop(submission_id)
            stopped = True
        return stopped

    # ----------------------------------------------------------------- internals

    async def _advance(
        self,
        key: str,
        uid: str,
        spec: AIJobSpec,
        state: AIJobStatus,
        writer: _StatusWriter,
        outcome: Outcome,
        recorded_allocations: Mapping[str, Allocation],
        volunteers: Mapping[str, Mapping[str, Any]],
        creation_index: int,
    ) -> None:
        now = self.clock()
        phase = state.phase
        if phase is Phase.PENDING:
            # Before anything else a Pending job may come to (a suspend writes submissionId away, a
            # backoffLimit lowered or a deadline finishes it), not only before a placement: past
            # those, no status would name the attempt a late write left running.
            await self._stop_left_attempt(key, uid, state)
        else:
            # Whatever it stopped may have been submitted again since (a write placing that very
            # attempt landed late): a later Pending naming it stops it again.
            self._left_stopped.pop(key, None)
        if phase in (Phase.SCHEDULED, Phase.RUNNING) and state.submission_id and state.start_time is None:
            # The run's start by Ray's record, before the deadline is judged (a suspend's too): an operator that was
            # down when the job started (or ran and ended) must not count it from when it looked.
            started = ray_start_time(await self._copies_in_ray(key, spec, state))
            if started is not None:
                writer.set(startTime=format_micro_time(started))
                state = replace(state, start_time=started)

        overran = (
            spec.active_deadline_seconds is not None
            and state.start_time is not None
            and (now - state.start_time).total_seconds() > spec.active_deadline_seconds
            and not await self._ended_within_deadline(key, spec, state)
        )
        if spec.suspend:
            # A suspend stops running work; it never throws away work that has ended (a Kubernetes
            # Job that completed stays Complete): an attempt whose copies ended before the
            # operator saw the suspend is concluded as it would be without it.
            infos = (
                await self._copies_in_ray(key, spec, state)
                if phase in (Phase.SCHEDULED, Phase.RUNNING) and state.submission_id
                else []
            )
            if overran and infos and _ended_on_their_own(infos):
                # Ended, but after its deadline: without the suspend it fails so, and so it does.
                self._deadline_exceeded(key, spec, writer, outcome)
                return
            if (
                infos
                and not overran  # still running past its deadline: suspended, the deadline starts over
                and await self._conclude_if_ended(key, spec, state, infos, writer, outcome)
            ):
                written = outcome.status.get("phase")
                if written is None or Phase(written).finished:
                    return  # concluded, or concluded once its logs can be read
                # Concluded into another attempt (a retry, a rerun): that one is suspended.
            if phase is not None and phase.holds_nodes and state.submission_id:
                await self._stop_copies(state)
            if phase is not Phase.SUSPENDED:
                self.ledger.release(key)
                # startTime goes too, as a Kubernetes Job's does: activeDeadlineSeconds counts
                # from the resumed run, not across the time the job was suspended.
                writer.set(assignedNodes=[], submissionId=None, startTime=None)
                writer.phase(Phase.SUSPENDED, "Suspended", "spec.suspend is true")
                writer.condition(ConditionType.SUSPENDED, True, "Suspended", "spec.suspend is true")
                outcome.event("Suspended", "job suspended; its Ray job (if any) was stopped")
            return
        if phase is Phase.SUSPENDED:
            writer.condition(ConditionType.SUSPENDED, False, "Resumed", "spec.suspend is false")
            writer.phase(Phase.PENDING, "Resumed", "waiting for placement")
            outcome.event("Resumed", "job resumed")
            phase = Phase.PENDING

        if overran:
            if state.submission_id:
                await self._stop_copies(state)
            self._deadline_exceeded(key, spec, writer, outcome)
            return

        if phase is Phase.PENDING:
            if state.failures > spec.backoff_limit:
                # backoffLimit lowered below the failures so far while the job waited to retry: a
                # Kubernetes Job checks its limit on every sync, not only when a pod fails, and so
                # does this. Nothing of the job runs while it is Pending; _finish releases its hold.
                self._finish(
                    key,
                    writer,
                    outcome,
                    Phase.FAILED,
                    "BackoffLimitExceeded",
                    f"{state.failures} failed attempt(s), more than backoffLimit={spec.backoff_limit}; "
                    "no further attempt",
                )
                return
            if state.verification_reruns > spec.backoff_limit:
                # The same for the reruns after copies without a majority, which backoffLimit also
                # bounds (_conclude_verified): lowered below them while the job waits to rerun, another
                # whole replicated attempt (quorum x replicas volunteers) must not be placed.
                self._finish(
                    key,
                    writer,
                    outcome,
                    Phase.FAILED,
                    "NoMajority",
                    f"{state.verification_reruns} rerun(s) after copies without a majority, more than "
                    f"backoffLimit={spec.backoff_limit}; no further attempt",
                )
                return
            await self._place(key, uid, spec, state, writer, outcome, recorded_allocations, volunteers, creation_index)
            return
        if phase in (Phase.SCHEDULED, Phase.RUNNING) and state.submission_id:
            await self._follow(key, spec, state, writer, outcome)

    async def _place(
        self,
        key: str,
        uid: str,
        spec: AIJobSpec,
        state: AIJobStatus,
        writer: _StatusWriter,
        outcome: Outcome,
        recorded_allocations: Mapping[str, Allocation],
        volunteers: Mapping[str, Mapping[str, Any]],
        creation_index: int,
    ) -> None:
        # The attempt a Pending job's status names was stopped at the start of the pass (_advance).
        verified = spec.verification.mode == "replicated"
        state = self._forget_other_programs(spec, state, writer)
        checked = _checked_copies(state)
        request = PlacementRequest(
            job_key=key,
            replicas=spec.replicas,
            gpus_per_replica=spec.resources.gpus,
            cpus_per_replica=spec.resources.cpus,
            gpu_memory_mib=spec.resources.gpu_memory_mib,
            min_reputation=spec.constraints.min_reputation,
            max_latency_ms=spec.constraints.max_latency_ms,
            regions=spec.constraints.regions,
            distinct_owners=verified,
            excluded_nodes=frozenset(state.excluded_nodes),
            excluded_owners=frozenset(state.excluded_owners),
            verification_quorum=spec.verification.quorum if verified else 1,
            # Once an attempt was checked, every later one is (the coin is not drawn again): any
            # volunteer sees in the head's job list that its job has a check copy and can stop it,
            # which ends the attempt uncounted; a fresh coin for the next attempt would let a
            # trusted liar stop checks until the skip came up. Not while answers of earlier
            # attempts are kept: each later attempt is judged with them, so even one copy does not
            # decide alone (the check that drew them is still in the vote).
            least_copies=1 if state.earlier_results else checked,
            attempt=state.attempts + 1,
            creation_index=creation_index,
            # creation_index is creationTimestamp in seconds: the first attempt has waited since then
            # (a large replicated job may wait a bounded time for a trusted node); failovers do not wait.
            pending_since=float(creation_index) if state.attempts == 0 and creation_index else None,
            expected_duration_s=spec.expected_duration_seconds,
            uid=uid,  # the spot-check coin's input: a job re-created under this name draws afresh
        )
        async with self.placement_lock:
            ray_nodes = await self.nodes.get()
            capacity = build_capacity(
                ray_nodes,
                volunteers,
                self.ledger.current(recorded_allocations, excluding=key),
                allow_bare=self.allow_bare_ray_workers,
            )
            # Nodes that failed to set up this spec's runtime_env, nodes blamed for a failed
            # attempt, and nodes lost mid-attempt are tried last: elsewhere first (a broken or
            # flaky node, or one that fails on purpose, must not take every retry; a good history
            # kept it the scheduler's first choice), but not left out (on a one-node fleet the job
            # must still end, with Ray's reason; a volunteer whose agent restarted, or whose
            # Wi-Fi dropped, comes back under its name and must run the job again). Where the
            # others are too few, the blamed and lost nodes are taken back first: they were
            # charged a failure or a timeout, which ranks them lower already, while an env failure
            # is charged nothing until another node sets the spec up.
            env_failed = _env_failed_nodes(state, submission_digest(spec)) - request.excluded_nodes
            blamed = frozenset((*_failed_nodes(state), *state.lost_nodes)) - request.excluded_nodes
            # The last try leaves out only what must be: its reasons are the ones to report.
            for tried_last in dict.fromkeys((env_failed | blamed, env_failed, frozenset[str]())):
                decision: PlacementDecision = self.placer.place(
                    replace(request, excluded_nodes=request.excluded_nodes | tried_last), capacity
                )
                if decision.placed:
                    break
            if decision.placed:
                chosen = tuple(node.name for node in decision.nodes)
                self.ledger.reserve(key, Allocation(chosen, spec.resources.gpus, spec.resources.cpus))
        if not decision.placed:
            message = decision.message
            previous = writer.previous_message()
            writer.scheduling(state.scheduling, decision="Unschedulable", reasons=decision.reasons)
            writer.phase(Phase.PENDING, "Unschedulable", message)
            writer.condition(ConditionType.SCHEDULED, False, "Unschedulable", message)
            if previous != message:
                outcome.event("Unschedulable", message, warning=True)
            return
        attempt = state.attempts + 1
        names = [node.name for node in decision.nodes]
        copies = decision.copies
        # The most copies any attempt of this job ran: every later one runs at least as many (see
        # least_copies above). Kept across attempts and operator restarts, and never lowered: the
        # write is a merge patch against the body this pass read, so the field is sent only where
        # this placement raises it. One placing from a body older than the placing write (a new
        # leader whose watch is behind) that reads none and draws 1 leaves the 2 that write recorded.
        checked_copies = (
            {CHECKED_COPIES: max(checked, copies)} if CHECKED_COPIES in state.scheduling or copies > 1 else {}
        )
        writer.set(
            attempts=attempt,
            # Which spec this attempt runs, whatever the spec says later (observedGeneration moves
            # on with every edit): a finished job shows which generation produced its result.
            attemptGeneration=writer.generation,
            # Nothing is submitted under these ids before this write is read back (_follow), and a
            # restarted operator reads the same ids from it. A pass that places this attempt again
            # from an older body names the same ids (keyed_submission_nonce), and adopts.
            submissionId=submission_id_for(uid, attempt, self.submission_nonce(uid, attempt)),
            assignedNodes=names,
            rayNodeIds=[node.ray_node_id for node in decision.nodes],
            scheduling={
                "decision": "Placed",
                "addresses": [node.address for node in decision.nodes],
                "owners": [node.owner for node in decision.nodes],
                "copies": copies,
                **checked_copies,
                "replicas": spec.replicas,
                # What the attempt holds and runs, whatever the spec says later: the operator's
                # ledger is rebuilt from these after a restart, and copies not yet submitted are
                # checked against the digest.
                "gpusPerReplica": spec.resources.gpus,
                "cpusPerReplica": spec.resources.cpus,
                "specDigest": submission_digest(spec),
                PLACED_REGIONS: regions_digest(spec),
                "excludedNodes": list(state.excluded_nodes),
                "excludedOwners": list(state.excluded_owners),
                "envSetupFailures": list(state.scheduling.get("envSetupFailures") or []),
                "failedNodes": _failed_nodes(state),
                "lostNodes": list(state.lost_nodes),
                "reasons": {},
            },
        )
        # What each copy will be submitted with, as Ray's record of it will say: a job found under
        # a copy's id is compared with this (_foreign_copies), never with a spec edited later.
        placed = AIJobStatus.from_status(writer.merged())
        writer.scheduling(
            state.scheduling,
            **{PLACED_SUBMISSIONS: [digest_of(submission_of(key, spec, placed, k)) for k in range(copies)]},
        )
        verification = f", {copies} verification copies" if copies > 1 else ""
        if verified and copies == 1:
            verification = ", verification skipped (trusted nodes, spot-check not drawn)"
        writer.phase(Phase.SCHEDULED, "Scheduled", f"attempt {attempt} placed on {', '.join(names)}{verification}")
        writer.condition(ConditionType.SCHEDULED, True, "Placed", decision.message)
        outcome.event("Scheduled", f"attempt {attempt}: {decision.message}{verification}")

    async def _stop_left_attempt(self, key: str, uid: str, state: AIJobStatus) -> bool:
        """Stops the copies of the attempt a Pending job's status still names (status.submissionId)
        before the job goes on (the next attempt placed, a suspend, a failure, a delete): one
        attempt of a job runs at a time. True when it asked Ray to stop one.

        Every path that makes a job Pending stops or finds ended what its attempt ran, so this
        normally finds nothing running (one read of Ray per copy, once per attempt left). A status
        written without a precondition (kopf's merge patch, as operators before status_write sent
        it, retried for up to a minute) could land late: a pass of an old leader that judged
        attempt N failed, after the new leader placed and submitted attempt N+1, turned the job
        Pending again over it (naming N+1: the write touches neither attempts nor submissionId).
        Placed over, N+1 would run on for nobody: no status names it, nothing would ever stop it,
        and its GPUs would be free in the ledger; so it is still looked for. Raises
        RayUnavailableError when Ray cannot be read or asked to stop one: the next attempt is then
        not placed (the pass backs off, as any pass Ray fails), and a later pass stops again.
        Never the attempt about to be placed: a write placing it that lands late names it, and
        placing it again adopts its copies (its ids are the same: keyed_submission_nonce)."""
        if not state.submission_id or self._left_stopped.get(key) == (state.submission_id, state.copies):
            return False
        attempt = state.attempts + 1
        if state.submission_id == submission_id_for(uid, attempt, self.submission_nonce(uid, attempt)):
            return False
        stopped = False
        for submission_id in ray_submissions_of(state):
            info = await self.ray.get(submission_id)
            if info is not None and not info.state.terminal:
                logger.warning(
                    "%s: Ray job %s (%s) of attempt %d still runs while the job's status is Pending "
                    "(a late status write?); stopping it before attempt %d is placed",
                    key,
                    submission_id,
                    info.state.value,
                    state.attempts,
                    attempt,
                )
                await self.ray.stop(submission_id)
                stopped = True
        stopped = await self._stop_strays_of_left_attempt(state) or stopped
        self._left_stopped[key] = (state.submission_id, state.copies)
        return stopped

    async def _follow(
        self, key: str, spec: AIJobSpec, state: AIJobStatus, writer: _StatusWriter, outcome: Outcome
    ) -> None:
        # Whatever the phase: a pass on an older body (Running) may land on a late placement's
        # Scheduled write before any pass here acted on it (memoised: once per attempt).
        await self._stop_strays(key, spec, state)
        infos = [await self.ray.get(submission_id) for submission_id in ray_submissions_of(state)]
        foreign = self._foreign_copies(key, spec, state, infos)
        if foreign:
            await self._submission_conflict(key, state, writer, outcome, infos, foreign)
            return
        missing = [k for k, info in enumerate(infos) if info is None]
        if missing:
            recorded_digest = state.scheduling.get("specDigest")
            if state.phase is Phase.SCHEDULED and recorded_digest and recorded_digest != submission_digest(spec):
                # Edited before all of the attempt's submissions went out: what is left would run
                # another program (or ask for other resources) than what runs. A new attempt runs
                # the new spec everywhere, uncounted.
                await self._interrupted(
                    key, state, writer, outcome, "SpecChanged", "the spec changed before all its copies were submitted"
                )
                return
            if state.phase is Phase.SCHEDULED:
                if len(missing) == len(infos):
                    # Nothing of the attempt in Ray: not yet submitted, or forgotten by a restarted
                    # head. A restarted head is a new Ray cluster, where every volunteer rejoins as
                    # a new Ray node: submitted now, the driver would run on the new one (pinned by
                    # address), the next pass would find the recorded node gone and charge its
                    # volunteer a timeout (NodeLost) for the head's restart, and its answer would
                    # not count (driver_elsewhere). So, as for a running attempt Ray forgot: placed
                    # again, uncounted, blaming nobody; so too for a node lost before anything ran
                    # there (its volunteer loses nothing that ran).
                    gone = lost_nodes(state, await self.nodes.get()) and await self._lost_nodes(state)
                    if gone:
                        await self._interrupted(
                            key,
                            state,
                            writer,
                            outcome,
                            "PlacedNodeGone",
                            f"node(s) {', '.join(gone)} left Ray before the attempt ran there "
                            "(head restarted, or the volunteer's agent rejoined as a new Ray node)",
                        )
                        return
                for k in missing:
                    try:
                        await self._submit(key, spec, state, k, outcome)
                    except RayRequestError as error:
                        # Ray answered and refused this very request (e.g. a runtime_env it cannot
                        # use): sending it again cannot help, and Ray is not down.
                        await self._stop_copies(state)
                        self._finish(key, writer, outcome, Phase.FAILED, "SubmitRejected", str(error))
                        return
                return
            # The head restarted and forgot it: neither the job's fault nor the volunteers'.
            await self._interrupted(
                key, state, writer, outcome, "RayJobLost", "Ray no longer knows the job (head restarted?)"
            )
            return
        known = [info for info in infos if info is not None]
        if state.phase is not Phase.RUNNING and any(i.state is RayJobState.RUNNING for i in known):
            if state.start_time is None:  # Ray recorded no start (_advance takes Ray's where it did)
                writer.set(startTime=format_micro_time(self.clock()))
            writer.phase(Phase.RUNNING, "Running", f"attempt {state.attempts} running on Ray")
            writer.condition(ConditionType.RUNNING, True, "Running", "running")
            outcome.event("Running", f"attempt {state.attempts} started on {', '.join(state.assigned_nodes)}")
            return
        if await self._decide_early(key, spec, state, known, writer, outcome):
            return
        if not all(info.state.terminal for info in known):
            # A node lost while the attempt runs fails it over now, not once its Ray jobs end: with
            # replicas > 1 the driver pins replica tasks to the other nodes, and with one of them
            # gone it waits for ever while Ray keeps it RUNNING (a lost driver's node can leave it
            # PENDING for ever too). The cached node list notices; a fresh one confirms, as when
            # the attempt ends. No grace of our own: Ray marks a node dead only once its health
            # checks have failed for a while, and a dead Ray node never comes back (a volunteer
            # that rejoins does so as a new Ray node). Only nodes of copies still running count: a
            # copy that ended is judged with the others once they end (its node may go home).
            running = {
                node
                for k, info in enumerate(infos)
                if info is not None and not info.state.terminal
                for node in state.copy_nodes(k)
            }
            # Every pass of every running job looks: the cache (one fetch a second at most, shared
            # by passes that find it stale together) keeps that off Ray's node API.
            if running.intersection(lost_nodes(state, await self.nodes.get())):
                lost = [node for node in await self._lost_nodes(state) if node in running]
                if lost:
                    await self._node_lost(key, spec, state, writer, outcome, lost)
            return
        await self._judge(key, spec, state, known, writer, outcome)

    async def _stop_strays(self, key: str, spec: AIJobSpec, state: AIJobStatus) -> None:
        """Stops the Ray jobs found running under this attempt's copy ids beyond the copies its
        status records (``<id>-copy<k>``, k up to the most copies any attempt runs).

        A pass acting on a body older than the write that placed the attempt (a new leader whose
        watch is behind) places it again under the same ids (keyed_submission_nonce), and may
        draw fewer copies than that write (another trust record behind the coin, or an operator
        whose coin was keyed apart): its write then names fewer copies, while the first placement's
        extra copies may already run. Referenced by no status, they would never be stopped, and
        their nodes would be free in the ledger. Looked for on the first pass that follows the
        attempt, Scheduled or Running (a pass on an older, Running body may write Running over the
        late placement before any pass here saw it Scheduled), once per attempt and recorded copies
        in this process: a few reads of Ray per attempt, not per pass."""
        base = state.submission_id
        if not base or self._swept.get(key) == (base, state.copies):
            return
        if spec.verification.mode != "replicated" and state.copies == 1 and _checked_copies(state) == 1:
            # Never placed with copies: an unverified job (a placement of a replicated spec left
            # checkedCopies above 1 in the status, which no placement lowers).
            return
        await self._stop_copies_beyond_recorded(state, max(MAX_QUORUM, spec.verification.quorum))
        self._swept[key] = (base, state.copies)

    async def _conclude_if_ended(
        self,
        key: str,
        spec: AIJobSpec,
        state: AIJobStatus,
        infos: list[RayJobInfo | None],
        writer: _StatusWriter,
        outcome: Outcome,
    ) -> bool:
        """Concludes the attempt as _follow would if its work has ended in Ray (``infos``: its
        copies there): every copy ended on its own, or the copies that answered decide its vote.
        False, and nothing done, while it still runs or has copies not submitted."""
        known = [info for info in infos if info is not None]
        if len(known) < len(infos):
            return False
        if _ended_on_their_own(known):
            await self._judge(key, spec, state, known, writer, outcome)
            return True
        return await self._decide_early(key, spec, state, known, writer, outcome)

    async def _decide_early(
        self,
        key: str,
        spec: AIJobSpec,
        state: AIJobStatus,
        infos: list[RayJobInfo],
        writer: _StatusWriter,
        outcome: Outcome,
    ) -> bool:
        """Concludes a verified attempt whose copies that answered (with the earlier attempts'
        answers) already give a digest a majority the others cannot overturn, whatever they
        return: the copies still running are stopped first (a copy that never ends would keep the
        job Running and its nodes held for ever) and count as no answer, as do copies found
        stopped and copies that ended but whose log cannot be read yet (a node that withholds its
        log gains nothing over one whose copy never ends). False, and nothing done, when the
        copies still to answer could change the vote; True, and nothing done, while an answer's
        log may still be incomplete.

        The answers are the conclusion's own (_answers): an answer it would reject (a driver that
        ran on another Ray node) decides nothing here either. The copies are stopped before the
        conclusion is written: an operator that dies between the two finds them stopped (or
        stopping), decides the same again, and no copy runs on behind a finished job."""
        waiting = frozenset(
            k for k, info in enumerate(infos) if not info.state.terminal or info.state is RayJobState.STOPPED
        )
        if not waiting or len(waiting) == len(infos) or (state.copies == 1 and not state.earlier_results):
            return False
        succeeded = [k for k, info in enumerate(infos) if info.state is RayJobState.SUCCEEDED]
        earlier_owners = {owner for _, owner, _ in state.earlier_results}
        owners = {state.owner_of(state.copy_nodes(k)[0]) for k in range(len(infos))} | earlier_owners
        if 2 * (len(succeeded) + len(earlier_owners)) <= len(owners):
            return False  # too few answers for any majority (judge's), whatever they say: no log is read
        # A copy whose log cannot be read yet counts as not answered yet, as one still running:
        # it must not fail the pass (and so hold a vote the others decide) while it is retried.
        unread: set[int] = set()
        answers = await self._answers(
            state, infos, lost_nodes(state, await self.nodes.get()), read=succeeded, unread=unread
        )
        if answers is None:
            return True  # an answer may not be in its log yet: look again next pass (seconds)
        waiting |= unread
        earlier = earlier_votes(state)
        if not judge(copy_votes(state, answers), earlier).accepted:
            return False
        running = [k for k in sorted(waiting) if not infos[k].state.terminal]
        for k in running:
            await self.ray.stop(infos[k].submission_id)
        if running:
            nodes = ", ".join(node for k in running for node in state.copy_nodes(k))
            outcome.event(
                "CopiesStopped",
                f"attempt {state.attempts}: the answers so far decide the vote; stopped the copies on {nodes}",
            )
        await self._judge(key, spec, state, infos, writer, outcome, unanswered=waiting, answers=answers)
        return True

    async def _judge(
        self,
        key: str,
        spec: AIJobSpec,
        state: AIJobStatus,
        known: list[RayJobInfo],
        writer: _StatusWriter,
        outcome: Outcome,
        unanswered: frozenset[int] = frozenset(),
        answers: list[CopyAnswer] | None = None,
    ) -> None:
        """Concludes an attempt whose copies have ended, but for ``unanswered`` (copies stopped, or
        found stopped, or whose log could not be read yet, once the others decided the vote: no
        answer, and no evidence), with ``answers`` when _decide_early has read them already."""
        # A copy found stopped (by this operator for a suspend or an edit whose status write was
        # lost: a crash, or a resume that arrived first; or by hand) gave no answer, as one stopped
        # for a decided vote: it did not fail, and no evidence says its node did anything wrong.
        # Any volunteer can stop any copy through the head's Job API, so charging the stopped
        # copies would let one charge honest nodes (stop theirs, exit its own with a code of the
        # job's own, which is not charged).
        found_stopped = frozenset(k for k, info in enumerate(known) if info.state is RayJobState.STOPPED)
        stopped = unanswered | found_stopped
        ended = {k: info for k, info in enumerate(known) if k not in stopped}
        # The nodes of copies stopped for a decided vote gave no answer to lose: one of them leaving
        # must not send the decided vote back to a rerun of every copy, nor be charged for going home.
        decided_nodes = {node for k in unanswered for node in state.copy_nodes(k)}
        lost = [node for node in await self._lost_nodes(state) if node not in decided_nodes]
        # A node counts as lost only for a copy of its own that failed, and not with an exit code of
        # the job's own (a node lost after its job failed on its own changes nothing: the failure
        # stays the job's), or that was found stopped along with every other copy of the attempt,
        # all at about the same time: this operator stops every copy of an attempt whose node it
        # finds lost (_node_lost), so a pass replayed after that pass's status write was lost finds
        # exactly this. Not a stopped copy beside one that ran on (or that was stopped much later):
        # any volunteer can stop another's copy and keep its own running until that node goes home,
        # as a node whose copy ended may (hours later, routine), which would have it charged a
        # timeout. A node that left after its copy succeeded went home too: that copy is judged
        # with the others, and so are a failure and a stop on a node that is still there.
        all_stopped = not unanswered and _stopped_together(known)
        failed_lost = [
            node
            for k, info in ended.items()
            if info.state is RayJobState.FAILED and not _exited_on_its_own(info)
            for node in state.copy_nodes(k)
            if node in lost
        ] + [node for k in sorted(found_stopped) if all_stopped for node in state.copy_nodes(k) if node in lost]
        if failed_lost:
            await self._node_lost(key, spec, state, writer, outcome, list(dict.fromkeys(failed_lost)))
            return
        if stopped - unanswered and not any(info.state is RayJobState.FAILED for info in ended.values()):
            # Stopped, and nothing failed: run it again, uncounted (the answers, if any, do not
            # decide the vote: _decide_early took those). With a copy that failed, the attempt is
            # judged on the copies that were not stopped: a failure of the job's own counts against
            # backoffLimit as it would without the stops (else a volunteer that stops the others
            # and exits its own copy could hold the job for ever), and one of a volunteer's is charged.
            await self._interrupted(key, state, writer, outcome, "RayJobStopped", "its Ray job was stopped")
            return
        refused = next((info for info in known if _spec_refused_by_ray(info)), None)
        if refused is not None:
            # As a submission Ray refuses outright: sending the same again cannot help.
            await self._stop_copies(state)
            why = refused.message.split(". Full traceback", 1)[0]
            if refused.error_type == ENTRYPOINT_START_FAILURE:
                # Ray's message is the bare traceback, through its own frames: its last line says it.
                why = f"its entrypoint could not be run: {_raised(refused.message)}"
            # Ray's words on a line of their own: they quote the runtime_env (a pip index URL
            # with its token, say), which status shows the job's owners but traces leave out.
            self._finish(key, writer, outcome, Phase.FAILED, "SubmitRejected", f"Ray could not start the job:\n{why}")
            return
        if answers is None:
            read = [k for k in range(len(known)) if k not in stopped]
            answers = await self._answers(state, known, lost, read)
        if answers is None:
            return  # Ray reports SUCCEEDED before the driver's log is flushed; look again next pass
        # A rerun after copies without a majority is judged with their answers, even when a trusted
        # node's skip left it one copy (that copy alone does not decide).
        if state.copies == 1 and not state.earlier_results:
            if answers[0].misplaced and state.copy_nodes(0)[0] in lost:
                # Its Ray node is gone: most likely the volunteer's agent restarted (a new Ray node,
                # same name and address, where the pinned driver then ran) before a pass saw the
                # copy running. A lost node, as it would be mid-run: failed over uncounted (the
                # answer is not taken: that Ray node was never confirmed as this volunteer's).
                await self._node_lost(key, spec, state, writer, outcome, [state.copy_nodes(0)[0]])
                return
            if answers[0].misplaced:
                # No answer, and nobody charged, as for a verification copy (_conclude_verified):
                # the attempt fails (DriverMisplaced, counted, so an impostor cannot hold it for ever).
                logger.warning(
                    "%s: placed on %s (Ray node %s) but Ray ran its driver on Ray node %s; its answer is not taken",
                    known[0].submission_id,
                    state.copy_nodes(0)[0],
                    driver_elsewhere(state, 0, known[0]),
                    known[0].driver_node_id or "(none named)",
                )
                unblamed = {state.copy_nodes(0)[0]}
                await self._ray_jobs_failed(key, spec, state, writer, outcome, known, [None], unblamed=unblamed)
                return
            await self._conclude_single(
                key, spec, state, known[0], answers[0].log, writer, outcome, gone=answers[0].gone
            )
        else:
            await self._conclude_verified(key, spec, state, known, answers, writer, outcome, stopped)

    async def _answers(
        self,
        state: AIJobStatus,
        infos: Sequence[RayJobInfo],
        lost: list[str],
        read: Collection[int],
        unread: set[int] | None = None,
    ) -> list[CopyAnswer] | None:
        """Each copy's answer: the one place it is decided, for the conclusion and for an early
        decision alike (an early decision that counted an answer the conclusion then rejects would
        stop copies for a vote that is not taken). Only the logs of the copies in ``read`` are read.
        A copy whose driver ran on another Ray node than its own gives no answer, and its log there
        is not read: see driver_elsewhere (a single copy too: an unverified job's answer is its
        log, and the node that ran the driver claimed another node's place to give it). None
        while a copy's result may not be in its log yet: Ray reports SUCCEEDED before the driver's
        log is flushed (look again next pass, seconds).

        With ``unread``, a copy whose log cannot be read yet (RayUnavailableError) is added to it,
        with no answer, instead of failing the pass."""
        answers: list[CopyAnswer] = []
        settling = False
        for k, info in enumerate(infos):
            if driver_elsewhere(state, k, info):
                answers.append(CopyAnswer(None, None, misplaced=True))
                continue
            got = _LogRead(None)
            if k in read:
                try:
                    got = await self._driver_log(state, k, info, lost)
                except RayUnavailableError:
                    if unread is None:
                        raise
                    unread.add(k)
            text = got.text
            succeeded = info.state is RayJobState.SUCCEEDED
            # Every such copy's settle clock starts on this pass (none is left for a later one: the
            # waits of copies that ended together would add up, one after another).
            if succeeded and text is not None and RESULT_MARKER not in text and not got.final:
                settling = not self._logs_settled(info, text) or settling
            answers.append(
                CopyAnswer(text, extract_result(text) if succeeded and text is not None else None, gone=got.why)
            )
        if settling:
            # The pass waits for other copies' logs to settle; a whole answer read meanwhile (its
            # result line in it) is kept, so that its node leaving before the next pass (an honest
            # drain) does not lose it: _driver_log serves it then.
            for info, answer in zip(infos, answers, strict=True):
                if answer.log is not None and RESULT_MARKER in answer.log and info.state is RayJobState.SUCCEEDED:
                    self._keep_served(info, answer.log)
        return None if settling else answers

    async def _driver_log(self, state: AIJobStatus, copy: int, info: RayJobInfo, lost: list[str]) -> _LogRead:
        """The copy's driver log, or None and why it is taken for gone (LOG_GONE, LOG_UNSERVED).

        The log lives on the driver's node, and Ray answers 500 for it once that node is gone: every
        pass used to back off and ask again, and the job stayed Running for good. A read that fails
        while the driver's node lives is Ray being unavailable (raised: the pass is tried again),
        until _log_unserved_long_enough: then the log is taken for gone.

        Only the driver's own node leaving takes its log away: Ray pins the driver to the copy's
        first node (submit: entrypoint_resources), so where Ray recorded no driver node that node
        stands for it. Another of the copy's nodes leaving (a replica's, after the job succeeded)
        made one failed read LOG_GONE, and the living driver's node was charged for it.

        A whole log already served (_settling: with its result line, on a pass that waited for
        others, or settled without one) is not lost with a failed read: that text is the log
        (delivered, ``final`` when the node left, as an honest agent's drain stops Ray within a
        second of its last task). Text served before it settled is not (see below).
        """
        try:
            if info.driver_node_id or not placed_ray_node(state, copy):
                text = await self.ray.logs(info.submission_id, info.driver_node_id)
            else:
                # A copy placed on a known Ray node whose record names no driver node: no driver
                # ran (driver_elsewhere takes one that says it did), and no log is read. The head
                # would serve one from whatever agent address the record names (RayJobsClient.logs);
                # for a job whose driver never started it serves none.
                text = ""
        except RayUnavailableError:
            if info.driver_node_id:
                alive = {n.node_id for n in await self.nodes.get() if n.alive}
                driver_left = info.driver_node_id not in alive
            else:
                driver_left = next(iter(state.copy_nodes(copy)), None) in lost
            served = self._settling.get(info.submission_id)
            # Whole: its result line in it, or served again once LOG_SETTLE_SECONDS had passed
            # still without one. Text served before it settled may miss the driver's last lines
            # (Ray reports SUCCEEDED before the log is flushed): a verified copy's would be voted on
            # (the digest covers the whole log) and an honest drain charged a disagreement, a
            # single copy's reported as a result without the value its job printed last. It is no
            # log then: gone with its node (charged to no one), or read again while the node lives.
            whole = served is not None and (
                RESULT_MARKER in served.text or served.read_at - served.first >= LOG_SETTLE_SECONDS
            )
            if served is not None and whole:
                self._unserved.pop(info.submission_id, None)
                return _LogRead(served.text, final=driver_left)
            if driver_left:
                self._unserved.pop(info.submission_id, None)
                logger.warning("driver log of %s is gone with its node; concluding without it", info.submission_id)
                return _LogRead(None, LOG_GONE)
            if not self._log_unserved_long_enough(info.submission_id):
                raise
            logger.warning(
                "driver log of %s not served by its living node for %.0f s; concluding without it",
                info.submission_id,
                LOG_UNSERVED_GIVE_UP_SECONDS,
            )
            return _LogRead(None, LOG_UNSERVED)
        self._unserved.pop(info.submission_id, None)
        return _LogRead(text)

    def _log_unserved_long_enough(self, submission_id: str) -> bool:
        """Records a failed read of the submission's driver log (its node alive), and says whether
        its reads have failed long enough to give up: LOG_UNSERVED_GIVE_UP_SECONDS since this
        process's first failed read, and at least LOG_UNSERVED_MIN_FAILURES reads. Timed on this
        process's monotonic clock only: Ray's end time comes from the volunteer's node (its clock
        may be behind, or ahead by as much as the volunteer likes, which would hold the job for
        ever), and an operator that first looks long after the end must still read again: its
        first read after a restart or a change of leader starts the wait (both clear this memory).
        No other gap between reads restarts it: the reads are as far apart as the poll interval,
        which may be longer than the wait itself, and a restarted wait then never ended."""
        now = self.monotonic()
        entry = self._unserved.get(submission_id)
        if entry is None:
            _drop_stale(self._unserved, now, lambda e: e.last)
            self._unserved[submission_id] = _UnservedLog(now, now, 1)
            return False
        entry.last = now
        entry.failures += 1
        return entry.failures >= LOG_UNSERVED_MIN_FAILURES and now - entry.first >= LOG_UNSERVED_GIVE_UP_SECONDS

    def _deadline_exceeded(self, key: str, spec: AIJobSpec, writer: _StatusWriter, outcome: Outcome) -> None:
        message = f"activeDeadlineSeconds={spec.active_deadline_seconds} exceeded"
        self._finish(key, writer, outcome, Phase.FAILED, "DeadlineExceeded", message)

    async def _copies_in_ray(self, key: str, spec: AIJobSpec, state: AIJobStatus) -> list[RayJobInfo | None]:
        """Ray's record of each copy of the current attempt (None: not submitted, or a job this
        operator did not submit found under its id, which is no part of the attempt's work)."""
        infos = [await self.ray.get(submission_id) for submission_id in ray_submissions_of(state)]
        foreign = self._foreign_copies(key, spec, state, infos)
        return [None if k in foreign else info for k, info in enumerate(infos)]

    def _foreign_copies(
        self, key: str, spec: AIJobSpec, state: AIJobStatus, infos: Sequence[RayJobInfo | None]
    ) -> dict[int, str]:
        """Per copy found in Ray (``infos``) that this operator did not submit (foreign_submission):
        what differs. What it submitted is what the placing write recorded a digest of
        (PLACED_SUBMISSIONS), whatever the spec says now: after an edit mid-attempt (which applies
        from the next attempt) a job under the attempt's id with any entrypoint was taken for the
        operator's own when only the metadata was compared. An attempt placed by an operator
        before those digests: rebuilt from ``spec`` while the spec is the one the attempt was
        placed with (status.scheduling.specDigest; one the placing operator did not record counts
        as unchanged, as in _ratchet: an edit then costs at worst a rerun, uncounted); after an
        edit, only what status gives is compared."""
        recorded = state.scheduling.get("specDigest")
        whole = not recorded or recorded == submission_digest(spec)
        placed = placed_submissions(state)
        found: dict[int, str] = {}
        for k, info in enumerate(infos):
            if info is None or info.submitted is None:  # not in Ray, or Ray did not say: nothing to compare
                continue
            digest = placed[k] if placed is not None else None
            why = foreign_submission(submission_of(key, spec, state, k), info, whole, placed=digest)
            if why is not None:
                found[k] = why
        return found

    async def _submission_conflict(
        self,
        key: str,
        state: AIJobStatus,
        writer: _StatusWriter,
        outcome: Outcome,
        infos: Sequence[RayJobInfo | None],
        foreign: Mapping[int, str],
    ) -> None:
        """Ray holds, under an id of the attempt's, a job this operator did not submit: someone
        with the cluster's Ray token submitted it first. It is not adopted: its log is no answer,
        and its end no evidence about any node (nothing tells which volunteer made it, and the
        copy's own node may have done nothing wrong). The attempt is placed again, uncounted and
        blaming nobody, as one whose Ray job vanished is; its next placement is another attempt,
        whose nonce (keyed_submission_nonce) makes its ids new ones, unknown until submitted. The
        job found is stopped along with the attempt's own copies."""
        for k, why in sorted(foreign.items()):
            info = infos[k]
            logger.warning(
                "%s: Ray job %s (copy %d of attempt %d) was not submitted by this operator (%s differ); "
                "not adopted, the attempt is placed again",
                key,
                info.submission_id if info is not None else "?",
                k,
                state.attempts,
                why,
            )
        ids = ", ".join(info.submission_id for k, info in enumerate(infos) if k in foreign and info is not None)
        await self._interrupted(
            key,
            state,
            writer,
            outcome,
            "SubmissionConflict",
            f"Ray job {ids} was submitted by someone else under the attempt's id (not adopted)",
        )

    async def _ended_within_deadline(self, key: str, spec: AIJobSpec, state: AIJobStatus) -> bool:
        """Every copy of the attempt ended, by Ray's record, before activeDeadlineSeconds ran out.

        The deadline is judged by when the job ended, not by when the operator looks: a job that
        ended in time while the operator was down (or between two passes) is concluded as it ended.
        """
        if state.start_time is None or spec.active_deadline_seconds is None or not state.submission_id:
            return False
        if state.phase not in (Phase.SCHEDULED, Phase.RUNNING):
            return False
        deadline_ms = (state.start_time.timestamp() + spec.active_deadline_seconds) * 1000
        return all(
            info is not None
            and info.state.terminal
            and info.end_time_ms is not None
            and info.end_time_ms <= deadline_ms
            for info in await self._copies_in_ray(key, spec, state)
        )

    async def _conclude_single(
        self,
        key: str,
        spec: AIJobSpec,
        state: AIJobStatus,
        info: RayJobInfo,
        logs: str | None,
        writer: _StatusWriter,
        outcome: Outcome,
        gone: str = LOG_GONE,
    ) -> None:
        """``gone``: why ``logs`` is None (LOG_GONE, LOG_UNSERVED)."""
        self._settle_env_failures(state, [info], writer, outcome)
        if info.state is RayJobState.SUCCEEDED:
            if logs is None:
                # Ray says it succeeded; only its log (and the result line in it) could not be had.
                result: dict[str, Any] = {"unavailable": gone}
                outcome.event("ResultUnavailable", f"attempt {state.attempts} succeeded; {gone}", warning=True)
            else:
                result = extract_result(logs)
            writer.set(result=result)
            if state.start_time is None:  # started and ended between two passes, Ray recorded no start
                writer.set(startTime=format_micro_time(self.clock()))
            if logs is None:
                # Its driver's node did not deliver the log (and the result in it): no success to
                # credit it, the job's owner got nothing. Withheld while alive for the whole wait
                # (LOG_UNSERVED): charged a timeout, as a verification copy's node is
                # (_conclude_verified): otherwise a volunteer that withholds its logs would lose
                # nothing on unreplicated jobs, and gain credit (and so skip replication sooner)
                # for results nobody received. An honest node whose agent is broken that long pays
                # what a verification copy's node pays (a timeout: nothing shows the job failed on
                # it, so no failure). Taken away by its node leaving the cluster (LOG_GONE: the
                # driver's own node, _driver_log): neither credited nor charged, no evidence either
                # way. An honest agent's drain stops Ray within a second of its last task ending,
                # which can beat the operator's poll (charging that was charging honest volunteers
                # for going home), and a withholder that leaves gains nothing (no success). A
                # verification copy's node that leaves with its log is still charged a timeout
                # (_conclude_verified): there the missing answer costs the vote, as a node lost
                # mid-attempt does. The copy's other nodes ran their part and Ray says it
                # succeeded: credited as usual. (A driver Ray ran on another Ray node than the one
                # placed gives no answer at all, and does not come here: _judge.)
                driver = state.copy_nodes(0)[0] if state.assigned_nodes else None
                outcome.reputation.extend((node, "success") for node in state.assigned_nodes if node != driver)
                if driver is not None and gone == LOG_UNSERVED:
                    outcome.reputation.append((driver, "timeout"))
            else:
                outcome.reputation.extend((node, "success") for node in state.assigned_nodes)
            summary = f"{RESULT_SEPARATOR}{result['value'][:200]}" if "value" in result else ""
            ran = _ran_spec_note(spec, state, writer.generation)
            self._finish(
                key, writer, outcome, Phase.SUCCEEDED, "Completed", f"attempt {state.attempts} succeeded{ran}{summary}"
            )
            return
        await self._ray_jobs_failed(key, spec, state, writer, outcome, [info], [logs])

    async def _ray_jobs_failed(
        self,
        key: str,
        spec: AIJobSpec,
        state: AIJobStatus,
        writer: _StatusWriter,
        outcome: Outcome,
        infos: list[RayJobInfo],
        logs: Sequence[str | None],
        unblamed: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        """The attempt's Ray job(s) failed; a copy's volunteers are blamed only when its driver did
        not fail on its own (a non-zero exit code, or a runtime_env or entrypoint Ray could not
        start or set up, is the job's: _settle_env_failures charges the latter once another node
        sets it up) and ran on the copy's own node (``unblamed``: the first nodes of copies whose driver did not,
        and of copies stopped, which did not fail: _judge)."""
        blamed = [
            node
            for k, info in enumerate(infos)
            if not _user_error(info) and state.copy_nodes(k)[0] not in unblamed
            for node in state.copy_nodes(k)
        ]
        first = next((k for k, info in enumerate(infos) if state.copy_nodes(k)[0] not in unblamed), None)
        if first is None:
            stops = any(info.state is RayJobState.STOPPED for info in infos)
            drivers = "the driver of every copy not stopped" if stops else "every copy's driver"
            reason, message = "DriverMisplaced", f"Ray ran {drivers} on another Ray node than its own"
        else:
            reason, message = "RayJobFailed", _ray_reason(infos[first].message) or infos[first].state.value
        await self._attempt_failed(
            key,
            spec,
            state,
            writer,
            outcome,
            reason,
            message,
            log_tail(logs[first] or "", 10) if first is not None else "",
            blamed=blamed,
        )

    async def _conclude_verified(
        self,
        key: str,
        spec: AIJobSpec,
        state: AIJobStatus,
        infos: list[RayJobInfo],
        answers: list[CopyAnswer],
        writer: _StatusWriter,
        outcome: Outcome,
        unanswered: frozenset[int] = frozenset(),
    ) -> None:
        """Judge the attempt's copies. A copy whose driver ran on another Ray node than its own
        (``CopyAnswer.misplaced``) has failed with no answer, and nobody is charged for it: nothing
        shows that the copy's node did anything wrong (another Ray node claiming its address took
        the driver, or its agent restarted before the submission), and the node that ran the driver
        is known only by a Ray node id whose volunteer label is that node's own claim, so charging
        either would let an impostor cost an honest volunteer evidence. An attempt left without any
        answer that way still counts against backoffLimit, so an impostor cannot hold it forever.

        A copy in ``unanswered`` was stopped (or its log could not be read yet) once the others
        decided the vote, or was found stopped: no answer, and no evidence either way (listed in
        verification.stopped). It did not fail: charging it a timeout would charge the slowest
        honest copy of every decided vote (a slower GPU, punished for being one), and charging one
        found stopped would charge whichever copies another volunteer stopped through the Job API."""
        if state.start_time is None:  # copies that ran between two passes, Ray recorded no start
            writer.set(startTime=format_micro_time(self.clock()))
        env_charged = self._settle_env_failures(state, infos, writer, outcome)
        outcome.reputation.extend((node, "failure") for node in sorted(env_charged))
        copies = copy_votes(state, answers)
        results: dict[str, dict[str, Any]] = {}
        gone: list[str] = []  # copies whose log left with their node: no answer, and no failure
        elsewhere: set[str] = set()  # copies whose driver ran on another Ray node: no answer, no charge
        stopped: list[str] = []  # copies stopped (for a decided vote, or found so): no answer, no evidence
        # A copy votes once, under its first (driver) node and that node's owner; every node of it
        # computed its answer (any of them may have spoilt it), so each is judged by that answer.
        computed_by = state.copies_by_voter()
        for k, (info, reply) in enumerate(zip(infos, answers, strict=True)):
            node = state.copy_nodes(k)[0]
            if k in unanswered:
                stopped.append(node)
            elif reply.misplaced:
                elsewhere.add(node)
                logger.warning(
                    "%s: copy %d is placed on %s (Ray node %s) but Ray ran its driver on Ray node %s; "
                    "its answer is not counted",
                    info.submission_id,
                    k,
                    node,
                    driver_elsewhere(state, k, info),
                    info.driver_node_id or "(none named)",
                )
            elif reply.log is None and info.state is RayJobState.SUCCEEDED:
                gone.append(node)
            if reply.result is not None:
                results[node] = reply.result
        earlier = earlier_votes(state)
        verdict = judge(copies, earlier)
        # The answers of earlier attempts alone can make a majority (their failed copies are no
        # owners of this vote): such a verdict decides the attempt even when none of its copies
        # answered (an early decision on it, _decide_early, may have stopped the copies left).
        if not results and not verdict.accepted and gone:
            # Nothing to judge, and not the job's fault: run it again, uncounted, as for a lost node.
            # Only the nodes that took their copy's log away: one whose copy exited on its own and
            # left only afterwards is no lost node (its copy's failure is the job's own).
            await self._node_lost(key, spec, state, writer, outcome, sorted(gone))
            return
        logs = [reply.log for reply in answers]
        if not results and not verdict.accepted:
            # No copy produced a result: the attempt failed as a whole (counted against backoffLimit).
            unblamed = elsewhere.union(stopped)
            await self._ray_jobs_failed(key, spec, state, writer, outcome, infos, logs, unblamed=unblamed)
            return

        def every_node(voters: Iterable[str]) -> list[str]:
            return [n for voter in voters for n, _ in computed_by.get(voter, ((voter, ""),))]

        def answer(c: CopyResult) -> dict[str, Any]:
            entry: dict[str, Any] = {"node": c.node, "owner": c.owner, "digest": c.digest}
            members = computed_by.get(c.node, ())
            if len(members) > 1:  # judged with a later attempt: so are all its nodes
                entry.update(nodes=[n for n, _ in members], owners=[o for _, o in members])
            return entry

        accepted = accepted_result(verdict, results, state.earlier_answers)
        answered_so_far = [*earlier, *(c for c in copies if c.digest is not None)]
        verification: dict[str, Any] = {
            "copies": state.copies,
            "digests": {c.node: c.digest for c in copies},
            "agreeing": list(verdict.agreeing),
            "disagreeing": list(verdict.disagreeing),
            "failed": [node for node in verdict.failed if node not in stopped],
            "earlierResults": [answer(c) for c in earlier],
        }
        if stopped:
            verification["stopped"] = stopped
        if accepted is None:
            verification["earlierResults"] = kept_answers(
                [answer(c) for c in answered_so_far], answered_so_far, results, state.earlier_answers
            )
        writer.set(verification=verification)
        # A copy whose node left with its log did not fail: that node is charged for leaving (the
        # copy's other nodes did their part). A copy whose driver exited with its own non-zero code
        # failed in the job's code, as an unreplicated job's does (_attempt_failed): its volunteers
        # are not charged. A copy whose driver ran elsewhere, or that was stopped once the vote was
        # decided: nobody (see above). Any other failed copy: each of its nodes, as
        # _ray_jobs_failed blames them.
        own_errors = {
            node for k, info in enumerate(infos) if _user_error(info) for node in state.copy_nodes(k)
        } - env_charged
        for voter in verdict.failed:
            if voter in elsewhere or voter in stopped:
                continue
            if voter in gone:
                outcome.reputation.append((voter, "timeout"))
            else:
                outcome.reputation.extend((node, "failure") for node in every_node([voter]) if node not in own_errors)
        if accepted is not None:
            outcome.reputation.extend((node, "agreement") for node in every_node(verdict.agreeing))
            outcome.reputation.extend((node, "disagreement") for node in every_node(verdict.disagreeing))
            if verdict.disagreeing:
                outcome.event(
                    "ResultDisagreement",
                    f"{', '.join(every_node(verdict.disagreeing))} returned a result the majority did not",
                    warning=True,
                )
            writer.set(result=accepted)
            if "unavailable" in accepted:
                outcome.event(
                    "ResultUnavailable", f"attempt {state.attempts} verified; {accepted['unavailable']}", warning=True
                )
            summary = f"{RESULT_SEPARATOR}{accepted['value'][:200]}" if "value" in accepted else ""
            ran = _ran_spec_note(spec, state, writer.generation)
            self._finish(
                key,
                writer,
                outcome,
                Phase.SUCCEEDED,
                "Verified",
                f"attempt {state.attempts}: {sum(n in results for n in verdict.agreeing)}/{state.copies} copies "
                f"agree{agreeing_earlier(verdict.agreeing, results)}{ran}{summary}",
            )
            return
        # No majority: nobody is charged for a disagreement yet (verification.py says why).
        reruns = state.verification_reruns + 1
        # Vote counts only: a result's digest is an unsalted hash of what the job printed (a short
        # result can be looked up), and messages reach Events and the SREs' traces.
        counts = " vs ".join(str(n) for n in sorted(verdict.votes.values(), reverse=True)) or "none"
        message = f"attempt {state.attempts}: no majority among {state.copies} copies (owners per answer: {counts})"
        if reruns > spec.backoff_limit:
            self._finish(key, writer, outcome, Phase.FAILED, "NoMajority", message)
            return
        self.ledger.release(key)
        excluded = sorted({*state.excluded_nodes, *state.assigned_nodes})
        # Fresh owners too: an owner with several nodes would otherwise take a copy of every rerun
        # (and could keep the job from a majority until backoffLimit ran out).
        excluded_owners = sorted({*state.excluded_owners, *(state.owner_of(node) for node in state.assigned_nodes)})
        writer.set(
            assignedNodes=[],
            rayNodeIds=[],
            verificationReruns=reruns,
        )
        # lostNodes too: a status of an earlier operator had them in excludedNodes, which
        # AIJobStatus reads as lost only while verificationReruns is 0.
        writer.scheduling(
            state.scheduling,
            excludedNodes=excluded,
            excludedOwners=excluded_owners,
            lostNodes=list(state.lost_nodes),
        )
        writer.phase(Phase.PENDING, "NoMajority", f"{message}; rerunning on fresh nodes of fresh owners")
        outcome.event("NoMajority", f"{message}; rerunning on fresh nodes of fresh owners", warning=True)

    @staticmethod
    def _forget_other_programs(spec: AIJobSpec, state: AIJobStatus, writer: _StatusWriter) -> AIJobStatus:
        """Earlier answers, nodes and owners left out after a split vote, and runtime_env failures
        were about the spec the previous attempt ran: after an edit they say nothing about this one
        (answers of two programs must not be voted together)."""
        recorded = state.scheduling.get("specDigest")
        if not recorded or recorded == submission_digest(spec):
            return state
        if state.earlier_results:
            writer.set(verification=None)
        scheduling = {k: v for k, v in state.scheduling.items() if k not in ("excludedOwners", "envSetupFailures")}
        # The nodes of the old program's split vote are no longer left out either: tried last,
        # as lost nodes are (kept out, on a fleet of only them the edited job waited for ever).
        lost = tuple(dict.fromkeys((*state.lost_nodes, *state.excluded_nodes)))[-MAX_FAILED_NODES_KEPT:]
        if state.excluded_nodes:
            scheduling.update(excludedNodes=[], lostNodes=list(lost))
        writer.scheduling(scheduling)
        return replace(
            state,
            earlier_results=(),
            earlier_answers={},
            excluded_owners=(),
            excluded_nodes=(),
            lost_nodes=lost,
            scheduling=scheduling,
        )

    def _settle_env_failures(
        self, state: AIJobStatus, infos: Sequence[RayJobInfo], writer: _StatusWriter, outcome: Outcome
    ) -> set[str]:
        """A runtime_env that failed to set up, or a driver its node could not start, is the spec's
        doing (a pip typo) until another node sets up and starts the same spec: then each node that
        failed it is charged a failure. Returns the nodes of this attempt to charge now; the others
        are kept (by spec digest) for later."""
        digest = state.scheduling.get("specDigest")
        kept = [
            entry
            for entry in state.scheduling.get("envSetupFailures") or ()
            if isinstance(entry, Mapping) and entry.get("digest") == digest and isinstance(entry.get("node"), str)
        ]
        failed = [state.copy_nodes(k)[0] for k, info in enumerate(infos) if info.error_type in DRIVER_NOT_STARTED]
        set_up = {state.copy_nodes(k)[0] for k, info in enumerate(infos) if _env_set_up(info)}
        if not failed and not (kept and set_up):
            return set()
        if set_up:
            # Set up fine here: the earlier nodes that failed it are charged (not one that now
            # set it up itself: its failure was passing), and so are this attempt's failing copies.
            earlier = sorted({str(e["node"]) for e in kept} - set_up - set(state.assigned_nodes))
            outcome.reputation.extend((node, "failure") for node in earlier)
            writer.scheduling(state.scheduling, envSetupFailures=[])
            return set(failed)
        kept += [{"node": node, "digest": digest} for node in failed]
        writer.scheduling(state.scheduling, envSetupFailures=kept[-MAX_ENV_FAILURES_KEPT:])
        return set()

    async def _lost_nodes(self, state: AIJobStatus) -> list[str]:
        """Assigned nodes that Ray no longer has alive (lost_nodes), by a fresh node list."""
        self.nodes.invalidate()
        return lost_nodes(state, await self.nodes.get())

    async def _node_lost(
        self,
        key: str,
        spec: AIJobSpec,
        state: AIJobStatus,
        writer: _StatusWriter,
        outcome: Outcome,
        lost: list[str],
    ) -> None:
        """A volunteer vanished mid-attempt: not the job's fault, so it fails over without
        counting against backoffLimit, to other nodes first: the lost node is tried last
        (lostNodes), not left out, since a volunteer whose agent restarted or whose connection
        dropped comes back as the same VolunteerNode, and may be the only one that fits."""
        await self._stop_copies(state)
        self.ledger.release(key)
        outcome.reputation.extend((node, "timeout") for node in lost)
        lost_nodes = [node for node in state.lost_nodes if node not in lost] + list(dict.fromkeys(lost))
        writer.set(assignedNodes=[], rayNodeIds=[])
        # excludedNodes too: an earlier operator's lost nodes there are read as lost (AIJobStatus).
        writer.scheduling(
            state.scheduling,
            excludedNodes=list(state.excluded_nodes),
            lostNodes=lost_nodes[-MAX_FAILED_NODES_KEPT:],
        )
        message = f"attempt {state.attempts}: node(s) {', '.join(lost)} lost; failing over, other nodes first"
        writer.phase(Phase.PENDING, "NodeLost", message)
        outcome.event("NodeLost", message, warning=True)

    async def _interrupted(
        self, key: str, state: AIJobStatus, writer: _StatusWriter, outcome: Outcome, reason: str, why: str
    ) -> None:
        """The attempt ended without an outcome of its own: place it again, without counting it
        against backoffLimit or the volunteers (as a lost node is, but blaming nobody)."""
        await self._stop_copies(state)
        self.ledger.release(key)
        message = f"attempt {state.attempts}: {why}; placing it again"
        writer.set(assignedNodes=[], rayNodeIds=[])
        writer.phase(Phase.PENDING, reason, message)
        outcome.event(reason, message, warning=True)

    async def _submit(self, key: str, spec: AIJobSpec, state: AIJobStatus, copy: int, outcome: Outcome) -> None:
        # Under the ids recorded at placement (a nonce's among them), read back from status.
        submission = submission_of(key, spec, state, copy)
        submission_id = submission.submission_id
        if not self._may_act.get(key, lambda: True)():
            raise _LeaseLost(f"no longer leading in the term this pass began in; {submission_id} not submitted")
        created = await self.ray.submit(submission)
        outcome.event(
            "Submitted" if created else "Adopted",
            # One that already existed is checked against this submission on the next pass, as
            # every copy found in Ray is (_foreign_copies), before anything of it is read.
            f"Ray submission {submission_id}" + ("" if created else " already existed"),
        )

    async def _attempt_failed(
        self,
        key: str,
        spec: AIJobSpec,
        state: AIJobStatus,
        writer: _StatusWriter,
        outcome: Outcome,
        reason: str,
        message: str,
        tail: str,
        blamed: Sequence[str],
    ) -> None:
        # Only failures that are not the job's own (exit code) count against the volunteers.
        outcome.reputation.extend((node, "failure") for node in blamed)
        failures = state.failures + 1
        # The operator's words first, the job's log after them: spans keep only what comes before.
        failed = f"attempt {state.attempts} failed: {message}"
        tail_part = f"{LOG_TAIL_SEPARATOR}{tail}" if tail else ""
        writer.set(failures=failures, result={"logTail": tail[-4000:]} if tail else None)
        if failures > spec.backoff_limit:
            self._finish(
                key,
                writer,
                outcome,
                Phase.FAILED,
                "BackoffLimitExceeded",
                f"{failed} (backoffLimit={spec.backoff_limit} reached){tail_part}",
            )
            return
        self.ledger.release(key)
        writer.set(assignedNodes=[], rayNodeIds=[])
        if blamed:
            # Tried last on the retries (_place), kept in status so a restarted operator does too.
            failed_nodes = [node for node in _failed_nodes(state) if node not in blamed] + list(dict.fromkeys(blamed))
            writer.scheduling(state.scheduling, failedNodes=failed_nodes[-MAX_FAILED_NODES_KEPT:])
        writer.phase(Phase.PENDING, "BackOff", f"{failed}; retrying ({failures}/{spec.backoff_limit}){tail_part}")
        outcome.event(reason, f"{failed}; retry {failures}/{spec.backoff_limit}{tail_part}", warning=True)

    def _finish(
        self, key: str, writer: _StatusWriter, outcome: Outcome, phase: Phase, reason: str, message: str
    ) -> None:
        self.ledger.release(key)
        writer.set(completionTime=format_micro_time(self.clock()))
        writer.phase(phase, reason, message)
        succeeded = phase is Phase.SUCCEEDED
        writer.condition(ConditionType.RUNNING, False, reason, message)
        writer.condition(ConditionType.COMPLETE if succeeded else ConditionType.FAILED, True, reason, message)
        outcome.event(reason, message, warning=not succeeded)

    def _logs_settled(self, info: RayJobInfo, text: str) -> bool:
        """Whether a SUCCEEDED submission's log, served as ``text`` without a result line, is taken
        as final: LOG_SETTLE_SECONDS after the first pass of this process that found it so. The
        text is kept meanwhile: should the node leave before then, it is what was delivered."""
        return self.monotonic() - self._keep_served(info, text).first >= LOG_SETTLE_SECONDS

    def _keep_served(self, info: RayJobInfo, text: str) -> _SettlingLog:
        """Keeps ``text`` as the submission's log as last served (_settling), bounded as _unserved is."""
        now = self.monotonic()
        entry = self._settling.get(info.submission_id)
        if entry is None:
            _drop_stale(self._settling, now, lambda e: e.first)
            self._settling[info.submission_id] = entry = _SettlingLog(now, text, now)
        entry.text, entry.read_at = text, now
        return entry

    @staticmethod
    def _ttl_expired(spec: AIJobSpec, state: AIJobStatus, now: datetime) -> bool:
        return (
            spec.ttl_seconds_after_finished is not None
            and state.completion_time is not None
            and (now - state.completion_time).total_seconds() >= spec.ttl_seconds_after_finished
        )


class _StatusWriter:
    """Accumulates a status merge patch; keeps conditions as a whole list (merge patch replaces lists)."""

    def __init__(self, outcome: Outcome, current: Mapping[str, Any], generation: int | None, now: str) -> None:
        self._outcome = outcome
        self._current = current
        self._generation = generation
        self._now = now
        self._conditions: list[dict[str, Any]] = [dict(c) for c in current.get("conditions") or []]

    @property
    def generation(self) -> int | None:
        """metadata.generation of the body this pass read."""
        return self._generation

    def set(self, **fields: Any) -> None:
        self._outcome.status.update(fields)
        self._outcome.status["observedGeneration"] = self._generation

    def scheduling(self, base: Mapping[str, Any], **fields: Any) -> None:
        """Sets fields of status.scheduling, on top of what this pass already set there."""
        current = self._outcome.status.get("scheduling")
        self.set(scheduling={**(current if isinstance(current, Mapping) else base), **fields})

    def phase(self, phase: Phase, reason: str, message: str) -> None:
        self.set(phase=phase.value, reason=reason, message=message[:4000])
        # Conditions follow the phase: a Running (or Scheduled) left True after the job went back
        # to Pending or was suspended made `kubectl wait --for=condition=Running` return at once.
        if phase in (Phase.PENDING, Phase.SUSPENDED):
            self._end(ConditionType.RUNNING, reason, message)
            self._end(ConditionType.SCHEDULED, reason, message)
        elif phase is Phase.SCHEDULED:
            self._end(ConditionType.RUNNING, reason, message)
        if phase is not Phase.SUSPENDED:
            # And a Suspended left True after the job left that phase (failed on an invalid edit
            # while suspended: _reconcile) made `kubectl wait --for=condition=Suspended` return.
            self._end(ConditionType.SUSPENDED, reason, message)

    def _end(self, type_: str, reason: str, message: str) -> None:
        """Sets ``type_`` False where it is True now (a condition never set stays absent)."""
        if any(c.get("type") == type_ and c.get("status") == "True" for c in self._conditions):
            self.condition(type_, False, reason, message)

    def condition(self, type_: str, status: bool, reason: str, message: str) -> None:
        self._conditions = set_condition(
            self._conditions,
            type_=type_,
            status=status,
            reason=reason,
            message=message[:2000],
            now=self._now,
            generation=self._generation,
        )
        self.set(conditions=self._conditions)

    def merged(self) -> dict[str, Any]:
        """The status as it will read once this pass's patch is applied: the fields it sets
        replace the current ones (each is set whole, scheduling included)."""
        return {**self._current, **self._outcome.status}

    def has_condition_false(self, type_: str) -> bool:
        return any(c.get("type") == type_ and c.get("status") == "False" for c in self._conditions)

    def previous_message(self) -> str | None:
        value = self._current.get("message")
        return str(value) if value is not None else None


def _ran_spec_note(spec: AIJobSpec, state: AIJobStatus, generation: int | None) -> str:
    """For the message of a success (before the job's result, which ends it): that the attempt ran
    a spec edited since (its entrypoint, runtimeEnv, replicas or resources: status.scheduling.
    specDigest), whose edit, deferred to a next attempt (_defer_edit), will now never run.
    Empty where it ran the spec as it is, or where the placing operator recorded no digest."""
    placed = state.scheduling.get("specDigest")
    if not placed or placed == submission_digest(spec):
        return ""
    ran = f"generation {state.attempt_generation}'s spec" if state.attempt_generation is not None else "its placed spec"
    return (
        f" with {ran}: the entrypoint, runtimeEnv, replicas or resources as edited up to generation "
        f"{generation} never ran"
    )


def changed_fields(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch that turns each field of ``current`` named in ``wanted`` into its
    wanted value: unchanged fields are left out (a pass that changes nothing writes nothing; with
    hundreds of waiting jobs, rewriting identical status would flood the API), and keys of an
    object that the wanted value no longer has are sent as null (a merge patch merges objects key
    by key, so a stale scheduling reason would otherwise stay for ever)."""
    patch: dict[str, Any] = {}
    for key, value in wanted.items():
        diff = _merge_diff(current.get(key), value)
        if diff is not _UNCHANGED:
            patch[key] = diff
    return patch


_UNCHANGED = object()


def _merge_diff(old: Any, new: Any) -> Any:
    if old == new:
        return _UNCHANGED
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        diff: dict[str, Any] = {key: None for key in old if key not in new}
        for key, value in new.items():
            inner = _merge_diff(old.get(key), value)
            if inner is not _UNCHANGED:
                diff[key] = inner
        return diff
    return new


def _gpus_per_replica(body: Mapping[str, Any], state: AIJobStatus) -> float:
    """What the attempt was placed with (status.scheduling); the spec's when that is not recorded."""
    gpus = state.scheduling.get("gpusPerReplica")
    if not isinstance(gpus, int | float) or isinstance(gpus, bool):
        spec = body.get("spec")
        resources = spec.get("resources") if isinstance(spec, Mapping) else None
        gpus = resources.get("gpus", 1) if isinstance(resources, Mapping) else 1
    return float(gpus) if isinstance(gpus, int | float) and not isinstance(gpus, bool) and gpus >= 0 else 1.0


def allocation_of(body: Mapping[str, Any]) -> Allocation | None:
    """What the AIJob ``body`` holds according to its status (the kopf index uses this)."""
    state = AIJobStatus.from_status(body.get("status"))
    if state.phase is None or not state.phase.holds_nodes or not state.assigned_nodes:
        return None
    # What the attempt was placed with; the spec's (an object placed before 2026-12-06) only when
    # that is not recorded: an edited spec does not change what a running attempt holds.
    resources = (body.get("spec") or {}).get("resources") or {}
    gpus, cpus = state.scheduling.get("gpusPerReplica"), state.scheduling.get("cpusPerReplica")
    if not isinstance(gpus, int) or isinstance(gpus, bool):
        gpus = resources.get("gpus", 1)
    if not isinstance(cpus, int | float) or isinstance(cpus, bool):
        cpus = resources.get("cpus", 1.0)
    return Allocation(nodes=state.assigned_nodes, gpus_per_replica=int(gpus), cpus_per_replica=float(cpus))
