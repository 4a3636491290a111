"""Writes each outcome's evidence into the volunteers' ``status.reputation`` (and job counters), so a
person can see why a node has its score and the scheduler reads it back on the next placement.

Evidence is written before kopf writes the job's own status. An operator that dies between the two
runs the same reconcile pass again after its restart, so every piece of evidence carries a key
(the job's uid, attempt and verification round, and the kind) and each node keeps the keys of its
latest outcomes in ``status.reputation.recordedOutcomes``: a key already there is not counted twice.
Writes are conditional on the resourceVersion that was read, so a concurrent writer costs a retry,
never a lost count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from koinon_operator.api.constants import GROUP, VERSION, VOLUNTEER_PLURAL
from koinon_operator.kube import load_config
from koinon_operator.scheduler import (
    DEFAULT_CONFIG,
    ReputationConfig,
    ReputationEvidence,
    from_status,
    record_agreement,
    record_disagreement,
    record_failure,
    record_success,
    record_timeout,
    to_status,
)

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
# A replayed pass repeats evidence within seconds of the original, so a short memory per node is
# enough; it is bounded so that status stays small on a node that has run thousands of jobs.
RECORDED_OUTCOMES_KEPT = 64
# Conditional writes that lose a race are retried this many times before the evidence is reported lost.
CONFLICT_RETRIES = 5


def outcome_key(uid: str, status: Mapping[str, Any]) -> str:
    """Names one reconcile pass's outcome from the job status it acted on (the status before the
    pass), so a pass replayed after an operator restart produces the same key."""
    attempt = int(status.get("attempts") or 0)
    rerun = int(status.get("verificationReruns") or 0)
    return f"{uid}/{attempt}/{rerun}"


def updated_status(
    status: Mapping[str, Any], kind: str, now: float, config: ReputationConfig, key: str | None = None
) -> dict[str, Any] | None:
    """Pure: the status fields to write after one piece of evidence of ``kind``, or None when the
    evidence named ``key`` is already counted in ``status``."""
    previous = status.get("reputation") or {}
    recorded = [str(k) for k in previous.get("recordedOutcomes") or ()]
    entry = f"{key}:{kind}" if key is not None else None
    if entry is not None and entry in recorded:
        return None
    evidence = RECORDERS[kind](from_status(previous), now, config)
    jobs = dict(status.get("jobs") or {})
    counter = JOB_COUNTERS[kind]
    jobs[counter] = int(jobs.get(counter) or 0) + 1
    reputation = to_status(evidence, now, config)
    if entry is not None:
        recorded.append(entry)
    if recorded:
        reputation["recordedOutcomes"] = recorded[-RECORDED_OUTCOMES_KEPT:]
    return {"reputation": reputation, "jobs": jobs}


class ReputationBook:
    def __init__(self, config: ReputationConfig = DEFAULT_CONFIG.reputation, clock: Callable[[], float] = time.time):
        self._config = config
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    async def record(self, evidence: Iterable[tuple[str, str]], key: str | None = None) -> None:
        """Counts each (node, kind); with a ``key``, evidence already counted under it is skipped."""
        for node, kind in evidence:
            # One writer per node at a time in this process: read-modify-write of the evidence counts.
            async with self._locks.setdefault(node, asyncio.Lock()):
                await asyncio.to_thread(self._apply, node, kind, key)

    def _apply(self, node: str, kind: str, key: str | None) -> None:
        load_config()
        api = client.CustomObjectsApi()
        for _ in range(CONFLICT_RETRIES):
            try:
                current = cast(dict[str, Any], api.get_cluster_custom_object(GROUP, VERSION, VOLUNTEER_PLURAL, node))
            except ApiException as error:
                if error.status == 404:
                    return  # a bare Ray worker without a VolunteerNode: nothing to record on
                raise
            fields = updated_status(current.get("status") or {}, kind, self._clock(), self._config, key)
            if fields is None:
                logger.info("evidence %s:%s for %s already recorded; not counted again", key, kind, node)
                return
            body = {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]}, "status": fields}
            try:
                api.patch_cluster_custom_object_status(GROUP, VERSION, VOLUNTEER_PLURAL, node, body)
            except ApiException as error:
                if error.status == 409:
                    continue  # another writer (the gateway's heartbeat status) went first: read again
                raise
            logger.info("reputation of %s after %s: lowerBound=%s", node, kind, fields["reputation"]["lowerBound"])
            return
        raise RuntimeError(f"evidence {kind} for {node} lost {CONFLICT_RETRIES} write races in a row")
