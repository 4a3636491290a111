"""Writes each outcome's evidence into the volunteers' ``status.reputation`` (and job counters), so a
person can see why a node has its score and the scheduler reads it back on the next placement.

Evidence is written before kopf writes the job's own status. An operator that dies between the two
runs the same reconcile pass again after its restart, so every piece of evidence carries a key
(the job's uid, attempt and verification round, and the kind) and each node keeps the keys of its
outcomes of the last hour (and its latest 32 whatever their age), with the second each was recorded,
in ``status.reputation.recordedOutcomes``: a key already there is not counted twice.
The work a node did in the attempt (hours of execution for its crash rate's exposure, and
``status.contributedGpuSeconds``) is counted once too, under the same key with ``/work`` after it.
Writes are conditional on the resourceVersion that was read, so a concurrent writer costs a retry,
never a lost count.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from koinon_operator.api.constants import GROUP, VERSION, VOLUNTEER_PLURAL
from koinon_operator.kube import load_config
from koinon_operator.ray_jobs import describe_error
from koinon_operator.reconciler import NodeWork
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    ReputationConfig,
    ReputationEvidence,
    decayed,
    from_status,
    record_agreement,
    record_disagreement,
    record_failure,
    record_heartbeats,
    record_success,
    record_timeout,
    record_work,
    to_status,
)
from koinon_operator.scheduler.reputation import owner_extra_disagreements

logger = logging.getLogger(__name__)

Recorder = Callable[[ReputationEvidence, float, ReputationConfig], ReputationEvidence]
RECORDERS: Mapping[str, Recorder] = {
    "success": record_success,
    "failure": record_failure,
    "timeout": record_timeout,
    "agreement": record_agreement,
    "disagreement": record_disagreement,
}
JOB_COUNTERS = {"success": "succeeded", "agreement": "succeeded", "failure": "failed", "timeout": "failed",
                "disagreement": "disagreed"}  # fmt: skip
# Which outcome keys a node remembers. A replayed pass repeats evidence as soon as the restarted
# operator runs it again: seconds after the original, or minutes when its pod is rescheduled, and a
# busy node (8 GPUs, one-minute jobs: 16 entries a minute, evidence and work) records many outcomes
# in between, so a count alone (64 entries, 32 outcomes) forgot the key after four minutes. Each
# entry carries the second it was recorded ("key@seconds"): every entry of the last hour is kept,
# and the latest RECORDED_OUTCOMES_KEPT whatever their age, up to RECORDED_OUTCOMES_CAP entries
# (about 60 bytes each, some 120 KiB, far under etcd's 1.5 MiB object limit; the CRD's maxItems
# for status.reputation.recordedOutcomes is the same number). The cap holds an hour of 17 outcomes
# a minute. Older entries go at the node's next outcome or uptime sample (once a minute), so a node
# that was busy and is now quiet is back to its latest 64 entries an hour later.
RECORDED_OUTCOMES_KEPT = 64
RECORDED_OUTCOMES_WINDOW_S = 3600.0
RECORDED_OUTCOMES_CAP = 2048
# Conditional writes that lose a race are retried this many times, after a growing jittered pause
# (the other writers, the gateway's status and other passes, write a node at most about once a
# second), before the evidence is reported lost: five quick tries lost it under a busy node.
CONFLICT_RETRIES = 20
CONFLICT_PAUSE_S = 0.01
# Each read and write of a VolunteerNode gives up after this long (the client's default waits for
# ever): an AIJob's pass writes its status only after its evidence is recorded, and one request
# hung on a half-open connection held that job's pass (and a worker thread) for good.
REQUEST_TIMEOUT_S = 10.0
# Uptime evidence is counted in units of this length ("heartbeats" seen or missed), so that a node
# seen up for a minute weighs the same whoever sampled it and how often. A fixed unit, not the
# agents' heartbeat interval (2 s, the gateway's heartbeat_interval_s): changing that interval must
# not change how much an hour of uptime weighs against job outcomes.
HEARTBEAT_UNIT_S = 5.0
# An outcome's work is kept under its own entry (the outcome key and this): a node that did work
# but was given no evidence (its copy was stopped, or failed on its own) still has it counted
# once, and a replay that now sees evidence for it still counts that. Not "key:..." (entries
# written before 2026-12-06 carried the kind so, and read as the outcome's evidence).
WORK_KEY_SUFFIX = "/work"


def outcome_key(uid: str, status: Mapping[str, Any]) -> str:
    """Names one reconcile pass's outcome from the job status it acted on (the status before the
    pass), so a pass replayed after an operator restart produces the same key."""
    attempt = int(status.get("attempts") or 0)
    rerun = int(status.get("verificationReruns") or 0)
    return f"{uid}/{attempt}/{rerun}"


def updated_status(
    status: Mapping[str, Any],
    kind: str | None,
    now: float,
    config: ReputationConfig,
    key: str | None = None,
    work: NodeWork | None = None,
) -> dict[str, Any] | None:
    """Pure: the status fields to write after one piece of evidence of ``kind`` (None: none) and
    the ``work`` the node did in the same outcome (None: none), or None when both, as named by
    ``key``, are already counted in ``status`` (or there is nothing to count).

    The work adds its hours to the evidence's exposure (``reputation.exposureHours``, which decays
    with the rest) and its GPU-seconds to ``contributedGpuSeconds`` (a running total, to 0.1 s)."""
    previous = status.get("reputation") or {}
    recorded = [str(k) for k in previous.get("recordedOutcomes") or ()]
    keys = {_recorded_key(r)[0] for r in recorded}
    # One piece of evidence per node per outcome key, whatever its kind: a pass replayed after a
    # restart may see the attempt end otherwise (failed, then its node lost) and must not count
    # it twice. Entries written before 2026-12-06 carry the kind after the key.
    entry = key
    new_evidence = kind is not None and not (
        entry is not None and (entry in keys or any(k.startswith(f"{entry}:") for k in keys))
    )
    work_entry = None if key is None else f"{key}{WORK_KEY_SUFFIX}"
    new_work = (
        work is not None
        and (work.hours > 0 or work.gpu_seconds > 0)
        and not (work_entry is not None and work_entry in keys)
    )
    if not new_evidence and not new_work:
        return None
    stamp = f"@{math.floor(now)}"  # when: kept for an hour (RECORDED_OUTCOMES_WINDOW_S)
    evidence = from_status(previous)
    fields: dict[str, Any] = {}
    if new_evidence and kind is not None:
        evidence = RECORDERS[kind](evidence, now, config)
        jobs = dict(status.get("jobs") or {})
        counter = JOB_COUNTERS[kind]
        jobs[counter] = int(jobs.get(counter) or 0) + 1
        fields["jobs"] = jobs
        if entry is not None:
            recorded.append(entry + stamp)
    if new_work and work is not None:
        evidence = record_work(evidence, now, config, work.hours)
        if not math.isfinite(work.gpu_seconds) or work.gpu_seconds < 0:
            raise ValueError(f"GPU-seconds of work must be a finite number >= 0, got {work.gpu_seconds}")
        fields["contributedGpuSeconds"] = round(_contributed(status) + work.gpu_seconds, 1)
        if work_entry is not None:
            recorded.append(work_entry + stamp)
    reputation = to_status(evidence, now, config, _previous_owner_extra(previous))
    if recorded:
        reputation["recordedOutcomes"] = _still_remembered(recorded, now)
    return {"reputation": reputation, **fields}


def _recorded_key(entry: str) -> tuple[str, float | None]:
    """An entry of ``recordedOutcomes`` as (its outcome key, when it was recorded). Entries written
    before 2026-12-07 carry no time (None): they are kept only while among the latest."""
    key, at_sign, seconds = entry.rpartition("@")
    if at_sign and seconds.isdigit():
        return key, float(seconds)
    return entry, None


def _still_remembered(recorded: list[str], now: float) -> list[str]:
    """The entries to keep, oldest first: those of the last RECORDED_OUTCOMES_WINDOW_S and the latest
    RECORDED_OUTCOMES_KEPT, at most the latest RECORDED_OUTCOMES_CAP of them. A time ahead of
    ``now`` (another operator's clock) is recent."""
    since = now - RECORDED_OUTCOMES_WINDOW_S
    latest = len(recorded) - RECORDED_OUTCOMES_KEPT
    kept = [
        r for i, r in enumerate(recorded) if i >= latest or ((at := _recorded_key(r)[1]) is not None and at >= since)
    ]
    return kept[-RECORDED_OUTCOMES_CAP:]


def _contributed(status: Mapping[str, Any]) -> float:
    """GPU-seconds counted so far; a value that is not a count (hand-edited) starts again at 0."""
    value = status.get("contributedGpuSeconds")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return 0.0
    return float(value)


def _previous_owner_extra(reputation: Mapping[str, Any]) -> float:
    """The siblings' pooled disagreements as last sampled: kept until the next uptime look."""
    value = reputation.get("ownerDisagreements")
    return float(value) if isinstance(value, int | float) and value > 0 else 0.0


def disagreements_by_node(
    volunteers: Iterable[Mapping[str, Any]], now: float, config: ReputationConfig
) -> dict[str, tuple[str, float]]:
    """Pure: per VolunteerNode name, (its owner, its disagreements aged to ``now``). A node without
    an owner is its own owner; an unreadable status counts nothing (the scheduler says why)."""
    found: dict[str, tuple[str, float]] = {}
    for item in volunteers:
        meta, spec = item.get("metadata") or {}, item.get("spec") or {}
        name = str(meta.get("name") or "")
        try:
            evidence = decayed(from_status((item.get("status") or {}).get("reputation")), now, config)
        except ValueError:
            evidence = ReputationEvidence()
        found[name] = (str(spec.get("owner") or name), evidence.disagreements)
    return found


def disagreements_by_owner(by_node: Mapping[str, tuple[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for owner, disagreements in by_node.values():
        totals[owner] = totals.get(owner, 0.0) + disagreements
    return totals


def owner_pooled_disagreements(
    volunteers: Iterable[Mapping[str, Any]], now: float, config: ReputationConfig
) -> dict[str, float]:
    """Pure: per VolunteerNode name, the disagreements of its owner's other nodes (aged to ``now``)
    charged to it, as the scheduler's index pools them: a liar caught on one node weighs on its
    siblings' scores."""
    own = disagreements_by_node(volunteers, now, config)
    totals = disagreements_by_owner(own)
    return {
        name: owner_extra_disagreements(ReputationEvidence(disagreements=dis), totals[owner], config)
        for name, (owner, dis) in own.items()
    }


def uptime_sample(
    status: Mapping[str, Any],
    now: float,
    config: ReputationConfig,
    max_gap_s: float,
    owner_extra: float | None = None,
) -> dict[str, Any] | None:
    """Pure: the status fields to write after looking at a node at ``now``, None when there is
    nothing to write.

    ``owner_extra``: the owner's other nodes' disagreements charged to this one (None: as before).
    The time since the previous look (``reputation.uptimeSampledAt``) counts as heartbeats seen
    when the node is Ready (or Draining) now, as heartbeats missed when it is not. At most
    ``max_gap_s`` of it counts: nobody looked in between (the operator was down), so a longer gap
    says nothing either way. The first look only starts the clock. The timestamp lives in the
    object, so an operator restart neither counts a stretch twice nor loses one.
    """
    previous = dict(status.get("reputation") or {})
    evidence = from_status(previous)
    sampled_at = previous.get("uptimeSampledAt")
    if isinstance(sampled_at, int | float) and now <= sampled_at:
        return None
    if isinstance(sampled_at, int | float) and not _platforms_doing(status, now):
        heartbeats = min(now - sampled_at, max_gap_s) / HEARTBEAT_UNIT_S
        up = status.get("phase") in ("Ready", "Draining")  # connected with Ray serving (or leaving by choice)
        evidence = record_heartbeats(evidence, now, config, heartbeats if up else 0.0, 0.0 if up else heartbeats)
    extra = _previous_owner_extra(previous) if owner_extra is None else owner_extra
    reputation = to_status(evidence, now, config, extra)
    if recorded := [str(k) for k in previous.get("recordedOutcomes") or ()]:
        reputation["recordedOutcomes"] = _still_remembered(recorded, now)
    reputation["uptimeSampledAt"] = now
    return {"reputation": reputation}


# Ready=False reasons the platform causes: the gateway shut down or restarted, and its agents have
# not reconnected yet. Not the volunteer's downtime for a while (agents back off up to a minute
# between tries); past that, a node still not back is down like any other.
PLATFORM_REASONS = frozenset({"GatewayStopped", "GatewayRestarted"})
PLATFORM_GRACE_S = 600.0
# A Ready status whose lastHeartbeat is older than this was left by a gateway that stopped writing
# (down, or crash-looping before it could mark its nodes): it refreshes a connected node's every
# 30 s. Nobody knows whether such a node is up: no evidence, as during a gateway outage.
SILENT_STATUS_S = 120.0


def _platforms_doing(status: Mapping[str, Any], now: float) -> bool:
    """Whether the node is not up because of the platform (or has never been up): no evidence."""
    if status.get("phase") in (None, "Pending"):
        return True  # joined, never connected: nothing to say about its uptime yet
    if status.get("phase") in ("Ready", "Draining"):
        heard = _seconds_since_epoch(status.get("lastHeartbeat"))
        if heard is not None and now - heard > SILENT_STATUS_S:
            return True
    for condition in status.get("conditions") or ():
        if not isinstance(condition, Mapping) or condition.get("type") != "Ready":
            continue
        if condition.get("status") == "False" and condition.get("reason") in PLATFORM_REASONS:
            since = _seconds_since_epoch(condition.get("lastTransitionTime"))
            return since is not None and now - since < PLATFORM_GRACE_S
    return False


def _seconds_since_epoch(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class ReputationBook:
    def __init__(self, config: ReputationConfig = DEFAULT_CONFIG.reputation, clock: Callable[[], float] = time.time):
        self._config = config
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    async def record(
        self,
        evidence: Iterable[tuple[str, str]],
        key: str | None = None,
        work: Mapping[str, NodeWork] | None = None,
    ) -> None:
        """Counts each (node, kind), and each node's ``work``, in one write per node where it has
        both; with a ``key``, what is already counted under it is skipped.

        A node whose evidence cannot be counted (its status is unreadable, the write failed) does
        not cost the others theirs: each is tried, then the first failure is raised.
        """
        left = dict(work or {})
        entries: list[tuple[str, str | None, NodeWork | None]] = [
            (node, kind, left.pop(node, None)) for node, kind in evidence
        ]
        entries += [(node, None, done) for node, done in left.items()]
        failures: list[Exception] = []
        for node, kind, done in entries:
            # One writer per node at a time in this process: read-modify-write of the evidence counts.
            async with self._locks.setdefault(node, asyncio.Lock()):
                try:
                    await asyncio.to_thread(self._apply, node, kind, key, done)
                except Exception as exc:
                    logger.warning("evidence %s (work %s) for %s not recorded: %r", kind, done, node, exc)
                    failures.append(exc)
        if failures:
            raise failures[0]

    def _apply(self, node: str, kind: str | None, key: str | None, work: NodeWork | None = None) -> None:
        load_config()
        written: list[dict[str, Any]] = []

        def count(status: dict[str, Any]) -> dict[str, Any] | None:
            fields = updated_status(status, kind, self._clock(), self._config, key, work)
            written[:] = [fields] if fields is not None else []
            return fields

        outcome = self._read_modify_write(node, count)
        what = kind if work is None else f"{kind or 'work'} ({work.gpu_seconds:.1f} GPU-s)"
        if outcome == "unchanged":
            logger.info("evidence %s:%s for %s already recorded; not counted again", key, what, node)
        elif outcome == "written":
            logger.info("reputation of %s after %s: lowerBound=%s", node, what, written[0]["reputation"]["lowerBound"])
        elif outcome == "lost":
            raise RuntimeError(f"evidence {what} for {node} lost {CONFLICT_RETRIES} write races in a row")
        # "gone": a bare Ray worker without a VolunteerNode: nothing to record on

    @staticmethod
    def _read_modify_write(node: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> str:
        """Patches the node's status with what ``change`` makes of it, reading again after a write
        race (another writer, e.g. the gateway's heartbeat status, went first). Returns "written",
        "unchanged" (``change`` gave None), "gone" (no such node) or "lost" (every try raced)."""
        api = client.CustomObjectsApi()
        for attempt in range(CONFLICT_RETRIES):
            if attempt:
                time.sleep(random.uniform(0.5, 1.5) * CONFLICT_PAUSE_S * min(attempt, 10))  # a worker thread
            try:
                current = cast(
                    dict[str, Any],
                    api.get_cluster_custom_object(
                        GROUP, VERSION, VOLUNTEER_PLURAL, node, _request_timeout=REQUEST_TIMEOUT_S
                    ),
                )
            except ApiException as error:
                if error.status == 404:
                    return "gone"
                raise
            fields = change(current.get("status") or {})
            if fields is None:
                return "unchanged"
            body = {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]}, "status": fields}
            try:
                api.patch_cluster_custom_object_status(
                    GROUP, VERSION, VOLUNTEER_PLURAL, node, body, _request_timeout=REQUEST_TIMEOUT_S
                )
            except ApiException as error:
                if error.status == 409:
                    continue
                raise
            return "written"
        return "lost"

    async def sample_uptime(self, interval_s: float) -> int:
        """Looks at every VolunteerNode once and records its uptime evidence; returns how many
        were written. A gap of up to two intervals counts (one missed look is no news)."""
        volunteers = await asyncio.to_thread(self._volunteers)
        pooled = owner_pooled_disagreements(volunteers, self._clock(), self._config)
        written = 0
        api_failures_in_a_row = 0
        for node, owner_extra in pooled.items():
            async with self._locks.setdefault(node, asyncio.Lock()):
                try:
                    written += await asyncio.to_thread(self._apply_uptime, node, 2 * interval_s, owner_extra)
                    api_failures_in_a_row = 0
                except Exception as exc:
                    # One node's failure (a status it cannot read, a write the API refuses, a reset
                    # connection) costs that node this look, not every node after it in the round.
                    logger.warning("uptime of %s not recorded: %s", node, _brief(exc))
                    api_failures_in_a_row = 0 if _this_nodes_own(exc) else api_failures_in_a_row + 1
                    if api_failures_in_a_row >= MAX_API_FAILURES_PER_ROUND:
                        # The API itself is down or refusing the operator: every node left would
                        # fail alike, a request and a log line each, once a minute.
                        logger.warning("uptime round ended: %d API failures in a row", api_failures_in_a_row)
                        break
        return written

    @staticmethod
    def _volunteers() -> list[dict[str, Any]]:
        load_config()
        listed = cast(
            dict[str, Any],
            client.CustomObjectsApi().list_cluster_custom_object(
                GROUP, VERSION, VOLUNTEER_PLURAL, _request_timeout=REQUEST_TIMEOUT_S
            ),
        )
        return list(listed.get("items") or ())

    def _apply_uptime(self, node: str, max_gap_s: float, owner_extra: float) -> int:
        outcome = self._read_modify_write(
            node, lambda status: uptime_sample(status, self._clock(), self._config, max_gap_s, owner_extra)
        )
        if outcome == "lost":
            logger.warning("uptime of %s not recorded: lost %d write races in a row", node, CONFLICT_RETRIES)
        return 1 if outcome == "written" else 0


# Failures of the API as a whole (not of one node's object) after which an uptime round stops.
MAX_API_FAILURES_PER_ROUND = 3


def _this_nodes_own(error: Exception) -> bool:
    """Whether an uptime write's failure is about that node (its status unreadable, the API
    refusing that object: 4xx but 401/403/429), not the API as a whole (unreachable, 5xx, the
    operator's credentials or permissions, throttling)."""
    if isinstance(error, ValueError):
        return True
    if isinstance(error, ApiException):
        status = error.status or 0
        return 400 <= status < 500 and status not in (401, 403, 429)
    return False


def _brief(error: Exception) -> str:
    """An error for the log: an API error's status and reason only (its text carries the whole
    response, headers and body), anything else as its plain text, never a repr."""
    if isinstance(error, ApiException):
        return f"ApiException {error.status} {error.reason}"
    return describe_error(error)


async def sample_uptime_forever(
    book: ReputationBook, interval_s: float, active: Callable[[], bool] = lambda: True
) -> None:
    """The operator's uptime sampler: heartbeats reach the gateway, not the operator, so the
    operator looks at what the gateway wrote (connected, phase) once per interval, while
    ``active`` (it leads)."""
    while True:
        await asyncio.sleep(interval_s)
        if not active():
            continue
        try:
            await book.sample_uptime(interval_s)
        except Exception:  # the API may be away for a while; the next look counts the gap (capped)
            logger.exception("uptime sampling failed")
