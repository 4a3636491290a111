"""Writes each outcome's evidence into the volunteers' ``status.reputation`` (and job counters), so a
person can see why a node has its score and the scheduler reads it back on the next placement."""

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


def updated_status(status: Mapping[str, Any], kind: str, now: float, config: ReputationConfig) -> dict[str, Any]:
    """Pure: the status fields to write after one piece of evidence of ``kind``."""
    evidence = RECORDERS[kind](from_status(status.get("reputation")), now, config)
    jobs = dict(status.get("jobs") or {})
    counter = JOB_COUNTERS[kind]
    jobs[counter] = int(jobs.get(counter) or 0) + 1
    return {"reputation": to_status(evidence, now, config), "jobs": jobs}


class ReputationBook:
    def __init__(self, config: ReputationConfig = DEFAULT_CONFIG.reputation, clock: Callable[[], float] = time.time):
        self._config = config
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    async def record(self, evidence: Iterable[tuple[str, str]]) -> None:
        for node, kind in evidence:
            # One writer per node at a time: read-modify-write of the evidence counts.
            async with self._locks.setdefault(node, asyncio.Lock()):
                await asyncio.to_thread(self._apply, node, kind)

    def _apply(self, node: str, kind: str) -> None:
        load_config()
        api = client.CustomObjectsApi()
        try:
            current = cast(dict[str, Any], api.get_cluster_custom_object(GROUP, VERSION, VOLUNTEER_PLURAL, node))
        except ApiException as error:
            if error.status == 404:
                return  # a bare Ray worker without a VolunteerNode: nothing to record on
            raise
        fields = updated_status(current.get("status") or {}, kind, self._clock(), self._config)
        api.patch_cluster_custom_object_status(GROUP, VERSION, VOLUNTEER_PLURAL, node, {"status": fields})
        logger.info("reputation of %s after %s: lowerBound=%s", node, kind, fields["reputation"]["lowerBound"])
